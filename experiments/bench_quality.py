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
``ours - peer`` is paired (seed ``s`` of ours with seed ``s`` of the peer, tile by tile) and
carries two intervals, as ``compare_noisy.py`` does (:func:`bldseg.report.compare_arms`): one
over the test images and one over the seeds (Student's t over the per-seed differences); it is
called beyond noise only when both exclude 0 on the same side, so a difference whose sign flips
from seed to seed is not. One seed can never be beyond noise (its interval over seeds is
unbounded); with two the t interval is wide: give 3 or more seeds for a verdict. Prints a table
and writes JSON. Wall times are of whatever else the machine was running too: quality is the
result here.

    python experiments/bench_quality.py --seeds 0 1 --json bench/quality.json
    python experiments/bench_quality.py --search runs/augmentation-20261202-012605  # the demo's
    python experiments/bench_quality.py --config best_trial.json      # a demo trial's config
    python experiments/bench_quality.py --peer smp_unet_efficientnet_b0 --seeds 0
    python experiments/bench_quality.py --search runs/... --peer-epochs 3  # equal CPU time

``ep`` in the table is the best epoch / the epochs trained; ``CPU s`` the training process's
CPU seconds (all torch threads; NaN for a run trained before they were recorded). With
``--peer-epochs`` the peer trains fewer (or more) epochs on its own full schedule: the
comparison at an equal CPU budget rather than equal steps.

With ``--search`` the "ours" run of the trial's seed is the search's own best trial, read as it
is: the best of N trials by validation Dice, trained with the search's ``cpus_per_trial``
threads (its times are not this process's). The table and the JSON label it so
(``selection``); it is not an arm trained like the peer, and its seed's pair in ``ours - peer``
carries that selection.

``--epochs``, when given, sets every arm's epochs over the trial's (or ``--config``'s), as a
command-line option goes over a config file; the trial's seed of "ours" is then trained again
with the trial's config for those epochs (the script says so), not read from the trial's run.

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
from bldseg.models import create_model
from bldseg.pipeline import test_truth
from bldseg.predict import image_loader, load_checkpoint
from bldseg.report import TileScores, compare_arms
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


def check_models(
    parser: argparse.ArgumentParser, models: list[tuple[str, str]], make_target: str
) -> None:
    """Stops (``parser.error``: status 2) before any data or training when a model is not one
    this Python can build: an smp peer without segmentation_models_pytorch, or a name the
    registry does not know. Checked for every arm first, so a missing peer is not found after
    our arm has trained for minutes.

    Args:
        models: ``(flag, model)`` pairs: the flag that named each model, e.g.
            ``("--peer", "smp_unet_resnet18")``.
        make_target: The make target whose venv (``.venv-peers``) has the peers.
    """
    from bldseg.models import model_name_problem
    from bldseg.models.smp import smp_available

    for flag, name in models:
        if name.startswith("smp_") and not smp_available():
            parser.error(
                f"{flag} {name} needs segmentation_models_pytorch, which {sys.executable} does "
                f"not have: install the smp extra: pip install 'bldseg[smp]' (or make "
                f"{make_target}, which uses .venv-peers)"
            )
        problem = model_name_problem(name)
        if problem is not None:
            parser.error(f"{flag} {name} {problem}")


def build_arms(
    parser: argparse.ArgumentParser, flats: dict[str, dict[str, Any]]
) -> tuple[dict[str, RunConfig], dict[str, int]]:
    """Every arm's run config, validated, and every model built once, before any training.

    Args:
        flats: Arm label (named in errors) -> its flat run config.

    Returns:
        The run configs by label, and each model's parameter count by model name.
    """
    cfgs: dict[str, RunConfig] = {}
    params: dict[str, int] = {}
    for label, flat in flats.items():
        try:
            cfg = RunConfig.from_flat(flat)
            if cfg.model not in params:  # built here, so a model that cannot be fails now
                model = create_model(cfg.model, **cfg.model_kwargs())
                params[cfg.model] = sum(p.numel() for p in model.parameters())
        except (ValueError, ImportError) as e:
            parser.error(f"{label}: {e}")
        cfgs[label] = cfg
    return cfgs, params


def _search_record(folder: Path) -> dict[str, Any]:
    """The search's ``bldseg_search.json`` in ``folder`` or up to two folders above it, or {}."""
    from bldseg.tune.runner import META_FILE

    for d in (folder, folder.parent, folder.parent.parent):
        if (d / META_FILE).is_file():
            return json.loads((d / META_FILE).read_text())
    return {}


def selection_label(selection: dict[str, Any]) -> str:
    """``best of N trials, cpus_per_trial=c`` (each part only where known)."""
    trials = selection.get("trials")
    what = f"best of {trials} trials" if trials else "a search's trial"
    cpus = selection.get("cpus_per_trial")
    return what + (f", cpus_per_trial={cpus:g}" if cpus is not None else "")


def best_trial(search_dir: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """The best usable trial of a finished search: its run folder, its full flat config, and
    how it was chosen.

    Returns:
        ``(run folder, flat config, selection)``; ``selection`` has ``trials`` (how many it
        was the best of; None for a trial's folder given directly), ``cpus_per_trial`` (the
        threads it trained with; None where the search left no record) and ``label``.

    Raises:
        FileNotFoundError: No ``trials.csv`` (the search did not finish) or no checkpoint.
        ValueError: No trial completed or was stopped early with a model.
    """
    from bldseg.tune.runner import METRIC, USABLE

    def selection(trials: int | None, folder: Path) -> dict[str, Any]:
        spec = _search_record(folder).get("spec", {})
        out = {"trials": trials, "cpus_per_trial": spec.get("cpus_per_trial")}
        return {**out, "label": selection_label(out)}

    if (search_dir / "best.pt").is_file() and (search_dir / "summary.json").is_file():
        # One trial's run folder (e.g. of an interrupted search, which has no trials.csv).
        _, cfg, _ = load_checkpoint(search_dir / "best.pt")
        return search_dir, cfg.to_flat(), selection(None, search_dir)
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
    return run_dir, cfg.to_flat(), selection(len(table), search_dir)


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
    selection: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Trains one run (or reuses a finished one) and scores it on the test tiles.

    Args:
        run_dir: An existing run of exactly ``cfg`` (the search's best trial); default a new
            folder under ``out`` keyed by the data and the config.
        selection: How ``run_dir`` was chosen (:func:`best_trial`), recorded in the row.

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
    if selection is not None:
        # Not a like-for-like arm: chosen as the best of several, timed with other threads.
        row["selection"] = selection
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


def _per_tile(row: dict) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in row["per_tile"]], dtype=np.float64)


def _tiles(rows: list[dict], seeds: list[int]) -> np.ndarray:
    """Per-tile Dice of the given rows' seeds, concatenated in seed order (NaN kept)."""
    by_seed = {r["seed"]: r for r in rows}
    return np.concatenate([_per_tile(by_seed[s]) for s in seeds])


def summarise(
    rows: list[dict], groups: list[str], tile_ids: list[str] | None = None
) -> dict[str, Any]:
    """Each arm over its seeds, and ours - peer paired on the same tiles and seeds.

    The difference is :func:`bldseg.report.compare_arms`'s (peer as the baseline): an interval
    over the test images (seeds pooled, source scenes resampled) and one over the seeds, and
    ``beyond_noise`` only when both exclude 0 on the same side. Pooling the seeds and
    resampling scenes alone called a difference whose sign flips between seeds beyond noise.

    Args:
        rows: :func:`train_and_score` rows; those without ``per_tile`` (failed runs) are left
            out.
        groups: Source scene of each test tile.
        tile_ids: Each test tile's id (default: its position).
    """
    ok = [r for r in rows if "per_tile" in r]
    arms = {a: [r for r in ok if r["arm"] == a] for a in ("ours", "peer")}
    out: dict[str, Any] = {}
    for arm, rs in arms.items():
        if rs:
            seeds = [r["seed"] for r in rs]
            per_seed = [r["test_dice"]["estimate"] for r in rs]
            out[arm] = {
                "seeds": seeds,
                "test_dice": stats.bootstrap_mean(_tiles(rs, seeds), groups * len(seeds)).to_dict(),
                "test_dice_per_seed": per_seed,
                "seed_interval": stats.mean_interval(per_seed).to_dict(),
            }
    common = sorted({r["seed"] for r in arms["ours"]} & {r["seed"] for r in arms["peer"]})
    if common:
        ids = np.array([str(i) for i in (range(len(groups)) if tile_ids is None else tile_ids)])
        image_ids = np.array([str(g) for g in groups])

        def scores(arm: str) -> list[TileScores]:
            # seed order: compare_arms pairs the i-th run of an arm with the baseline's i-th
            by_seed = {r["seed"]: r for r in arms[arm]}
            return [TileScores(_per_tile(by_seed[s]), ids, image_ids) for s in common]

        compared = compare_arms({"peer": scores("peer"), "ours": scores("ours")}, "peer")
        out["ours_minus_peer"] = {"seeds": common, **compared["differences"]["ours"]}
    selected = [r for r in arms["ours"] if "selection" in r]
    if selected:
        out["ours_selection"] = {str(r["seed"]): r["selection"]["label"] for r in selected}
    return out


def _fmt(iv: dict) -> str:
    return stats.format_interval(iv)


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
            + (f"  ({r['selection']['label']})" if "selection" in r else "")
        )
    if any("selection" in r for r in rows):
        print(
            "(a run marked 'best of N trials' is the search's own trial, chosen among N by "
            "validation Dice and timed with its threads: not an arm trained like the peer)"
        )
    print()
    for arm in ("ours", "peer"):
        if arm in summary:
            s = summary[arm]
            iv = s["seed_interval"]
            print(
                f"{arm} over seeds {s['seeds']}: test Dice {_fmt(s['test_dice'])} "
                f"{stats.format_bounds(iv)} over seeds"
            )
    if "ours_minus_peer" in summary:
        d = summary["ours_minus_peer"]
        tiles, seeds = d["interval"], d["seed_interval"]
        verdict = "beyond noise" if d["beyond_noise"] else "within noise"
        per_seed = ", ".join(f"{v:+.4f}" for v in d["per_seed"])
        print(
            f"ours - peer (paired, same tiles, seeds {d['seeds']}): "
            f"{stats.format_interval(tiles, signed=True)} over test "
            f"images, {stats.format_bounds(seeds, signed=True)} over seeds ({verdict}); "
            f"per seed: {per_seed}"
        )
        print(
            "A difference is beyond noise only when both intervals exclude 0 on the same side "
            "(the test images drawn, and the training seed)."
        )
        for seed, label in summary.get("ours_selection", {}).items():
            print(f"ours seed {seed} is the search's {label}: its pair carries that selection")


def main(argv: list[str] | None = None) -> None:
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
    a(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every arm, over the --search trial's and --config's (default: theirs, "
        f"else {DEMO_EPOCHS})",
    )
    a(
        "--peer-epochs",
        type=int,
        default=None,
        help="the peer's epochs, its schedule fitted to them (e.g. so that its CPU seconds "
        "match ours', from bench_train.py); default: the arms' epochs (--epochs)",
    )
    a("--seeds", type=int, nargs="+", default=[0, 1], help="seeds per arm (default 0 1)")
    a("--arms", nargs="+", choices=["ours", "peer"], default=["ours", "peer"])
    a("--out", default="runs/bench_quality", help="run folders go here")
    add_world_arguments(p)
    a("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if len(set(args.seeds)) < len(args.seeds):
        # a repeated seed is the same run counted twice: it narrows the interval over seeds
        p.error(f"--seeds: each seed once, got {args.seeds}")
    # --peer-epochs 0 fell back to the arms' epochs unseen (0 is false)
    for flag in ("epochs", "peer_epochs"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1, got {value}")

    models = {"ours": args.ours, "peer": args.peer}
    flags = {"ours": "--ours", "peer": "--peer"}
    trial_dir, trial, selection = (None, {}, None)
    if args.search:
        trial_dir, trial, selection = best_trial(Path(args.search))
        models["ours"] = trial["model"]
        flags["ours"] = f"--search {args.search}: its best trial's model"
        print(f"the search's best trial ({selection['label']}): {trial_dir}", flush=True)
    check_models(p, [(flags[arm], models[arm]) for arm in args.arms], "bench-quality")
    # A given --epochs goes over the trial's and --config's epochs, as a command-line option
    # goes over a config file (the trial's own epochs silently won); --set over everything.
    epochs = {} if args.epochs is None else {"epochs": args.epochs}
    base = {**CPU_DEMO, "epochs": DEMO_EPOCHS, **trial, **args.config, **epochs}
    base |= parse_set(args.set)
    peer_epochs = {} if args.peer_epochs is None else {"epochs": args.peer_epochs}
    # Every run's config, and each model built once, before the data or any training.
    cfgs, _ = build_arms(
        p,
        {
            f"{arm} seed {seed}": {
                **base,
                "model": models[arm],
                "seed": seed,
                **(peer_epochs if arm == "peer" else {}),
            }
            for seed in args.seeds
            for arm in args.arms
        },
    )
    if trial_dir is not None and "ours" in args.arms and trial["seed"] in args.seeds:
        flat = cfgs[f"ours seed {trial['seed']}"].to_flat()
        if changed := [k for k in flat if flat[k] != trial.get(k)]:
            # e.g. --epochs or --set: then the trial's run is not the one this config trains
            print(
                f"ours seed {trial['seed']} is trained again, not read from the search's trial: "
                "its config differs from the trial's in "
                + ", ".join(f"{k}={flat[k]!r} (trial: {trial.get(k)!r})" for k in changed),
                flush=True,
            )

    synthetic, data = load_world(args)
    truth = test_truth(data)  # (N, 224, 224) bool, test-cache order
    groups = list(data.test.groups)  # each tile's source scene (the world's test.csv `group`)
    empty = float(np.mean(~truth.reshape(len(truth), -1).any(axis=1)))
    print(
        f"test: {len(truth)} tiles of {truth.shape[1]}x{truth.shape[2]} from "
        f"{len(set(groups))} held-out scenes ({empty:.0%} without a building)"
    )
    rows = []
    for seed in args.seeds:
        for arm in args.arms:
            cfg = cfgs[f"{arm} seed {seed}"]
            print(f"== {arm}: {cfg.model}, seed {seed}", flush=True)
            reuse = trial_dir if arm == "ours" and cfg.to_flat() == trial else None
            rows.append(
                train_and_score(
                    arm,
                    cfg,
                    Path(args.out),
                    data,
                    truth,
                    groups,
                    reuse,
                    selection if reuse is not None else None,
                )
            )
    summary = summarise(rows, groups, list(data.test.ids))
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
            "search_selection": selection,
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
