"""Ranks training images by how much a trained model disagrees with their masks (wrong GT).

    python experiments/find_suspects.py --checkpoint runs/single/best.pt --out runs/suspects

Writes suspects.csv (most suspect first) and suspects.png (contact sheet of the top ones). On
the synthetic world, whose train_noise.csv records the injected label noise, it also prints
precision@k: the share of truly noisy masks among the top k (k = number of noisy images).
"""

import argparse

import pandas as pd

from bldseg.data.prepare import add_data_arguments, data_options, prepare_data
from bldseg.predict import load_checkpoint
from bldseg.train.suspects import precision_at_k, rank_suspects, write_suspects


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="best.pt of a trained model")
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="folder for suspects.csv / suspects.png")
    p.add_argument("--top", type=int, default=12, help="images in the contact sheet")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="binarisation threshold (default: the checkpoint's chosen one)",
    )
    args = p.parse_args()
    model, _, m = load_checkpoint(args.checkpoint)
    thr = args.threshold if args.threshold is not None else float(m.get("val_thr_best", 0.5))
    try:
        data = prepare_data(
            args.data, options=data_options(args), data_root=args.data_root, verbose=True
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        raise SystemExit(f"error: {e}") from e
    df = rank_suspects(model, data.train, range(len(data.train)), threshold=thr)
    csv, png = write_suspects(df, data.train, model, args.out, top=args.top, threshold=thr)
    print(df.head(args.top).to_string(index=False))
    print(f"wrote {csv} and {png}")
    noise_csv = data.root / "train_noise.csv"
    if noise_csv.is_file():
        noise = pd.read_csv(noise_csv)
        noisy = set(noise.loc[noise["noise"] != "none", "img_id"])
        if noisy:
            k = len(noisy)
            print(
                f"precision@{k} (injected noisy masks found): "
                f"{precision_at_k(df['img_id'], noisy, k):.3f} "
                f"(random ranking: {k / len(df):.3f})"
            )


if __name__ == "__main__":
    main()
