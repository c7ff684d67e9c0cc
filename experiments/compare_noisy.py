"""Plain BCE vs co-teaching on noisy masks, scored on the clean held-out test split.

Same budget, same data, same seeds for both arms: the built-in synthetic world has 30% corrupted
training masks and clean test ground truth. Each arm is trained once per seed (``--seeds``, at least
3: one seed per arm cannot tell a method from a lucky initialisation); seed ``s`` of both arms
shares the split, the crops, the initialisation and the dropout and drop-path draws (co-teaching's
network f draws them as the plain run does, g from a stream of its own: at tau 0 f would be the
plain run's model, bit for bit on a CPU). Per run: the validation Dice (noisy validation
masks) and the held-out test Dice at three thresholds (0.5, the best of the validation sweep,
Youden's). Per arm and threshold rule: the mean over seeds and test images with two 95% intervals, a
cluster bootstrap over test images (source scenes) and Student's t over seeds (a bootstrap of 3
values under-covers), and co-teaching minus plain BCE as a paired difference (same seed, same tiles)
with both intervals; it is called beyond noise only when both exclude 0
(:func:`bldseg.report.compare_arms`). Prints tables and writes JSON; a re-run continues the runs it
finds: run folders are ``--out/<arm>/seed<S>-<key>``, keyed by the training data's fingerprint and
the run config, so another world (``--data-root``) or config trains its own runs instead of reusing
(or being refused by) those of the first.

The co-teaching arm's settings come from ``--tau``, ``--t-k`` and ``--granularity`` only
(``--set coteach.*`` is refused: it would reach the plain arm too, or be overwritten), and each
arm's header line prints them. Both arms' reported model is one network (a co-teaching run's
is its network f, never the better of its two on validation), so the comparison is fair. A
co-teaching arm that would drop nothing in any epoch (tile selection drops floor(batch_size *
tau) tiles per batch: none for tau < 0.25 at batch 4) is refused before anything runs; each
co-teaching run records whether it had dropped anything by its best epoch
(``dropped_by_best_epoch``, printed and in the JSON): a model saved before the first drop is
f of two networks trained as plain training.

    python experiments/compare_noisy.py --json bench/noisy.json
    python experiments/compare_noisy.py --seeds 0 1 2 3 4 --set epochs=24 --t-k 3
"""

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bldseg import metrics, stats
from bldseg.data.prepare import DEFAULT_DATA_ROOT, prepare_data
from bldseg.io import write_json
from bldseg.pipeline import PREDICT_BATCH, test_truth
from bldseg.predict import image_loader, load_checkpoint
from bldseg.report import TileScores, compare_arms, coteaching_dropped_nothing
from bldseg.train import RunConfig, fit
from bldseg.train.coteaching import first_dropping_epoch, longest_dropping_ramp
from bldseg.train.engine import eval_autocast, predict_probs, resolve_device
from bldseg.tune.cli import fixed_config

RULES = ("0.5", "sweep", "youden")
MIN_SEEDS = 3


def run_folder(out: str | Path, arm: str, flat: dict[str, Any], fingerprint: str) -> Path:
    """A run's folder, keyed by the training data's fingerprint and the run config.

    fit() resumes (or, finished, reuses) whatever run its folder holds when the config matches,
    whatever data it was trained on: a folder per arm and seed alone gave a second world the
    first world's models.
    """
    blob = json.dumps({"data": fingerprint, "config": flat}, sort_keys=True, default=str)
    key = hashlib.blake2b(blob.encode(), digest_size=5).hexdigest()
    return Path(out) / arm / f"seed{flat['seed']}-{key}"


