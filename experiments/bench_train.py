"""Test Dice against CPU seconds: the demo's model vs standard peers, side by side in one run.

Every arm trains through the same ``fit()`` with the same run config (the CPU demo's settings,
``CPU_DEMO``, for ``--epochs``): same data, crops, augmentation, schedule, batches and steps;
only the model differs. Peers are segmentation_models_pytorch UNets from random
initialisation (``pip install 'bldseg[smp]'``; ``make bench-quality`` builds a venv with them).
The arms train one after the other, never at once: on a 2-core machine a second job would
slow the first.

After every epoch the epoch's model (``last.pt``) is scored on the clean held-out test tiles
with the official metric at the epoch's validation threshold, as ``bldseg predict`` scores a
run (its autocast, TTA and memory format); that scoring is not counted in the run's time. An
arm's value at a budget of ``t`` CPU seconds is the test Dice of the checkpoint a user
stopping at ``t`` keeps, the best validation epoch finished by then (:mod:`bldseg.curves`).
CPU seconds are the training process's (``time.process_time``, all torch threads, validation
included); wall seconds are printed beside them. The 95% intervals are cluster bootstraps over
the test tiles' source scenes; ``ours - peer`` is paired on the same tiles.

    python experiments/bench_train.py --json bench/train.json
    python experiments/bench_train.py --peers smp_unet_mobilenetv3_small smp_unet_resnet18
    python experiments/bench_train.py --peers smp_unet_mobilenetv3_small_075_narrow \
        --ours-epochs 30     # about equal CPU: our arm runs over the peer's 20-epoch time

With ``--ours-epochs`` a OneCycle-like schedule spans our arm's own epochs. Schedule-free
AdamW (the CPU settings) has no schedule but its warm-up, a share of the run's steps: our arm
then keeps the ``--epochs`` run's warm-up length in steps (``sched.warmup_steps``), so both
arms see the same learning rate at every step (:func:`same_warmup`).

Prints a table, writes JSON and a plot (``--plot``, default beside the JSON). Runs are kept
under ``--out`` keyed by the data, the config and the torch thread count (CPU seconds measured
with other threads are not comparable), so a rerun reuses finished runs without training them:
their recorded times, and their test scores when ``test_curve.json`` records the scoring this
version does (:func:`scoring_spec`: the scoring code's version, the device, the autocast, TTA,
the memory format and the threads). Scores recorded otherwise are computed again from the
epoch's weights, which every run keeps in ``epoch_weights/`` (one state dict per epoch, of the
network validation chose; 4 bytes a parameter); a run without them must be trained again.
A reused arm's CPU seconds were measured when it was trained, under that moment's load: the
table marks it ``(reused)`` and the JSON records per arm (``origin``) how many of its epochs
this call trained and when its last epoch finished.

Every arm's config is validated, and every model built once, before the data is prepared or
anything trains: a peer this Python cannot build (an smp model without
segmentation_models_pytorch) stops the script at once with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bldseg import metrics, stats
from bldseg.curves import EpochPoint, behind_at_epoch_ends, cumulative, epoch_at, first_reaching
from bldseg.io import write_json
from bldseg.models import create_model
from bldseg.pipeline import test_truth
from bldseg.predict import image_loader
from bldseg.train import RunConfig, fit
from bldseg.train.engine import (
    eval_autocast,
    eval_weights,
    load_state,
    predict_probs,
    resolve_device,
    steps_per_epoch,
    to_run_memory_format,
)
from bldseg.tune.cli import CPU_DEMO, DEFAULT_EPOCHS, parse_set

# The sibling benchmark's helpers (this folder is on sys.path when a script here runs).
from bench_quality import _run_key, add_world_arguments, build_arms, check_models  # isort: skip
from bench_quality import load_world  # isort: skip

CURVE_FILE = "test_curve.json"  # the scoring (scoring_spec) and per epoch: threshold, per-tile Dice
EPOCH_WEIGHTS = "epoch_weights"  # per epoch: the weights its test scores were computed from
#: The scoring code's version, recorded with every curve: raise it whenever the way an epoch's
#: model is scored changes, and curves scored before are scored again from the epoch weights.
#: 2: under the run's autocast and TTA, with its memory format (channels-last), as predict.
SCORING_VERSION = 2


def scoring_spec(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """What an epoch's test scores depend on besides its weights, as ``test_curve.json``
    records it: a curve recorded with another spec is scored again."""
    amp = eval_autocast(cfg.precision, device)
    return {
        "version": SCORING_VERSION,
        "device": device.type,
        "precision": cfg.precision,
        "autocast": None if amp is None else str(amp).removeprefix("torch."),
        "tta": cfg.tta,
        "channels_last": cfg.channels_last,
        # the threads the run trained with (its CPU seconds) and was scored with
        "torch_threads": torch.get_num_threads(),
    }


def run_folder(arm: str, cfg: RunConfig, out: Path, fingerprint: str) -> Path:
    """An arm's run folder: keyed by the data, the config and the torch thread count, so runs
    timed with other threads are never mixed into one table."""
    key = _run_key(fingerprint, {**cfg.to_flat(), "torch_threads": torch.get_num_threads()})
    return out / f"{arm}-seed{cfg.seed}-{key}"


def _read_curve(path: Path, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The recorded per-epoch scores when they were scored as ``spec`` says; else []."""
    if not path.is_file():
        return []
    recorded = json.loads(path.read_text())
    # a bare list: a curve of a version before the scoring was recorded
    scoring = recorded.get("scoring") if isinstance(recorded, dict) else None
    if scoring != spec:
        print(f"{path}: scored as {scoring}, not as {spec}: scoring its epochs again", flush=True)
        return []
    return recorded["epochs"]


