"""The demo's model vs a standard peer on the built-in world's clean held-out test split.

Both arms go through the same ``fit()`` with the same run config (the CPU demo's settings,
``CPU_DEMO`` with the demo's 20 epochs, a search's best trial with ``--search``, or a config
with ``--config``): same crops, augmentation, schedule, batches and steps; only the model
differs. Ours is the demo's
tiny UPerNet-InternImage, the peer an smp UNet with a small encoder (ResNet-18 by default;
needs ``pip install 'bldseg[smp]'``), both from random initialisation.

Each run is scored with the official metric (mean per-tile Dice, tiles empty in truth and
prediction left out) on the clean test tiles, at its own threshold chosen on validation. The
95% intervals are cluster bootstraps over the test tiles' source scenes (``bldseg.stats``);
with several seeds, an arm's tiles of every seed are pooled and resampled together by scene.
``ours - peer`` is a paired difference on the same tiles. Prints a table and writes JSON.
Wall times are of whatever else the machine was running too: quality is the result here.

    python experiments/bench_quality.py --seeds 0 1 --json bench/quality.json
    python experiments/bench_quality.py --search runs/augmentation-20261202-012605  # the demo's
    python experiments/bench_quality.py --config best_trial.json      # a demo trial's config
    python experiments/bench_quality.py --peer smp_unet_efficientnet_b0 --seeds 0
    python experiments/bench_quality.py --search runs/... --peer-epochs 3  # equal CPU time

``ep`` in the table is the best epoch / the epochs trained; ``CPU s`` the training process's
CPU seconds (all torch threads; NaN for a run trained before they were recorded). With
``--peer-epochs`` the peer trains fewer (or more) epochs on its own full schedule: the
comparison at an equal CPU budget rather than equal steps.

Runs are kept under ``--out`` keyed by the data and the config, so re-running with more seeds
trains only the new ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bldseg import metrics, stats
from bldseg.data.prepare import DEFAULT_DATA_ROOT, DEFAULT_SYNTHETIC, prepare_data
from bldseg.io import write_json
from bldseg.pipeline import test_truth
from bldseg.predict import image_loader, load_checkpoint
from bldseg.train import RunConfig, fit
from bldseg.train.engine import eval_autocast, predict_probs, resolve_device
from bldseg.tune.cli import CPU_DEMO, DEFAULT_EPOCHS, parse_set

#: Epochs of a demo trial (``tune_aug.py --epochs`` default, ASHA's max_t): the budget of the
#: demo's best trial, which ASHA lets run to the end.
DEMO_EPOCHS = DEFAULT_EPOCHS


def _json_arg(text: str) -> dict[str, Any]:
    """A JSON object given inline or as the path of a JSON file."""
    path = Path(text)
    raw = path.read_text() if path.is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: neither a JSON file nor JSON ({e})") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a JSON object")
    # A trial row from trials.csv names its searched values config/<key>.
    return {k.removeprefix("config/"): v for k, v in value.items()}


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--synthetic``: the built-in world the benchmarks of this folder use."""
    parser.add_argument(
        "--data-root", default=str(DEFAULT_DATA_ROOT), help="the synthetic world and caches"
    )
    parser.add_argument(
        "--synthetic",
        type=_json_arg,
        default=None,
        help="generate_world keywords replacing DEFAULT_SYNTHETIC (use another --data-root)",
    )


def load_world(args: argparse.Namespace) -> tuple[dict[str, Any], Any]:
    """The world's generate_world keywords and its prepared data, from the world arguments."""
    synthetic = DEFAULT_SYNTHETIC if args.synthetic is None else args.synthetic
    return synthetic, prepare_data(
        None, data_root=args.data_root, synthetic=synthetic, verbose=True
    )


def best_trial(search_dir: Path) -> tuple[Path, dict[str, Any]]:
    """The best usable trial of a finished search: its run folder and its full flat config.

    Raises:
        FileNotFoundError: No ``trials.csv`` (the search did not finish) or no checkpoint.
        ValueError: No trial completed or was stopped early with a model.
    """
    from bldseg.tune.runner import METRIC, USABLE

    if (search_dir / "best.pt").is_file() and (search_dir / "summary.json").is_file():
        # One trial's run folder (e.g. of an interrupted search, which has no trials.csv).
        _, cfg, _ = load_checkpoint(search_dir / "best.pt")
        return search_dir, cfg.to_flat()
    csv = search_dir / "trials.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"{csv}: not found; pass the folder of a finished search")
    table = pd.read_csv(csv)
    usable = table[table["status"].isin(USABLE)]
    if usable.empty:
        raise ValueError(f"{csv}: no trial completed")
    row = usable.loc[usable[METRIC].idxmax()]
    run_dir = Path(row["run_dir"])
    ckpt = run_dir / "best.pt"
    if not ckpt.is_file():
        raise FileNotFoundError(f"{ckpt}: the best trial's checkpoint is missing")
    _, cfg, _ = load_checkpoint(ckpt)
    return run_dir, cfg.to_flat()