def build_arms(base: dict[str, Any], tau: float, t_k: int | None, granularity: str) -> dict:
    """The two arms' run configs: ``base`` as is, and ``base`` with co-teaching.

    Args:
        base: Run-config values of every run (``--set`` over the CPU demo's).
        tau: ``--tau``.
        t_k: ``--t-k``; None: a quarter of the epochs (at least 1), at tile granularity at
            most the longest ramp that drops a tile per batch from the second epoch (as the tau
            search's space; a longer one trains both networks on every tile until late in it).
        granularity: ``--granularity``.
    """
    if t_k is None:
        t_k = max(1, base["epochs"] // 4)
        if granularity == "tile":
            cfg = RunConfig.from_flat({**base, "coteach.tau": tau})
            t_k = longest_dropping_ramp(cfg.coteach, cfg.batch_size, t_k)
    return {
        "bce": base,
        "coteaching": {
            **base,
            "coteach.enabled": True,
            "coteach.tau": tau,
            "coteach.t_k": t_k,
            "coteach.granularity": granularity,
        },
    }


#: The run-config keys the co-teaching arm takes from its own flags, and those flags.
COTEACH_FLAGS = {
    "coteach.tau": "--tau",
    "coteach.t_k": "--t-k",
    "coteach.granularity": "--granularity",
}


def arm_configs(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The base run config (this script's budget under ``--set``) and both arms' configs, with
    every run's config (arm x seed) validated.

    Raises:
        ValueError: A run config is refused; the message starts with the arm (``arm bce:``,
            ``arm coteaching:``).
    """
    base = fixed_config(None, sets=["epochs=16", "samples_per_epoch=384", *args.set])

    def check(name: str, flat: dict[str, Any]) -> None:
        for seed in args.seeds:
            try:
                RunConfig.from_flat({**flat, "seed": seed})
            except ValueError as e:
                raise ValueError(f"arm {name}: {e}") from e

    # the plain arm first: a bad --set is named as the plain arm's, not as co-teaching's
    check("bce", base)
    try:
        arms = build_arms(base, args.tau, args.t_k, args.granularity)
    except ValueError as e:  # at tile granularity the default ramp reads the co-teaching values
        raise ValueError(f"arm coteaching: {e}") from e
    check("coteaching", arms["coteaching"])
    idle = never_drops(RunConfig.from_flat({**arms["coteaching"], "seed": args.seeds[0]}))
    if idle:
        raise ValueError(f"arm coteaching: {idle}")
    return base, arms


def never_drops(cfg: RunConfig) -> str | None:
    """Why a co-teaching run would drop no tile or pixel in any of its epochs, or None.

    Such an arm trains two plain networks: titled co-teaching, its paired difference would
    credit co-teaching with what plain training did. The message names the run-config value
    (``run config: coteach.tau=...``, as :meth:`RunConfig.from_flat` does) and what to change.
    """
    ct, b = cfg.coteach, cfg.batch_size
    if not ct.enabled:
        return None
    tau = f"run config: coteach.tau={ct.tau:g}"
    if ct.tau <= 0:
        return f"{tau} drops nothing: co-teaching with tau 0 is plain training; use --tau > 0"
    # ranked per batch: its tiles, or every pixel of its crops (each class among itself)
    n = b if ct.granularity == "tile" else b * cfg.aug.crop_size**2
    first = first_dropping_epoch(ct, n, ct.t_k + 1)  # the ramp reaches tau at epoch t_k
    if first is None:
        remedy = (
            f"use --granularity pixel, a batch of at least {math.ceil(1 / ct.tau)} tiles "
            f"(--set batch_size=N) or --tau {1 / b:g} or more"
            if ct.granularity == "tile"
            else "use a larger --tau"
        )
        return (
            f"{tau} with {ct.granularity} granularity and batch_size {b} drops "
            f"floor({n} * {ct.tau:g}) = 0 {ct.granularity}s per batch in every epoch: the arm "
            f"would be two plain networks, not co-teaching; {remedy}"
        )
    if first >= cfg.epochs:
        return (
            f"run config: coteach.t_k={ct.t_k} with tau {ct.tau:g} drops its first "
            f"{ct.granularity} in epoch {first + 1}, after the run's {cfg.epochs} epochs: the arm "
            "would be two plain networks, not co-teaching; use --t-k "
            f"{longest_dropping_ramp(ct, n, ct.t_k)} or less (drops from epoch 2), or more epochs"
        )
    return None


def dropping_record(cfg: RunConfig, history: list[dict], best_epoch: int) -> dict[str, Any]:
    """What a run's co-teaching had dropped by its best epoch, the epoch its model is from.

    ``dropped_by_best_epoch``: whether any epoch up to it dropped a tile or pixel (its
    ``dropped_share`` > 0; None for the plain arm); ``dropped_nothing``: why it trained as plain
    training (:func:`bldseg.report.coteaching_dropped_nothing`), or None.
    """
    if not cfg.coteach.enabled:
        return {"dropped_by_best_epoch": None, "dropped_nothing": None}
    upto = [h for h in history if h["epoch"] <= best_epoch]
    return {
        "dropped_by_best_epoch": any(h.get("dropped_share", 0.0) > 0 for h in upto),
        "dropped_nothing": coteaching_dropped_nothing(cfg, history, best_epoch),
    }


def _flag_of(problem: str, args: argparse.Namespace) -> str | None:
    """The command-line flag that set the run-config value a config error names, if one did."""
    named = re.search(r"run config: ([\w.]+)=", problem)
    key = named.group(1) if named else None
    flags = {**COTEACH_FLAGS, "seed": "--seeds"}
    for item in reversed(args.set):  # the last --set of a key is the one that counts
        k = item.split("=", 1)[0].strip()
        # a value, or an unknown parameter (of a section: 'optim: unknown ... ['lrx']')
        if k == key or f"'{k.rsplit('.', 1)[-1]}'" in problem:
            return f"--set {item}"
    return flags.get(key) if key else None


def arm_header(name: str, flat: dict[str, Any]) -> str:
    """The line printed before an arm's runs: its co-teaching settings."""
    cfg = RunConfig.from_flat(flat)
    ct = cfg.coteach
    if not ct.enabled:
        return f"== arm {name}: no co-teaching (one network, loss {cfg.loss})"
    return (
        f"== arm {name}: co-teaching tau={ct.tau:g} t_k={ct.t_k} granularity={ct.granularity} "
        f"(batch_size {cfg.batch_size}, {cfg.epochs} epochs, loss {cfg.loss})"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, every run's config validated (``args.base`` and ``args.arms``, as
    :func:`arm_configs` makes them); a usage error exits with status 2 naming the flag."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", default="runs/compare_noisy", help="run folders go here")
    p.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="run-config value for every run of both arms (repeatable; not coteach.*)",
    )
    p.add_argument("--tau", type=float, default=0.3, help="co-teaching forget rate")
    p.add_argument(
        "--t-k",
        type=int,
        default=None,
        help="co-teaching ramp, in epochs (default: a quarter of the epochs, at least 1; with "
        "tile granularity at most what drops a tile per batch from the second epoch)",
    )
    p.add_argument(
        "--granularity",
        choices=("tile", "pixel"),
        default="tile",
        help="what co-teaching ranks and drops (default tile)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        help=f"training seeds, the same for both arms (at least {MIN_SEEDS}; default 0 1 2)",
    )
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    coteach = [item for item in args.set if item.split("=", 1)[0].strip().startswith("coteach.")]
    if coteach:
        # --set goes to both arms: coteach.enabled made the plain arm co-teaching, and the
        # co-teaching arm's tau and t_k went over the others
        p.error(
            f"--set {coteach[0]}: the co-teaching arm's settings are --tau, --t-k and "
            "--granularity (--set applies to both arms, the plain BCE one too)"
        )
    if args.t_k is not None and args.t_k < 1:
        p.error(f"--t-k {args.t_k}: the ramp is at least 1 epoch")
    if len(set(args.seeds)) < MIN_SEEDS:
        p.error(f"--seeds: give at least {MIN_SEEDS} different seeds, got {args.seeds}")
    if len(set(args.seeds)) < len(args.seeds):
        # a repeated seed is the same run counted twice: it narrows the interval over seeds
        p.error(f"--seeds: each seed once, got {args.seeds}")
    # Every run's config before the data or any training: a --tau out of range was found only
    # when the co-teaching arm started, after every seed of the plain arm had trained.
    try:
        args.base, args.arms = arm_configs(args)
    except ValueError as e:
        flag = _flag_of(str(e), args)
        p.error(f"{flag}: {e}" if flag else str(e))
    return args


def _fmt(iv: dict | None, signed: bool = False) -> str:
    if iv is None:
        return "–"
    return stats.format_interval(iv, signed=signed)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = prepare_data(None, data_root=args.data_root)
    truth = test_truth(data)
    groups = np.array(data.test.groups)  # source scene of each test image: the resampled unit
    ids = np.array(data.test.ids)
    device = resolve_device("auto")
    base, arms = args.base, args.arms  # validated by parse_args
    rows, failed = [], []
    tiles: dict[str, dict[str, list[TileScores]]] = {rule: {a: [] for a in arms} for rule in RULES}
    for name, flat in arms.items():
        print(arm_header(name, flat), flush=True)
        for seed in args.seeds:
            cfg = RunConfig.from_flat({**flat, "seed": seed})
            out = run_folder(args.out, name, cfg.to_flat(), data.train.fingerprint)
            r = fit(cfg, out, data=data, progress=True)
            if r.status != "completed":
                # a paired comparison needs every seed of both arms trained to the end
                failed.append(f"{name} seed {seed}: {r.status} ({r.message})")
                continue
            b = r.best
            row = {
                "run": name,
                "seed": seed,
                "run_dir": str(out),
                "status": r.status,
                "best_epoch": b["epoch"],
                "val_dice_05": b["val_dice_05"],
                "val_dice_best": b["val_dice_best"],
                "val_dice_youden": b["val_dice_youden"],
                "thr_best": b["val_thr_best"],
                "thr_widened": bool(b.get("val_thr_widened", 0)),
                "thr_youden": b["val_thr_youden"],
                # what the run cost (recorded per epoch; also for a run trained earlier):
                # co-teaching trains two networks
                "train_s": sum(h["epoch_s"] for h in r.history),
                "train_cpu_s": sum(h.get("cpu_s", float("nan")) for h in r.history),
                # a model saved before co-teaching's first drop is two plain networks' f
                **dropping_record(cfg, r.history, b["epoch"]),
            }
            # One pass over the test split; the three rules threshold the same maps, as a
            # one-member ensemble spec would (bldseg.predict.combine_members, k = 1).
            model, run_cfg, _ = load_checkpoint(out / "best.pt", device)
            amp = eval_autocast(run_cfg.precision, device)  # as bldseg predict runs it
            loader = image_loader(data.test, PREDICT_BATCH)
            probs = predict_probs(model, loader, device, amp, run_cfg.tta)
            for rule, thr in zip(RULES, (0.5, b["val_thr_best"], b["val_thr_youden"]), strict=True):
                pred = probs >= metrics.level_from_threshold(thr)
                tiles[rule][name].append(
                    TileScores(metrics.dice_per_image(pred, truth), ids, groups)
                )
                row[f"test_dice_{rule}"] = metrics.competition_score(pred, truth)
            rows.append(row)
    if failed:
        sys.exit(
            "compare_noisy: runs did not finish, no comparison made:\n  " + "\n  ".join(failed)
        )
    cols = [
        "run",
        "seed",
        "val_dice_05",
        "val_dice_best",
        "val_dice_youden",
        "thr_best",
        "thr_youden",
        *[f"test_dice_{rule}" for rule in RULES],
        "train_s",
        "train_cpu_s",
    ]
    print("\nper run (validation: noisy masks; test: clean held-out masks)")
    print("  ".join(f"{c:>15}" for c in cols))
    for row in rows:
        print(
            "  ".join(
                f"{row[c]:>15.4f}" if isinstance(row[c], float) else f"{row[c]!s:>15}" for c in cols
            )
            + ("  (sweep widened)" if row["thr_widened"] else "")
        )
    idle = [r for r in rows if r["dropped_nothing"]]
    for row in idle:
        print(f"  {row['run']} seed {row['seed']}: {row['dropped_nothing']}")
    summary = {rule: compare_arms(tiles[rule], "bce", seeds=args.seeds) for rule in RULES}
    print(
        f"\nper arm: test Dice, mean over {len(args.seeds)} seeds and the test images "
        "[95% interval over test images] [95% interval over seeds]; per-seed scores"
    )
    for rule in RULES:
        s = summary[rule]
        for arm, a in s["arms"].items():
            seeds = ", ".join(f"{v:.4f}" for v in a["per_seed"])
            print(
                f"  {rule:>6} {arm:>10}: {_fmt(a['interval'])} "
                f"{stats.format_bounds(a['seed_interval'])}   "
                f"seeds: {seeds}"
            )
        d = s["differences"]["coteaching"]
        seeds = ", ".join(f"{v:+.4f}" for v in d["per_seed"])
        iv = d["seed_interval"]
        verdict = "beyond noise" if d["beyond_noise"] else "within noise"
        print(
            f"  {rule:>6} co-teaching - bce (paired): {_fmt(d['interval'], signed=True)} "
            f"{stats.format_bounds(iv, signed=True)} ({verdict})   seeds: {seeds}"
        )
    plain_f = [r["seed"] for r in rows if r["dropped_by_best_epoch"] is False]
    if plain_f:
        # the arm as a whole drops (never_drops refused it otherwise), these runs' models not
        print(
            f"  co-teaching seed(s) {', '.join(map(str, plain_f))} dropped nothing by their best "
            "epoch: their models trained as plain training, and their share of the paired "
            "difference compares no co-teaching"
        )
    cost = {
        arm: {
            k: float(np.mean([r[k] for r in rows if r["run"] == arm]))
            for k in ("train_s", "train_cpu_s")
        }
        for arm in arms
    }
    ratio = cost["coteaching"]["train_cpu_s"] / cost["bce"]["train_cpu_s"]
    print(
        "\ncost per run, mean over seeds: "
        + "; ".join(
            f"{arm} {c['train_s']:.0f} s wall, {c['train_cpu_s']:.0f} CPU s"
            for arm, c in cost.items()
        )
        + f" (co-teaching / bce CPU: {ratio:.2f}x)"
    )
    print(
        "The first interval covers which test images were drawn, the second the training "
        f"randomness (Student's t over the {len(args.seeds)} seeds); a difference is beyond "
        "noise only when both exclude 0."
    )
    if args.json:
        record = {"runs": rows, "summary": summary, "cost": cost, "base": base}
        record["coteach"] = {
            k: v for k, v in arms["coteaching"].items() if k.startswith("coteach.")
        }
        # per run in "runs" too (dropped_by_best_epoch, dropped_nothing)
        record["coteach_seeds_that_dropped_nothing"] = plain_f
        record["data"] = data.description
        write_json(args.json, {**record, "data_fingerprint": data.train.fingerprint})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
