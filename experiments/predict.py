"""Writes a submission CSV from a model checkpoint or an ensemble spec, and scores it if it can.

    python experiments/predict.py --checkpoint runs/.../best.pt            # one model
    python experiments/predict.py --ensemble results/best_ensemble.json    # an ensemble
    python experiments/predict.py --checkpoint a.pt --data /path/to/comp --out submission.csv

With one checkpoint the threshold defaults to the one chosen on its validation tiles. When the
dataset has held-out ground truth (the synthetic world's test_truth.csv, or --truth), the
submission is scored with the official metric.
"""

import argparse
import time

from bldseg import metrics
from bldseg.data.prepare import DEFAULT_DATA_ROOT, prepare_data
from bldseg.predict import EnsembleSpec, load_checkpoint, predict_cache, write_submission


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", action="append", help="best.pt of a model (repeatable)")
    src.add_argument("--ensemble", help="ensemble spec JSON (from ensemble_search.py)")
    p.add_argument("--data", default=None, help="folder with test.csv (default: synthetic world)")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="caches and synthetic data")
    p.add_argument("--out", default="submission.csv", help="submission CSV to write")
    p.add_argument("--threshold", type=float, default=None, help="override the threshold")
    p.add_argument("--min-area", type=int, default=None, help="tiles with fewer pixels -> -1")
    p.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    p.add_argument("--truth", default=None, help="ground-truth CSV to score against")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    args = p.parse_args()

    if args.ensemble:
        spec = EnsembleSpec.load(args.ensemble)
    else:
        _, _, m = load_checkpoint(args.checkpoint[0])
        spec = EnsembleSpec(args.checkpoint, threshold=float(m.get("val_thr_best", 0.5)))
    if args.threshold is not None:
        spec.threshold = args.threshold
    if args.min_area is not None:
        spec.min_area = args.min_area
    spec.tta = spec.tta or args.tta

    data = prepare_data(args.data, data_root=args.data_root)
    if data.test is None:
        raise SystemExit(f"{data.root} has no test.csv to predict")
    t0 = time.perf_counter()
    pred = predict_cache(spec, data.test, batch_size=args.batch_size, device=args.device)
    write_submission(data.test.ids, pred, args.out)
    print(
        f"wrote {args.out}: {len(pred)} tiles, {int((pred.sum((1, 2)) == 0).sum())} empty, "
        f"{len(spec.checkpoints)} model(s), threshold {spec.threshold:.4f}, "
        f"{time.perf_counter() - t0:.1f} s"
    )
    truth = args.truth or data.test_truth_csv
    if truth:
        print(f"official score vs {truth}: {metrics.score_csv(truth, args.out):.5f}")


if __name__ == "__main__":
    main()
