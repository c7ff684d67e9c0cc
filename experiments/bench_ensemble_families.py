"""Ensembles of mixed model families vs InternImage models only vs the best single model.

The competition's 2nd place ensembled UNet and UPerNet decoders on different encoders. This
benchmark runs the pipeline's ensemble search (``bldseg.ensemble.run.run_search``: members
and threshold chosen exactly on the selection half of the validation tiles, reported on the
check half and on the clean held-out test split) over two libraries of the same validation
tiles:

- ``internimage``: every run of an InternImage model found under the folders given;
- ``mixed``: the same plus the runs of other families (e.g. the smp UNets of ``bench_train.py``
  and ``bench_quality.py``, trained with the same run config, so on the same validation
  tiles). ``--internimage`` and ``--others`` only say where to look: each run is sorted by the
  model its checkpoint names.

Every figure carries a 95% cluster-bootstrap interval over source scenes; ``mixed -
internimage`` and each ensemble's gain over its library's best single model are paired on
the same test tiles.

    python experiments/bench_ensemble_families.py \\
        --internimage runs/pipeline/pipeline-tune_aug runs/pipeline/pipeline-tune_sched \\
        --others runs/bench_train runs/bench_quality -k 2 3 4 --json bench/families.json

Prints a table and writes JSON; the two searches' outputs go to ``--out``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bldseg import stats
from bldseg.ensemble.library import find_runs, load_library
from bldseg.ensemble.run import SearchConfig, run_search, tile_scores
from bldseg.io import write_json
from bldseg.pipeline import TEST_FILE, test_truth, write_test_library
from bldseg.predict import load_checkpoint

from bench_quality import add_world_arguments, load_world  # isort: skip


def _runs(folders: list[str]) -> list[Path]:
    """Run folders (with a best.pt) under each folder, or the folder itself if it is one."""
    out: list[Path] = []
    for f in folders:
        out += [r for r in find_runs(f) if (r / "best.pt").is_file()]
    return sorted(set(out))


def _test_tiles(out: Path, runs: list[Path], d: dict) -> np.ndarray:
    """Per-tile test Dice of a search's chosen ensemble (or single model) row ``d``."""
    lib = load_library([r / TEST_FILE for r in runs])
    members = tuple(int(m) for m in str(d["member_ids"]).split())
    return tile_scores(lib, members, int(d["level"]))


def _fmt(iv: dict | None, value: float | None = None, signed: bool = False) -> str:
    f = "+.4f" if signed else ".4f"
    if iv is None:
        return "-" if value is None else f"{value:{f}}"
    return stats.format_interval(iv, signed=signed)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    a = p.add_argument
    a("--internimage", nargs="+", required=True, help="folders of InternImage runs")
    a("--others", nargs="+", required=True, help="folders of runs of other families")
    a("-k", type=int, nargs="+", default=[2, 3, 4], help="ensemble sizes (default 2 3 4)")
    add_world_arguments(p)
    a("--out", default="runs/bench_families", help="the searches' outputs")
    a("--json", default="bench/families.json", help="write the results here")
    args = p.parse_args()

    synthetic, data = load_world(args)
    truth = test_truth(data)
    groups = list(data.test.groups)
    models = {}
    for r in _runs(args.internimage + args.others):
        _, cfg, _ = load_checkpoint(r / "best.pt")
        models[str(r)] = cfg.model
        write_test_library(r, data, truth)  # test_probs.npz of best.pt (kept if up to date)
    # By the model each run trained, wherever it was found (bench_train's folder holds ours too).
    internimage = [Path(r) for r, m in models.items() if "internimage" in m]
    others = [Path(r) for r, m in models.items() if "internimage" not in m]
    if not internimage or not others:
        raise SystemExit(f"need runs of both kinds; found {sorted(set(models.values()))}")
    libraries = {"internimage": internimage, "mixed": internimage + others}
    print(
        f"{len(internimage)} InternImage runs; other families: "
        + ", ".join(f"{models[str(r)]} ({r})" for r in others)
    )

    results: dict[str, dict[str, Any]] = {}
    for name, runs in libraries.items():
        cfg = SearchConfig(
            models=[str(r) for r in runs],
            k=[k for k in args.k if k <= len(runs)] or [len(runs)],  # no k above N
            out=str(Path(args.out) / name),
            workers=0,
            progress=False,
        )
        s = run_search(cfg)
        results[name] = {
            "runs": [str(r) for r in runs],
            "best": s.best,
            "best_single": s.best_single,
            "gain": s.gain,
            "decision": s.decision,
            "families": sorted({models[str(runs[int(m)])] for m in s.best["member_ids"].split()}),
            "tiles": _test_tiles(Path(cfg.out), runs, s.best),
            "single_tiles": _test_tiles(Path(cfg.out), runs, s.best_single),
        }

    diff = stats.paired_difference(
        results["mixed"]["tiles"], results["internimage"]["tiles"], groups
    ).to_dict()
    head = (
        f"{'library':<12} {'N':>3} {'what':<9} {'k':>2} {'check Dice [95% CI]':>26} "
        f"{'test Dice [95% CI]':>26}  members"
    )
    print("\n" + head + "\n" + "-" * (len(head) + 20))
    for name, r in results.items():
        for what, d in (("ensemble", r["best"]), ("single", r["best_single"])):
            iv = d.get("intervals", {})
            print(
                f"{name:<12} {len(r['runs']):>3} {what:<9} {d['k']:>2} "
                f"{_fmt(iv.get('check'), d['check_dice']):>26} "
                f"{_fmt(iv.get('test'), d.get('test_dice')):>26}  "
                + " + ".join(models[r["runs"][int(m)]] for m in d["member_ids"].split())
            )
        g = r["gain"].get("test")
        print(
            f"{'':<12} ensemble - single (paired): check {_fmt(r['gain'].get('check'), None, True)}"
            f", test {_fmt(g, None, True)}; the pipeline would submit: {r['decision']['submit']}"
        )
    what = "mixed - internimage, best ensembles on the test tiles (paired)"
    print(f"\n{what}: {_fmt(diff, signed=True)}")

    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "synthetic": synthetic,
        "data": data.description,
        "k": args.k,
        "test_tiles": len(truth),
        "test_scenes": len(set(groups)),
        "models": models,
        "libraries": {
            name: {k: v for k, v in r.items() if k not in ("tiles", "single_tiles")}
            for name, r in results.items()
        },
        "mixed_minus_internimage_test": diff,
    }
    write_json(path, record, indent=2, default=str)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
