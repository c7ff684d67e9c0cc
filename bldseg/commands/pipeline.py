"""The whole workflow in one resumable command: data -> cache -> tune_aug -> tune_sched ->
tune_tau -> ensemble search -> predict -> submission.csv -> score -> REPORT.md.

    bldseg pipeline                                 # synthetic world, 2-core CPU, ~30 min
    bldseg pipeline --trials 2 --epochs 2           # a quick smoke run
    bldseg pipeline --data /path/to/comp --model upernet_internimage_b \\
        --gpus-per-trial 1 --address <ray-head>:6379 --storage /shared/runs \\
        --tracking-uri http://<mlflow-host>:5000 --trials 24 --epochs 60
    python experiments/pipeline.py --trials 2 --epochs 2   # the same, from a checkout
    bldseg pipeline --folds 5                       # every configuration as 5 fold models

With ``--folds K`` every trial trains K models, each validated on its own fold (by source
scene), so the ensemble search chooses members and thresholds on out-of-fold maps of the whole
training set instead of one validation split, and each member of the submission averages its
K fold models.

Re-running the same command continues where it stopped: finished stages are skipped and an
interrupted search is resumed. Ctrl-C stops it (exit status 130) without recording the stage
it interrupted. Other --k-min/--k-max, or a changed test split or truth, redo only the ensemble
search and the prediction (and the test maps); other training data or settings, --storage or
--tracking-uri are refused. Outputs: <out>/<name>/{pipeline_state.json, ensemble/,
submission.csv, REPORT.md, report/*.png}; every stage is an MLflow run linked to the previous.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from bldseg.commands import (
    EXIT_INTERRUPTED,
    USER_ERRORS,
    fail,
    sigterm_as_ctrl_c,
    warn_job_relative_paths,
)
from bldseg.data.prepare import add_data_arguments, data_options
from bldseg.io import atomic_path
from bldseg.pipeline import ContinuationError, PipelineConfig, check_config, run_pipeline
from bldseg.train.config import RunConfig
from bldseg.tune.cli import (
    DEFAULT_EPOCHS,
    add_folds_argument,
    add_pretrained_argument,
    exit_status_epilog,
    fixed_config,
    parse_set,
    refuse_search_sets,
    refuse_two_pretrained,
    search_name,
)
from bldseg.tune.runner import EXIT_CLUSTER_LOST

#: Exit status of a pipeline stopped by an error (:func:`bldseg.commands.fail`).
EXIT_FAILED = 1
#: Exit status of argparse's usage errors (a bad flag or --set item).
EXIT_USAGE = 2

#: What each exit status of ``bldseg pipeline`` means: its --help lists them.
EXIT_STATUSES = {
    0: "every stage finished: the submission and REPORT.md are written",
    EXIT_FAILED: "stopped by an error, said in one line: bad settings or data, a run it cannot "
    "continue (other training data or settings), a search in which no trial completed",
    EXIT_USAGE: "a bad flag or --set item; nothing ran",
    EXIT_CLUSTER_LOST: "the Ray cluster was lost during a search; restart it and run the same "
    "command to continue",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C or SIGTERM); the same command continues where it "
    "stopped",
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flags of ``bldseg pipeline`` (``experiments/pipeline.py``).

    Args:
        prog: Program name in the usage line (default: the running script's name).
    """
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        epilog=exit_status_epilog(EXIT_STATUSES),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--name",
        default="pipeline",
        type=search_name,  # its searches are named <name>-<stage>: folder names
        help="run name (MLflow experiment, folders): letters, digits, '.', '_', '-'",
    )
    p.add_argument("--out", default="results", help="state, ensemble, submission, report")
    p.add_argument("--storage", default="runs", help="search results (shared on a cluster)")
    add_data_arguments(p)
    p.add_argument(
        "--split-group",
        default=None,
        help="regex on source file names grouping tiles on one side of the validation split",
    )
    add_pretrained_argument(p)
    add_folds_argument(p)
    p.add_argument("--model", default=None, help="model name (default: tiny on a CPU)")
    p.add_argument("--trials", type=int, default=6, help="trials per search stage (default 6)")
    p.add_argument(
        "--epochs",
        type=int,
        default=DEFAULT_EPOCHS,
        help=f"epochs per trial (default {DEFAULT_EPOCHS})",
    )
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0)
    p.add_argument("--address", default=None, help="Ray cluster address")
    p.add_argument("--tracking-uri", default=None, help="MLflow URI (default sqlite in cwd)")
    p.add_argument("--k-min", type=int, default=2, help="smallest ensemble size")
    p.add_argument("--k-max", type=int, default=6, help="largest ensemble size")
    p.add_argument("--ensemble-workers", type=int, default=0, help="Ray tasks (0: in-process)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="fixed run-config value for every trial (repeatable)",
    )
    p.add_argument(
        "--report-to",
        default=None,
        help="also copy REPORT.md (and its plots, to report/ beside it) to this file or "
        "folder (ending in /), e.g. REPORT.md or docs/",
    )
    return p