def _save_weights(weights: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(weights, tmp)
    os.replace(tmp, path)  # a killed run leaves no half-written epoch behind


def train_curve(
    arm: str, cfg: RunConfig, out: Path, data, truth: np.ndarray
) -> tuple[Path, list[dict[str, Any]], list[dict[str, Any]]]:
    """Trains one arm (or reads a finished run) and scores every epoch's model on the test tiles.

    Epochs whose recorded scores are missing or were scored otherwise (:func:`scoring_spec`)
    are scored from their weights in ``epoch_weights/``.

    Returns:
        The run folder, its history (``cpu_s``, ``epoch_s``, validation per epoch) and the
        per-epoch test scores (``epoch``, ``threshold``, ``per_tile`` with NaN as None).

    Raises:
        RuntimeError: The run did not complete, or an epoch has neither valid scores nor
            weights (a run trained outside this benchmark or before it kept them).
    """
    run_dir = run_folder(arm, cfg, out, data.train.fingerprint)
    curve_path = run_dir / CURVE_FILE
    device = resolve_device(cfg.device)
    spec = scoring_spec(cfg, device)
    curve = _read_curve(curve_path, spec)
    # Built as bldseg predict builds it (load_checkpoint): the run's memory format, in which
    # bf16 convolutions round differently, so the scores are predict's to the last level.
    model = create_model(cfg.model, **cfg.model_kwargs()).to(device)
    model = to_run_memory_format(model, cfg, device).eval()
    test_loader = image_loader(data.test, 32)
    amp = eval_autocast(cfg.precision, device)

    def weights_path(epoch: int) -> Path:
        return run_dir / EPOCH_WEIGHTS / f"epoch{epoch:03d}.pt"

    def score_weights(row: dict[str, Any], weights: dict[str, torch.Tensor]) -> dict[str, Any]:
        model.load_state_dict(weights)  # copied into the parameters: their layout stays
        # as bldseg predict scores it: under the run's autocast and TTA, as validation chose
        # its threshold
        probs = predict_probs(model, test_loader, device, amp, cfg.tta)  # (N, S, S) uint8
        thr = float(row["val_thr_best"])
        per_tile = metrics.dice_per_image(probs >= metrics.level_from_threshold(thr), truth)
        return {
            "epoch": int(row["epoch"]),
            "threshold": thr,
            "per_tile": [None if np.isnan(v) else float(v) for v in per_tile],
        }

    def save_curve() -> None:
        write_json(curve_path, {"scoring": spec, "epochs": sorted(curve, key=lambda c: c["epoch"])})

    def score(row: dict[str, Any], folder: Path) -> None:
        # The epoch's weights are in last.pt (best.pt only when validation improved).
        # Co-teaching trains two networks: the run's model is f (runs from before it was fixed
        # recorded the one validation chose, val_net).
        chosen = "fg".index(row.get("val_net", "f"))
        weights = eval_weights(load_state(folder / "last.pt", device))[chosen]
        _save_weights(weights, weights_path(int(row["epoch"])))
        # a resumed run trains the epochs after its last.pt again: their old scores go
        curve[:] = [c for c in curve if c["epoch"] < row["epoch"]]
        curve.append(score_weights(row, weights))
        save_curve()

    result = fit(cfg, run_dir, data=data, resume=True, progress=True, on_epoch_end=score)
    if result.status != "completed":
        raise RuntimeError(f"{arm} ({cfg.model}): {result.status}: {result.message}")
    if any("cpu_s" not in h for h in result.history):
        raise RuntimeError(f"{run_dir}: its history has no cpu_s (an older run); delete it")
    scored = {c["epoch"] for c in curve}
    for row in result.history:
        if row["epoch"] in scored:
            continue
        path = weights_path(int(row["epoch"]))
        if not path.is_file():
            raise RuntimeError(
                f"{run_dir}: epoch {row['epoch']} has no test scores of this version and no "
                f"weights ({path}) to score (a run trained outside this benchmark or before it "
                "kept them); delete the folder to retrain it"
            )
        curve.append(score_weights(row, load_state(path, device)))
        save_curve()
    curve.sort(key=lambda c: c["epoch"])
    return run_dir, result.history, curve


def _epochs_on_disk(run_dir: Path) -> int:
    """Epochs a run folder holds before this call trains it (``history.json``; 0 if none)."""
    path = run_dir / "history.json"
    return len(json.loads(path.read_text())) if path.is_file() else 0


def origin(run_dir: Path, before: int, after: int, call_s: float) -> dict[str, Any]:
    """Whether an arm was trained by this call or read from an earlier one, and when.

    Args:
        before: Epochs the run folder held before this call; ``after``: after it.
        call_s: Seconds this call spent on the arm (training and scoring).

    Returns:
        ``status`` ("trained": every epoch by this call; "reused": none; "resumed": some),
        ``epochs_trained_now``, ``epochs_reused``, ``last_epoch_finished`` (``last.pt``'s
        modification time, ISO 8601: a finished run's ``last.pt`` is not written again) and
        ``call_s``.
    """
    reused = min(before, after)
    status = "reused" if reused == after else "trained" if reused == 0 else "resumed"
    mtime = (run_dir / "last.pt").stat().st_mtime
    return {
        "status": status,
        "epochs_trained_now": after - reused,
        "epochs_reused": reused,
        "last_epoch_finished": datetime.fromtimestamp(mtime).astimezone().isoformat("T", "seconds"),
        "call_s": call_s,
    }


def same_warmup(base: dict[str, Any], epochs: int, data) -> dict[str, Any]:
    """Run-config values that give an arm of ``epochs`` epochs the warm-up of ``base``'s run.

    Only for schedule-free AdamW, whose warm-up (``sched.warmup_frac`` of the run's steps) is
    the one part of it that depends on the run's length; {} where the warm-up is already a
    fixed number of steps, the epochs are the same, or the schedule is another.
    """
    cfg = RunConfig.from_flat(base)
    if cfg.sched.name != "schedulefree" or cfg.sched.warmup_steps or epochs == cfg.epochs:
        return {}
    # the same product as fit()'s warm-up, int(frac * total_steps), for base's run
    steps = int(cfg.sched.warmup_frac * (steps_per_epoch(cfg, data) * cfg.epochs))
    return {"sched.warmup_steps": steps} if steps else {}


def _tiles(entry: dict[str, Any]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in entry["per_tile"]])


