"""Ranks training images by how much a trained model disagrees with their masks (wrong GT).

    bldseg suspects --checkpoint runs/single/best.pt --out runs/suspects
    python experiments/find_suspects.py --checkpoint runs/single/best.pt --out runs/suspects

Writes suspects.csv (most suspect first) and suspects.png (contact sheet of the top ones). On
the synthetic world, whose train_noise.csv records the injected label noise, it also prints
precision@k: the share of truly noisy masks among the top k (k = number of noisy images).
"""

from __future__ import annotations

import argparse

import pandas as pd

from bldseg.commands import USER_ERRORS, fail
from bldseg.data.prepare import add_data_arguments, data_options, prepare_data
from bldseg.predict import load_checkpoint
from bldseg.train.suspects import precision_at_k, rank_suspects, write_suspects


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg suspects`` (``experiments/find_suspects.py``).

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
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
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Ranks and writes the suspects; returns the exit status (1 with a message for bad input).

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    args = build_parser(prog).parse_args(argv)
    try:
        model, _, m = load_checkpoint(args.checkpoint)
        data = prepare_data(
            args.data, options=data_options(args), data_root=args.data_root, verbose=True
        )
    except USER_ERRORS as e:
        return fail(e)
    thr = args.threshold if args.threshold is not None else float(m.get("val_thr_best", 0.5))
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
    return 0