def copy_report(report: Path, to: str) -> Path:
    """Copies a pipeline's REPORT.md, and the plots it links (``report/``), to ``to``.

    Args:
        report: The pipeline's REPORT.md; its plots lie in ``report/`` beside it.
        to: A file path, or a folder (an existing one, or a path ending in a separator), which
            then gets the report under its own name; missing folders are made.

    Returns:
        The report's copy. Its plots go to ``report/`` beside it, where its links point; other
        files there are left alone.
    """
    dest = Path(to)
    if to.endswith(("/", os.sep)) or dest.is_dir():
        dest = dest / report.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    # Each file through a temporary name, the plots before the report: a reader (a docs
    # server, a viewer with a plot open) never sees half a file, nor a link to a plot that is
    # not there yet; a plot replaced by rename leaves an open old one whole.
    plots = report.parent / "report"
    for src in sorted(plots.iterdir()) if plots.is_dir() else []:
        if src.is_file():
            with atomic_path(dest.parent / "report" / src.name, suffix=src.suffix) as tmp:
                shutil.copyfile(src, tmp)
    with atomic_path(dest, suffix=report.suffix) as tmp:
        shutil.copyfile(report, tmp)
    return dest


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Runs (or resumes) the pipeline and prints the report; returns the exit status
    (:data:`EXIT_STATUSES`).

    Ctrl-C returns :data:`EXIT_INTERRUPTED` after saying how to resume.

    Args:
        argv: Arguments after the command (default: ``sys.argv[1:]``).
        prog: Program name in the usage line.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    refuse_search_sets(parser, args.set)
    refuse_two_pretrained(parser, args)
    paths = {"--out": args.out, "--storage": args.storage, "--data-root": args.data_root}
    warn_job_relative_paths(parser.prog, paths, args.tracking_uri)
    base = fixed_config(
        args.data or args.images,
        args.model,
        args.set,
        gpu=args.gpus_per_trial > 0,  # trials without a GPU train the CPU defaults
        split_group=args.split_group,
        pretrained=args.pretrained,
        announce=True,
    )
    if args.folds is not None:
        base["folds"] = args.folds
    try:  # an unknown key or a bad value is a usage error (2), as in `bldseg tune`
        RunConfig.from_flat({**base, "epochs": args.epochs})
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    # what the user fixed by name, as opposed to the defaults under it (CPU_DEMO, the recipe):
    # a search whose space searches one of them warns that the space's value wins
    user_keys = set(parse_set(args.set)) - {"pretrained"}
    user_keys |= {k for k, v in (("model", args.model), ("split_group", args.split_group)) if v}
    cfg = PipelineConfig(
        name=args.name,
        out=args.out,
        storage=args.storage,
        data=args.data,
        data_options=data_options(args),
        data_root=args.data_root,
        base=base,
        trials=args.trials,
        epochs=args.epochs,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        address=args.address,
        tracking_uri=args.tracking_uri,
        k_min=args.k_min,
        k_max=args.k_max,
        ensemble_workers=args.ensemble_workers,
        seed=args.seed,
        user_keys=tuple(sorted(user_keys)),
    )
    try:  # a flag out of range (--trials 0, --k-min above --k-max) is a usage error (2)
        check_config(cfg)
    except ValueError as e:
        parser.error(str(e))
    except FileNotFoundError:
        pass  # missing data: run_pipeline says so, status 1
    try:
        with sigterm_as_ctrl_c():
            state = run_pipeline(cfg)
    except (ContinuationError, *USER_ERRORS, RuntimeError) as e:
        # bad settings, missing data, a search in which no trial completed: one line
        return fail(e, prog)
    except KeyboardInterrupt:
        # run_pipeline recorded only the stages that finished: the same command resumes.
        print(
            f"\n{prog or 'pipeline'}: interrupted; run the same command again to continue "
            "where it stopped",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    report = Path(state["report"])
    print(report.read_text())
    if args.report_to:
        dest = copy_report(report, args.report_to)
        print(f"copied the report to {dest}")
    print(f"report: {report}")
    return 0