def _run_key(fingerprint: str, flat: dict[str, Any]) -> str:
    blob = json.dumps({"data": fingerprint, "config": flat}, sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=5).hexdigest()


def train_and_score(
    arm: str,
    cfg: RunConfig,
    out: Path,
    data,
    truth: np.ndarray,
    groups: list[str],
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Trains one run (or reuses a finished one) and scores it on the test tiles.

    Args:
        run_dir: An existing run of exactly ``cfg`` (the search's best trial); default a new
            folder under ``out`` keyed by the data and the config.

    Returns:
        The run's row: config summary, validation figures, per-tile test Dice and interval.
    """
    t0 = time.perf_counter()
    if run_dir is None:
        key = _run_key(data.train.fingerprint, cfg.to_flat())
        run_dir = out / f"{arm}-seed{cfg.seed}-{key}"
        result = fit(cfg, run_dir, data=data, resume=True, progress=True)
        status, message, history, best = (
            result.status,
            result.message,
            result.history,
            result.best,
        )
    else:
        # The search's own trial, read as it is: never trained further here (ASHA may have
        # stopped it before its last epoch; that is the demo's result).
        summary = json.loads((run_dir / "summary.json").read_text())
        status, message, best = summary["status"], summary["message"], summary["best"]
        history = json.loads((run_dir / "history.json").read_text())
    wall = time.perf_counter() - t0
    row: dict[str, Any] = {
        "arm": arm,
        "model": cfg.model,
        "seed": cfg.seed,
        "status": status,
        "run_dir": str(run_dir),
        "wall_s": wall,  # of this call: 0 for a run trained before
        "train_s": sum(h["epoch_s"] for h in history),  # the run's epochs, whenever trained
        "epoch_s": [h["epoch_s"] for h in history],
        "cpu_s": sum(h.get("cpu_s", float("nan")) for h in history),  # NaN: an older run
    }
    if status not in ("completed", "early-stopped") or not best:
        row["message"] = message
        return row
    device = resolve_device(cfg.device)
    model, run_cfg, _ = load_checkpoint(run_dir / "best.pt", device)
    amp = eval_autocast(run_cfg.precision, device)  # as bldseg predict runs it
    probs = predict_probs(model, image_loader(data.test, 32), device, amp, run_cfg.tta)  # (N, S, S)
    thr = float(best["val_thr_best"])
    per_tile = metrics.dice_per_image(probs >= metrics.level_from_threshold(thr), truth)
    at_05 = metrics.dice_per_image(probs >= metrics.level_from_threshold(0.5), truth)
    row.update(
        {
            "params": sum(p.numel() for p in model.parameters()),
            "best_epoch": best["epoch"],
            "val_dice_best": best["val_dice_best"],
            "val_thr_best": thr,
            "test_dice": stats.bootstrap_mean(per_tile, groups).to_dict(),
            "test_dice_05": float(np.nanmean(at_05)),
            "per_tile": [None if np.isnan(v) else float(v) for v in per_tile],
        }
    )
    return row


def _tiles(rows: list[dict], seeds: list[int]) -> np.ndarray:
    """Per-tile Dice of the given rows' seeds, concatenated in seed order (NaN kept)."""
    by_seed = {r["seed"]: r for r in rows}
    return np.concatenate(
        [np.array([np.nan if v is None else v for v in by_seed[s]["per_tile"]]) for s in seeds]
    )


def summarise(rows: list[dict], groups: list[str]) -> dict[str, Any]:
    """Each arm over its seeds, and ours - peer paired on the same tiles and seeds."""
    ok = [r for r in rows if "per_tile" in r]
    arms = {a: [r for r in ok if r["arm"] == a] for a in ("ours", "peer")}
    out: dict[str, Any] = {}
    for arm, rs in arms.items():
        if rs:
            seeds = [r["seed"] for r in rs]
            out[arm] = {
                "seeds": seeds,
                "test_dice": stats.bootstrap_mean(_tiles(rs, seeds), groups * len(seeds)).to_dict(),
                "test_dice_per_seed": [r["test_dice"]["estimate"] for r in rs],
            }
    common = sorted({r["seed"] for r in arms["ours"]} & {r["seed"] for r in arms["peer"]})
    if common:
        diff = stats.paired_difference(
            _tiles(arms["ours"], common), _tiles(arms["peer"], common), groups * len(common)
        )
        out["ours_minus_peer"] = {"seeds": common, **diff.to_dict()}
    return out


def _fmt(iv: dict) -> str:
    return f"{iv['estimate']:.4f} [{iv['low']:.4f}, {iv['high']:.4f}]"


def print_table(rows: list[dict], summary: dict) -> None:
    """The per-run table, then each arm over seeds and the paired difference."""
    head = f"{'arm':<5} {'model':<26} {'params':>7} {'seed':>4} {'ep':>5} {'val Dice':>8} "
    head += f"{'thr':>5} {'test Dice [95% CI]':>26} {'test@0.5':>8} {'train s':>7} {'CPU s':>6}"
    print("\n" + head + "\n" + "-" * len(head))
    for r in rows:
        if "per_tile" not in r:
            print(f"{r['arm']:<5} {r['model']:<26} seed {r['seed']}: {r['status']}: {r['message']}")
            continue
        print(
            f"{r['arm']:<5} {r['model']:<26} {r['params'] / 1e6:>6.2f}M {r['seed']:>4} "
            f"{r['best_epoch']:>2}/{len(r['epoch_s']):<2} {r['val_dice_best']:>8.4f} "
            f"{r['val_thr_best']:>5.3f} {_fmt(r['test_dice']):>26} {r['test_dice_05']:>8.4f} "
            f"{r['train_s']:>7.0f} {r['cpu_s']:>6.0f}"
        )
    print()
    for arm in ("ours", "peer"):
        if arm in summary:
            s = summary[arm]
            print(f"{arm} over seeds {s['seeds']}: test Dice {_fmt(s['test_dice'])}")
    if "ours_minus_peer" in summary:
        d = summary["ours_minus_peer"]
        beyond = "beyond noise" if d["low"] > 0 or d["high"] < 0 else "within noise"
        print(
            f"ours - peer (paired, same tiles, seeds {d['seeds']}): "
            f"{d['estimate']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] ({beyond})"
        )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a(
        "--config",
        type=_json_arg,
        default={},
        help="a demo trial's config (JSON or a JSON file; flat run-config keys, 'config/' "
        "prefixes accepted), for both arms; default: CPU_DEMO alone",
    )
    a(
        "--search",
        default=None,
        help="a finished search's folder (e.g. the demo's runs/augmentation-...) or one trial's "
        "run folder: 'ours' is its best trial, scored as it is (other seeds retrained), and "
        "every arm takes its config",
    )
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config value, both arms")
    a("--ours", default=CPU_DEMO["model"], help=f"our model (default {CPU_DEMO['model']})")
    a("--peer", default="smp_unet_resnet18", help="peer model (default smp_unet_resnet18)")
    a("--epochs", type=int, default=DEMO_EPOCHS, help=f"epochs (default {DEMO_EPOCHS})")
    a(
        "--peer-epochs",
        type=int,
        default=None,
        help="the peer's epochs, its schedule fitted to them (e.g. so that its CPU seconds "
        "match ours', from bench_train.py); default --epochs",
    )
    a("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per arm (default 0 1)")
    a("--arms", nargs="+", choices=["ours", "peer"], default=["ours", "peer"])
    a("--out", default="runs/bench_quality", help="run folders go here")
    add_world_arguments(p)
    a("--json", default=None, help="write the results here")
    args = p.parse_args()

    synthetic, data = load_world(args)
    truth = test_truth(data)  # (N, 224, 224) bool, test-cache order
    groups = list(data.test.groups)  # each tile's source scene (the world's test.csv `group`)
    empty = float(np.mean(~truth.reshape(len(truth), -1).any(axis=1)))
    print(
        f"test: {len(truth)} tiles of {truth.shape[1]}x{truth.shape[2]} from "
        f"{len(set(groups))} held-out scenes ({empty:.0%} without a building)"
    )
    models = {"ours": args.ours, "peer": args.peer}
    trial_dir, trial = (None, {})
    if args.search:
        trial_dir, trial = best_trial(Path(args.search))
        models["ours"] = trial["model"]
        print(f"the search's best trial: {trial_dir}", flush=True)
    base = {**CPU_DEMO, "epochs": args.epochs, **trial, **args.config, **parse_set(args.set)}
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            own = {"epochs": args.peer_epochs} if arm == "peer" and args.peer_epochs else {}
            cfg = RunConfig.from_flat({**base, "model": models[arm], "seed": seed, **own})
            print(f"== {arm}: {cfg.model}, seed {seed}", flush=True)
            reuse = trial_dir if arm == "ours" and cfg.to_flat() == trial else None
            rows.append(train_and_score(arm, cfg, Path(args.out), data, truth, groups, reuse))
    summary = summarise(rows, groups)
    print_table(rows, summary)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "base_config": base,
            "synthetic": synthetic,
            "data": data.description,
            "test_tiles": len(truth),
            "test_scenes": len(set(groups)),
            "machine": f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} torch threads",
            "search": args.search,
            "runs": rows,
            "summary": summary,
        }
        write_json(path, record, indent=2, default=float)
        print(f"wrote {path}")
    failed = [r for r in rows if r["status"] not in ("completed", "early-stopped")]
    if failed:
        names = ", ".join(f"{r['arm']} seed {r['seed']} ({r['status']})" for r in failed)
        sys.exit(f"bench_quality: {len(failed)} of {len(rows)} runs did not finish: {names}")


if __name__ == "__main__":
    main()