def arm_points(history: list[dict], curve: list[dict], clock: str) -> list[EpochPoint]:
    """The run's epochs as :class:`EpochPoint` on the ``cpu_s`` or ``epoch_s`` clock."""
    by_epoch = {c["epoch"]: c for c in curve}
    seconds = cumulative([h[clock] for h in history])
    return [
        EpochPoint(
            h["epoch"], s, h["val_dice_best"], float(np.nanmean(_tiles(by_epoch[h["epoch"]])))
        )
        for h, s in zip(history, seconds, strict=True)
    ]


def behind_with_intervals(
    ours: dict[str, Any], peer: dict[str, Any], groups: list
) -> dict[str, Any]:
    """Where ours is behind ``peer`` at an epoch end of either arm, each with its interval.

    ``ours`` and ``peer`` are arms of ``main()`` (``cpu``: :class:`EpochPoint` list, ``tiles``:
    per-epoch per-tile test Dice). Every moment :func:`behind_at_epoch_ends` finds gets the
    same paired interval over scenes as the budgets: a shortfall of a few thousandths at one
    epoch end is often within what the test tiles can tell apart.

    Returns:
        ``compared`` (moments), ``behind`` (per moment: ``cpu_s``, both kept epochs, ``diff``
        and its ``low``/``high``) and ``interval_below_zero`` (how many lie wholly below 0).
    """
    compared, points = behind_at_epoch_ends(ours["cpu"], peer["cpu"])
    rows = []
    for t, _ in points:
        ours_k, peer_k = epoch_at(ours["cpu"], t), epoch_at(peer["cpu"], t)
        d = stats.paired_difference(
            ours["tiles"][ours_k.epoch], peer["tiles"][peer_k.epoch], groups
        )
        rows.append(
            {
                "cpu_s": t,
                "ours_epoch": ours_k.epoch,
                "peer_epoch": peer_k.epoch,
                "diff": d.estimate,
                "low": d.low,
                "high": d.high,
                "clusters": d.clusters,  # below 2: no interval, printed as such
            }
        )
    below = sum(r["high"] < 0 for r in rows)
    return {"compared": compared, "behind": rows, "interval_below_zero": below}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--ours", default=CPU_DEMO["model"], help=f"our model (default {CPU_DEMO['model']})")
    a(
        "--peers",
        nargs="+",
        default=["smp_unet_mobilenetv3_small"],
        help="peer models (default smp_unet_mobilenetv3_small)",
    )
    a("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"epochs (default {DEFAULT_EPOCHS})")
    a(
        "--ours-epochs",
        type=int,
        default=None,
        help="epochs of our arm only (default --epochs): e.g. the epochs that take a peer's CPU "
        "time, for an equal-budget comparison; a schedule spans them, schedule-free's warm-up "
        "keeps the --epochs run's length",
    )
    a("--seed", type=int, default=0)
    a("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config value, all arms")
    a(
        "--at",
        type=float,
        nargs="+",
        default=None,
        help="CPU-second budgets of the table (default: quarters of the longest arm's time)",
    )
    a("--out", default="runs/bench_train", help="run folders go here")
    add_world_arguments(p)
    a("--json", default="bench/train.json", help="write the results here")
    a("--plot", default=None, help="the curves' PNG (default: the JSON's path with .png)")
    args = p.parse_args(argv)
    # --ours-epochs 0 fell back to --epochs unseen (0 is false), and the plot's title too
    for flag in ("epochs", "ours_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")
    # Before the data or any training: a peer that cannot be built here must not be found
    # after our arm has trained for minutes.
    check_models(p, [("--ours", args.ours), *(("--peers", m) for m in args.peers)], "bench-train")

    synthetic, data = load_world(args)
    truth = test_truth(data)  # (N, 224, 224) bool, test-cache order
    groups = list(data.test.groups)
    print(f"test: {len(truth)} tiles from {len(set(groups))} held-out scenes")
    base = {**CPU_DEMO, "epochs": args.epochs, "seed": args.seed, **parse_set(args.set)}
    arms = {"ours": args.ours, **{f"peer{i + 1}": m for i, m in enumerate(args.peers)}}
    pinned: dict[str, dict[str, Any]] = {}
    flats = {}
    for arm, model in arms.items():
        ours = arm == "ours" and args.ours_epochs is not None
        epochs = args.ours_epochs if ours else base["epochs"]
        try:
            pinned[arm] = {"epochs": epochs, **same_warmup(base, epochs, data)}
        except ValueError as e:  # a --set value the run config refuses
            p.error(str(e))
        flats[arm] = {**base, "model": model, **pinned[arm]}
    cfgs, params = build_arms(p, flats)  # every config valid, every model built, before fit

    runs: dict[str, dict[str, Any]] = {}
    for arm, model in arms.items():
        cfg = cfgs[arm]
        warm = {k: v for k, v in pinned[arm].items() if k != "epochs"}
        print(f"== {arm}: {model}" + (f", {warm}" if warm else ""), flush=True)
        before = _epochs_on_disk(run_folder(arm, cfg, Path(args.out), data.train.fingerprint))
        t0 = time.perf_counter()
        run_dir, history, curve = train_curve(arm, cfg, Path(args.out), data, truth)
        runs[arm] = {
            "model": model,
            "params": params[model],
            "run_dir": str(run_dir),
            "config_beyond_base": pinned[arm],
            "scoring": scoring_spec(cfg, resolve_device(cfg.device)),
            "origin": origin(run_dir, before, len(history), time.perf_counter() - t0),
            "cpu": arm_points(history, curve, "cpu_s"),
            "wall": arm_points(history, curve, "epoch_s"),
            "tiles": {c["epoch"]: _tiles(c) for c in curve},
        }

    longest = max(r["cpu"][-1].seconds for r in runs.values())
    budgets = sorted(args.at) if args.at else [longest * q for q in (0.25, 0.5, 0.75, 1.0)]
    table = []
    for t in budgets:
        row: dict[str, Any] = {"cpu_s": t}
        kept = {arm: epoch_at(r["cpu"], t) for arm, r in runs.items()}
        for arm, k in kept.items():
            if k is None:
                row[arm] = None
                continue
            iv = stats.bootstrap_mean(runs[arm]["tiles"][k.epoch], groups)
            row[arm] = {
                "epoch": k.epoch,
                "done": t >= runs[arm]["cpu"][-1].seconds,
                **iv.to_dict(),
            }
        for arm in list(arms)[1:]:
            if kept["ours"] is not None and kept[arm] is not None:
                d = stats.paired_difference(
                    runs["ours"]["tiles"][kept["ours"].epoch],
                    runs[arm]["tiles"][kept[arm].epoch],
                    groups,
                )
                row[f"ours-{arm}"] = d.to_dict()
        table.append(row)

    # The table: each arm's kept checkpoint at each budget.
    print("\ntest Dice [95% CI over scenes] of the checkpoint kept at each CPU-second budget")
    print(f"(torch threads {torch.get_num_threads()}; '*' = the arm had finished by then)")
    names = {arm: f"{arm} {r['model']} ({r['params'] / 1e6:.2f}M)" for arm, r in runs.items()}
    labels = {arm: arm for arm in arms}
    listed = dict(names)
    for arm, r in runs.items():
        o = r["origin"]
        if o["status"] != "trained":
            labels[arm] = f"{arm} ({o['status']})"
            names[arm] += f" ({o['status']})"  # in the summary lines and the plot's legend
            listed[arm] += (
                f" ({o['status']}: {o['epochs_reused']} epochs trained by an earlier call, "
                f"the last finished {o['last_epoch_finished']})"
            )
    for arm in arms:
        print(f"  {listed[arm]}")
    if any(r["origin"]["status"] != "trained" for r in runs.values()):
        print(
            "  (reused/resumed epochs were timed when they were trained, under that moment's "
            "load; delete the arm's run folder under --out to time it again now)"
        )
    head = f"{'CPU s':>7} " + " ".join(f"{labels[arm]:>27}" for arm in arms)
    head += " " + " ".join(f"{'ours-' + arm:>27}" for arm in list(arms)[1:])
    print(head + "\n" + "-" * len(head))
    for row in table:
        cells = []
        for arm in arms:
            v = row[arm]
            if v is None:
                cells.append(f"{'(no epoch yet)':>27}")
            else:
                mark = "*" if v["done"] else " "
                iv = stats.format_interval(v, digits=3).replace(", ", ",")
                cells.append(f"{iv} e{v['epoch']:<2}{mark:>2}")
        for arm in list(arms)[1:]:
            d = row.get(f"ours-{arm}")
            cells.append(
                f"{'-':>27}"
                if d is None
                else stats.format_interval(d, signed=True, digits=3).replace(", ", ",") + "    "
            )
        print(f"{row['cpu_s']:>7.0f} " + " ".join(f"{c:>27}" for c in cells))

    print()
    reach = {}
    for arm, r in runs.items():
        cpu, wall = r["cpu"][-1].seconds, r["wall"][-1].seconds
        final = epoch_at(r["cpu"], cpu)
        print(
            f"{names[arm]}: {len(r['cpu'])} epochs in {cpu:.0f} CPU s ({wall:.0f} s wall), "
            f"{cpu / len(r['cpu']):.1f} CPU s/epoch; kept epoch {final.epoch}: "
            f"test Dice {final.test:.4f}"
        )
    for arm in list(arms)[1:]:
        peer_final = epoch_at(runs[arm]["cpu"], runs[arm]["cpu"][-1].seconds)
        got = first_reaching(runs["ours"]["cpu"], peer_final.test)
        reach[arm] = None if got is None else {"epoch": got.epoch, "cpu_s": got.seconds}
        if got is None:
            print(f"ours never reaches {arm}'s final test Dice {peer_final.test:.4f}")
        else:
            total = runs[arm]["cpu"][-1].seconds
            print(
                f"ours reaches {arm}'s final test Dice {peer_final.test:.4f} at epoch {got.epoch}, "
                f"{got.seconds:.0f} CPU s = {got.seconds / total:.0%} of {arm}'s {total:.0f}"
            )

    # Every epoch end of either arm, not only the table's budgets: a stretch where ours is
    # behind cannot fall between them unseen.
    behind = {}
    for arm in list(arms)[1:]:
        behind[arm] = behind_with_intervals(runs["ours"], runs[arm], groups)
        rows, compared = behind[arm]["behind"], behind[arm]["compared"]
        if rows:
            worst = min(rows, key=lambda r: r["diff"])
            print(
                f"ours is behind {arm} at {len(rows)} of {compared} epoch ends (most: "
                f"{worst['diff']:+.3f} {stats.format_bounds(worst, signed=True, digits=3)} at "
                f"{worst['cpu_s']:.0f} CPU s); the paired 95% interval lies below zero at "
                f"{behind[arm]['interval_below_zero']} of them"
            )
            for r in rows:
                print(
                    f"  {r['cpu_s']:>6.0f} CPU s: ours e{r['ours_epoch']} - {arm} "
                    f"e{r['peer_epoch']} = {r['diff']:+.4f} {stats.format_bounds(r, signed=True)}"
                )
        else:
            print(f"ours is at or above {arm} at all {compared} epoch ends")

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    plot = Path(args.plot) if args.plot else path.with_suffix(".png")
    if args.ours_epochs is not None and args.ours_epochs != base["epochs"]:
        same_lr = any("sched.warmup_steps" in r["config_beyond_base"] for r in runs.values())
        title = "Quality against CPU time, same data, crops"
        title += " and LR at every step,\n" if same_lr else ",\n"
        title += f"ours over {args.ours_epochs} epochs, peers over {base['epochs']}"
    else:
        title = "Quality against CPU time, same data, crops and schedule"
    _plot(runs, names, plot, title)
    record = {
        "base_config": base,
        "synthetic": synthetic,
        "data": data.description,
        "test_tiles": len(truth),
        "test_scenes": len(set(groups)),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"{torch.get_num_threads()} torch threads",
        "arms": {
            arm: {
                "model": r["model"],
                "params": r["params"],
                "run_dir": r["run_dir"],
                "config_beyond_base": r["config_beyond_base"],
                "scoring": r["scoring"],
                "origin": r["origin"],
                "epochs": [
                    {
                        "epoch": c.epoch,
                        "cpu_s": c.seconds,
                        "wall_s": w.seconds,
                        "val_dice": c.val,
                        "test_dice": c.test,
                    }
                    for c, w in zip(r["cpu"], r["wall"], strict=True)
                ],
            }
            for arm, r in runs.items()
        },
        "budgets": table,
        "ours_reaches_peer_final": reach,
        "behind_at_epoch_ends": behind,
        "plot": str(plot),
    }
    write_json(path, record)
    print(f"wrote {path} and {plot}")


def _plot(runs: dict[str, dict[str, Any]], names: dict[str, str], path: Path, title: str) -> None:
    """Kept checkpoint's test Dice against CPU seconds, one step line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, r in runs.items():
        xs = [p.seconds for p in r["cpu"]]
        ys = [epoch_at(r["cpu"], x).test for x in xs]
        ax.step(xs, ys, where="post", marker="o", ms=3, label=names[arm])
    ax.set_xlabel("CPU seconds (training process, validation included)")
    ax.set_ylabel("test Dice of the kept checkpoint")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
