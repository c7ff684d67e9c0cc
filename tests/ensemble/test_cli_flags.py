"""`bldseg ensemble`'s command line: flags that do not apply are refused, the tracking store is
checked before the search (bldseg.commands.ensemble)."""

import json
import re
import shlex

import pytest

from bldseg.commands import ensemble as ensemble_cmd
from bldseg.ensemble.synthetic import fake_library, write_runs
from tests.conftest import free_port


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A six-model run library of 24 tiny tiles."""
    root = tmp_path_factory.mktemp("ens_cli")
    write_runs(fake_library(6, 24, 16, seed=3, tiles_per_image=2), root / "results")
    return root / "results"


# (flags, what the error names): each flag is given where it has no effect
INAPPLICABLE = [
    (["--method", "greedy", "-k", "2"], "-k sizes the exhaustive search"),
    (["--method", "greedy", "--k-range", "2", "3"], "--k-range sizes the exhaustive search"),
    (["--method", "greedy", "--workers", "2"], "--workers splits the exhaustive search"),
    (["--method", "greedy", "--address", "127.0.0.1:1"], "--address names the Ray cluster"),
    (["--method", "greedy", "--rules", "vote"], "--rules vote/weighted and --empty-tile need"),
    (["--method", "greedy", "--empty-tile"], "--rules vote/weighted and --empty-tile need"),
    (["--greedy-size", "4"], "--greedy-size sets the greedy search; it needs --method greedy"),
    (["--greedy-init", "1"], "--greedy-init sets the greedy search; it needs --method greedy"),
    (["-k", "3", "--k-range", "2", "4"], "-k and --k-range both set the ensemble sizes"),
    (["--workers", "0", "--address", "127.0.0.1:1"], "--address joins a Ray cluster, but"),
    (["--empty-areas", "1", "8"], "--empty-areas sets the empty-tile rule; it needs --empty-tile"),
    (["--no-empty-tile", "--empty-candidates", "2"], "--empty-candidates sets the empty-tile"),
    (["--max-weight", "2"], "--max-weight sets the weighted rule; it needs --rules weighted"),
    (["--rules", "vote", "--weighted-starts", "2"], "--weighted-starts sets the weighted rule"),
    (["--experiment", "x"], "--experiment sets the MLflow run; it needs --tracking-uri"),
    (["--parent-run-id", "abc"], "--parent-run-id sets the MLflow run; it needs --tracking-uri"),
    # out of range: refused after the mean search had run, leaving an empty --out
    (["--rules", "weighted", "--max-weight", "0"], "--max-weight must be at least 1, got 0"),
    (["--rules", "weighted", "--weighted-starts", "0"], "--weighted-starts must be at least 1"),
    # sums that overflow uint16: refused after the mean search, leaving an empty --out
    (["-k", "3", "--rules", "weighted", "--max-weight", "100"], "--max-weight 100 with ensemble"),
    # the largest size counts: --k-range's upper end, else the default sizes' largest
    (
        ["--k-range", "2", "8", "--rules", "weighted", "--max-weight", "40"],
        "--max-weight 40 with ensembles of up to 8 members",
    ),
    (["--rules", "weighted", "--max-weight", "50"], "--max-weight 50 with ensembles of up to 6"),
]


@pytest.mark.parametrize(
    ("flags", "message"), INAPPLICABLE, ids=[" ".join(flags) for flags, _ in INAPPLICABLE]
)
def test_a_flag_that_does_not_apply_is_refused(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    # --workers 0 where the combination leaves it free: a run that got past the check (as
    # before the fix) searches in this process instead of starting Ray
    ray_free = [] if {"--workers", "--address"} & set(flags) else ["--workers", "0"]
    argv = ["--runs", str(runs), "--out", str(out), "--no-progress", *ray_free, *flags]
    with pytest.raises(SystemExit) as exc:
        ensemble_cmd.main(argv, prog="bldseg ensemble")
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert f"bldseg ensemble: error: {message}" in err
    assert not out.exists()  # refused before anything ran


# (flags, what the error says): a threshold sweep that is not 0 <= lo <= hi <= 1
BAD_RANGES = [
    (["--lo", "-3"], "--lo -3.0: the threshold sweep's ends are probabilities, in [0, 1]"),
    (["--hi", "1.5"], "--hi 1.5: the threshold sweep's ends are probabilities, in [0, 1]"),
    (["--lo", "nan"], "--lo nan: the threshold sweep's ends are probabilities"),
    (["--lo", "0.7", "--hi", "0.3"], "--lo 0.7 > --hi 0.3: lo > hi: swap them"),
]


@pytest.mark.parametrize(
    ("flags", "message"), BAD_RANGES, ids=[" ".join(flags) for flags, _ in BAD_RANGES]
)
def test_a_threshold_range_outside_0_1_or_reversed_is_refused(
    runs, tmp_path, capsys, flags, message
):
    # --lo -3 ran (exit 0, the summary recording lo -3), and lo > hi said "widen the range"
    out = tmp_path / "out"
    argv = ["--runs", str(runs), "--out", str(out), "--no-progress", "--workers", "0", *flags]
    with pytest.raises(SystemExit) as exc:
        ensemble_cmd.main([*argv, "-k", "2"], prog="bldseg ensemble")
    assert exc.value.code == 2
    assert f"bldseg ensemble: error: {message}" in capsys.readouterr().err
    assert not out.exists()  # refused before anything ran


def test_the_library_refuses_a_bad_threshold_range_too(runs, tmp_path):
    from bldseg.ensemble.prune import level_window
    from bldseg.ensemble.run import SearchConfig, run_search

    with pytest.raises(ValueError, match=r"^--lo 0.6 > --hi 0.4: lo > hi: swap them$"):
        run_search(SearchConfig(runs=str(runs), k=[2], lo=0.6, hi=0.4, out=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="swap them"):
        level_window(2, 0.6, 0.4)
    # the ends themselves are a range: one threshold, searched alone
    assert level_window(1, 0.4, 0.4) == (102, 102)


def test_valid_greedy_command_runs_with_its_flags(runs, tmp_path, capsys):
    out = tmp_path / "greedy"
    argv = ["--runs", str(runs), "--method", "greedy", "--greedy-size", "4", "--greedy-init"]
    argv += ["1", "--workers", "0", "--top", "3", "--no-progress", "--out", str(out)]
    assert ensemble_cmd.main(argv) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert (config["method"], config["greedy_size"], config["greedy_init"]) == ("greedy", 4, 1)
    assert '"files"' in capsys.readouterr().out  # the result summary was printed


def test_valid_exhaustive_command_runs_with_its_flags_and_defaults(runs, tmp_path):
    out = tmp_path / "exhaustive"
    argv = ["--runs", str(runs), "-k", "2", "--rules", "weighted", "--max-weight", "2"]
    argv += ["--weighted-starts", "1", "--empty-tile", "--empty-areas", "1", "8"]
    argv += ["--empty-candidates", "2", "--workers", "0", "--no-progress", "--out", str(out)]
    assert ensemble_cmd.main(argv) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["k"] == [2] and config["rules"] == ["mean", "weighted"]
    assert (config["max_weight"], config["weighted_starts"]) == (2, 1)
    assert (config["empty_areas"], config["empty_candidates"]) == ([1, 8], 2)
    # the greedy flags, not given, hold the job's defaults
    defaults = ensemble_cmd.DEFAULTS
    assert (config["greedy_size"], config["greedy_init"]) == (
        defaults.greedy_size,
        defaults.greedy_init,
    )


def test_the_documented_examples_are_accepted():
    # the examples in the module docstring (bldseg ensemble --help) pass the flag check
    doc = ensemble_cmd.__doc__.replace("\\\n", " ")  # a shell line continued with a backslash
    examples = re.findall(r"(?:bldseg ensemble|ensemble_search\.py) (--[^#\n]*)", doc)
    assert len(examples) >= 5
    for line in examples:
        p = ensemble_cmd.build_parser("bldseg ensemble")
        a = p.parse_args(shlex.split(line))
        ensemble_cmd._refuse_inapplicable(p, a)  # raises SystemExit when refused


@pytest.mark.parametrize("store", ["http", "sqlite under a file"])
def test_an_unusable_tracking_store_stops_the_command_before_the_search(
    runs, tmp_path, capsys, monkeypatch, store
):
    # MLflow's own retries would take minutes: the command must not rely on them. Without
    # the check, the search ran, wrote --out, then failed in MLflow with a traceback.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    if store == "http":
        uri = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    else:
        (tmp_path / "afile").write_text("")
        uri = "sqlite:///" + str(tmp_path / "afile" / "mlflow.db")  # its folder is a file
    out = tmp_path / "out"
    argv = ["--runs", str(runs), "-k", "2", "--workers", "0", "--no-progress"]
    argv += ["--tracking-uri", uri, "--out", str(out)]
    assert ensemble_cmd.main(argv, prog="bldseg ensemble") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("bldseg ensemble: error: ") and uri in err
    assert "Traceback" not in err
    assert not out.exists()


def test_a_relative_sqlite_uri_is_made_absolute(runs, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    argv = ["--runs", str(runs), "-k", "2", "--workers", "0", "--no-progress"]
    argv += ["--tracking-uri", "sqlite:///mlflow.db", "--out", str(out)]
    assert ensemble_cmd.main(argv) == 0
    config = json.loads((out / "summary.json").read_text())["config"]
    assert config["tracking_uri"] == "sqlite:///" + str((tmp_path / "mlflow.db").resolve())
    exp = MlflowClient(config["tracking_uri"]).get_experiment_by_name("ensemble_search")
    assert exp is not None


def test_the_parent_run_is_checked_and_its_experiment_taken(runs, tmp_path, capsys):
    # it was never looked up: a mistyped id, or a search's run in experiment 'bldseg' with the
    # ensemble logging to 'ensemble_search', gave a run linked to nothing MLflow shows, exit 0
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    # artifact folders in tmp_path: MLflow's default is ./mlruns in the current folder
    art = (tmp_path / "mlartifacts").as_uri()
    parent = client.create_run(client.create_experiment("bldseg", f"{art}/bldseg")).info.run_id
    argv = ["--runs", str(runs), "-k", "2", "--workers", "0", "--no-progress"]
    argv += ["--tracking-uri", uri]
    missing = "0123456789abcdef0123456789abcdef"
    out = tmp_path / "out"
    assert ensemble_cmd.main([*argv, "--out", str(out), "--parent-run-id", missing]) == 2
    assert f"--parent-run-id {missing}: no such run" in capsys.readouterr().err
    flags = ["--parent-run-id", parent, "--experiment", "other"]
    assert ensemble_cmd.main([*argv, "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert "is a run of experiment 'bldseg', not of --experiment 'other'" in err
    assert not out.exists()  # refused before anything ran
    assert ensemble_cmd.main([*argv, "--out", str(out), "--parent-run-id", parent]) == 0
    exp = client.get_experiment_by_name("bldseg").experiment_id
    children = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
    # deleted: the run, or its experiment (the search ran, then its logging failed)
    gone = client.create_run(client.create_experiment("gone", f"{art}/gone")).info.run_id
    client.delete_experiment(client.get_experiment_by_name("gone").experiment_id)
    client.delete_run(parent)
    for run_id, says in ((parent, "is a deleted run"), (gone, "of the deleted experiment 'gone'")):
        assert (
            ensemble_cmd.main([*argv, "--out", str(tmp_path / "o2"), "--parent-run-id", run_id])
            == 2
        )
        assert says in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()
    assert len(children) == 1  # the ensemble's run, in the parent's experiment
    assert client.get_experiment_by_name("ensemble_search") is None
