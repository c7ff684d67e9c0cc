"""The ``bldseg`` command line: every entry script is a sub-command with the same flags."""

import argparse
import errno
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from functools import partial
from importlib.metadata import version
from pathlib import Path

import pytest

from bldseg import cli
from bldseg.commands import tune

REPO = Path(__file__).resolve().parents[1]

# bldseg sub-command -> its entry script in experiments/
SCRIPTS = {
    "prepare": "prepare_data",
    "train": "train",
    "tune aug": "tune_aug",
    "tune sched": "tune_sched",
    "tune tau": "tune_tau",
    "ensemble": "ensemble_search",
    "predict": "predict",
    "pipeline": "pipeline",
    "suspects": "find_suspects",
}


def _help_of(monkeypatch, capsys, run) -> tuple[argparse.ArgumentParser, str]:
    """Runs ``run()`` (which must end in ``--help``): (the parser that printed it, its output)."""
    parsers = []
    parse_args = argparse.ArgumentParser.parse_args

    def recording(self, args=None, namespace=None):
        parsers.append(self)
        return parse_args(self, args, namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", recording)
    with pytest.raises(SystemExit) as e:
        run()
    assert e.value.code == 0
    return parsers[-1], capsys.readouterr().out


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def test_help_lists_every_command_on_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("usage: bldseg ")
    for name, (_, summary) in cli.COMMANDS.items():
        assert f"    {name:10s}{summary}" in lines, name
    assert {c.split()[0] for c in SCRIPTS} == set(cli.COMMANDS)


@pytest.mark.parametrize("command", SCRIPTS)
def test_command_has_the_flags_of_its_script(command, monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "100")
    cmd_parser, cmd_help = _help_of(
        monkeypatch, capsys, lambda: cli.main([*command.split(), "--help"])
    )
    script = SCRIPTS[command]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", "--help"])
    script_parser, script_help = _help_of(
        monkeypatch,
        capsys,
        lambda: runpy.run_path(str(REPO / "experiments" / f"{script}.py"), run_name="__main__"),
    )
    assert cmd_parser.prog == f"bldseg {command}"
    assert cmd_help.startswith(f"usage: bldseg {command} [-h]")
    assert script_help.startswith(f"usage: {script}.py [-h]")
    options = _option_strings(script_parser)
    assert "--help" in options and len(options) > 5
    assert _option_strings(cmd_parser) == options
    missing = [s for s in options if s not in cmd_help]
    assert not missing, f"bldseg {command} --help lacks {missing}"
    # The same description: both ways of running are named in it.
    assert cmd_parser.description == script_parser.description
    assert f"bldseg {command}" in cmd_help and f"experiments/{script}.py" in cmd_help


def test_unknown_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["frobnicate", "--help"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'frobnicate'" in err
    assert all(name in err for name in cli.COMMANDS)


@pytest.mark.parametrize("argv", [["tune"], ["tune", "--trials", "2"]])
def test_tune_needs_a_search(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "required: {aug,sched,tau}" in capsys.readouterr().err


def test_tune_unknown_search_lists_the_searches(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "augmentation"])
    assert e.value.code == 2
    assert "choose from 'aug', 'sched', 'tau'" in capsys.readouterr().err
    assert list(cli.TUNE_SEARCHES) == list(tune.SEARCHES)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--trials", "0"], "argument --trials: 0 is below 1"),  # found while parsing
        (["--set", "aug=1"], "'aug' is a section of the run config"),  # found after it
        # Ray started, and the search's MLflow run was left FAILED, naming no flag
        (["--storage", __file__], "is a file; give a folder for search results"),
        (["--storage", f"{__file__}/runs"], f"{__file__} is a file; give a folder"),
    ],
)
def test_tune_usage_errors_name_the_command(argv, says, capsys):
    # errors found after parsing named the running script ("__main__.py: error", or
    # "bldseg: error" without "tune aug")
    with pytest.raises(SystemExit) as e:
        cli.main(["tune", "aug", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"bldseg tune aug: error: {argv[0]}" in err or "bldseg tune aug: error: argument" in err
    assert says in err


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 2
    assert "required: COMMAND" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"bldseg {version('bldseg')}"


@pytest.mark.parametrize(
    "argv",
    [
        ["--out", "x", "--set", "optim.lr=-1", "--", "y"],
        ["--data", "train", "--out=tune", "--version", "-h"],
    ],
)
def test_arguments_reach_the_command_verbatim(argv, monkeypatch):
    import bldseg.commands.train

    calls = []
    monkeypatch.setattr(bldseg.commands.train, "main", lambda a, prog: calls.append((a, prog)))
    cli.main(["train", *argv])
    assert calls == [(argv, "bldseg train")]


def test_user_errors_are_one_line_without_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert cli.main(["predict", "--checkpoint", f"{missing}.pt", "--out", "s.csv"]) == 1
    assert capsys.readouterr().err == f"error: checkpoint not found: {missing}.pt\n"
    assert cli.main(["ensemble", "--runs", missing, "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bldseg ensemble: error: ") and missing in err


def test_ensemble_checks_runs_before_starting_ray(tmp_path, capsys, monkeypatch):
    import bldseg.tune.runner

    def no_ray(*_):
        raise AssertionError("Ray was started before --runs was checked")

    monkeypatch.setattr(bldseg.tune.runner, "init_ray", no_ray)
    missing = str(tmp_path / "missing")
    assert cli.main(["ensemble", "--runs", missing]) == 2  # default: Ray workers
    assert missing in capsys.readouterr().err


def test_python_m_bldseg_without_torch():
    """``python -m bldseg`` works, and listing the commands does not import torch (fast)."""
    r = subprocess.run(
        [sys.executable, "-m", "bldseg", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0 and r.stdout.startswith("usage: bldseg "), r.stderr
    code = "import sys; from bldseg import cli; cli.build_parser(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--top", "0"], "--top 0: at least 1"),
        (["--top", "-3"], "--top -3: at least 1"),
        (["--threshold", "1.5"], "--threshold 1.5: a threshold is a probability"),
    ],
)
def test_suspects_refuses_bad_counts_first(tmp_path, argv, message, capsys):
    # --top 0 failed with "need at least one array to stack" after suspects.csv was written
    from bldseg.commands import suspects

    with pytest.raises(SystemExit) as e:
        suspects.main(["--checkpoint", str(tmp_path / "x.pt"), "--out", str(tmp_path), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "suspects.csv").exists()


@pytest.mark.parametrize(
    "command, argv, message",
    [
        # the searches refuse it; train overwrote it with --data (or the synthetic world)
        (
            "train",
            ["--set", "data=/x", "--out", "run"],
            "--set data=...: pass the dataset with --data",
        ),
        # the pipeline failed after writing its state and an MLflow run, naming 'my run-tune_aug'
        ("pipeline", ["--name", "my run"], "argument --name: 'my run' may hold only letters"),
        ("pipeline", ["--name", "../x"], "argument --name: '../x' may hold only letters"),
    ],
)
def test_flags_refused_before_anything_runs(command, argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main([command, *argv, "--data-root", str(tmp_path / "root")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "pipeline", "tune aug"])
def test_two_pretrained_checkpoints_are_refused(command, tmp_path, monkeypatch, capsys):
    # the recipe came from --pretrained's file and the run's weights from --set's
    monkeypatch.chdir(tmp_path)
    argv = [*command.split(), "--pretrained", "a.pth", "--set", "pretrained=b.pth"]
    argv += ["--out", "run"] if command == "train" else []
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert "--pretrained and --set pretrained=... both name a checkpoint" in (
        capsys.readouterr().err
    )
    assert list(tmp_path.iterdir()) == []


def test_fixed_config_refuses_two_pretrained_checkpoints():
    # Python callers too: the recipe was read from one file and base["pretrained"] was the other
    from bldseg.tune.cli import fixed_config

    with pytest.raises(ValueError, match=r"'a\.pth' and --set pretrained='b\.pth' name two"):
        fixed_config(None, sets=["pretrained=b.pth"], pretrained="a.pth")


# Writing where one cannot: one line naming the flag and what to do, exit 1, no traceback.


def _tiny_train(world, out) -> list[str]:
    """``bldseg train`` arguments for a seconds-long run on the tiny world into ``out``."""
    argv = ["--data", str(world.root), "--data-root", str(world.root.parent), "--out", str(out)]
    for s in ["aug.crop_size=32", "samples_per_epoch=16", "epochs=1", "impl=compiled"]:
        argv += ["--set", s]
    return argv


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An untrained bldseg ``best.pt`` of the tiny model (what ``suspects`` reads)."""
    import torch

    from bldseg.models import create_model
    from bldseg.train.config import RunConfig

    cfg = RunConfig.from_flat({"aug.crop_size": 32, "impl": "compiled"})
    model = create_model(cfg.model, **cfg.model_kwargs())
    path = tmp_path_factory.mktemp("ckpt") / "best.pt"
    torch.save({"config": cfg.to_flat(), "model": model.state_dict(), "metrics": {}}, path)
    return path


def _argv(command, flag, path, world, checkpoint) -> list[str]:
    """``command`` on the tiny world with ``flag`` set to ``path`` (the other outputs writable)."""
    data = ["--data", str(world.root), "--data-root", str(world.root.parent)]
    out = str(path) if flag == "--out" else "run"
    if command == "train":
        argv = _tiny_train(world, out)
    elif command == "suspects":
        argv = ["--checkpoint", str(checkpoint), *data, "--out", out]
    else:
        argv = data
    if flag == "--data-root":  # the last one given wins
        argv += ["--data-root", str(path)]
    return [command, *argv]


UNWRITABLE = [
    ("train", "--out"),
    ("train", "--data-root"),
    ("prepare", "--data-root"),
    ("suspects", "--out"),
    ("suspects", "--data-root"),
]


@pytest.mark.parametrize("command, flag", UNWRITABLE)
def test_an_output_under_a_file_fails_in_one_line(
    command, flag, small_world, checkpoint, tmp_path, monkeypatch, capsys
):
    # FileExistsError / NotADirectoryError tracebacks from the folders' mkdir
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("mine")
    for path in ["afile", "afile/sub"]:  # the folder, or a parent of it, is the file
        assert cli.main(_argv(command, flag, path, small_world, checkpoint)) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {flag} {path}: a file is in the way ([Errno "), err
        assert err.endswith("); pass a folder (new or existing)\n") and err.count("\n") == 1
    assert (tmp_path / "afile").read_text() == "mine"


@pytest.mark.parametrize("command, flag", UNWRITABLE)
def test_a_read_only_output_fails_in_one_line(
    command, flag, small_world, checkpoint, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("this user writes into read-only folders (root)")
        assert cli.main(_argv(command, flag, locked / "x", small_world, checkpoint)) == 1
    finally:
        locked.chmod(0o755)
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} {locked / 'x'}: cannot write there ("), err
    assert f"pass a {flag} you can write" in err and err.count("\n") == 1, err


def test_an_error_about_another_file_is_not_blamed_on_the_flag():
    from bldseg.commands.prepare import cannot_write

    other = PermissionError(errno.EACCES, "Permission denied", "/data/scene.tif")
    assert cannot_write(other, "--out", "/runs/x") == str(other)
    # the folder, a file in it, or a parent made for it is the flag's
    for where in ["/runs/x", "/runs/x/best.pt", "/runs"]:
        e = PermissionError(errno.EACCES, "Permission denied", where)
        assert cannot_write(e, "--out", "/runs/x").startswith("--out /runs/x: cannot write there")


def test_train_refuses_an_out_another_process_trains_into(small_world, tmp_path, capsys):
    from bldseg.io import file_lock
    from bldseg.train.engine import RUN_LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / "last.pt").write_bytes(b"the other process's")
    with file_lock(out / RUN_LOCK_FILE):  # as the other process's fit holds it
        assert cli.main(["train", *_tiny_train(small_world, out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: another process is training into {out} (it holds ")
    assert err.count("\n") == 1, err
    assert sorted(p.name for p in out.iterdir()) == [RUN_LOCK_FILE, "last.pt"]
    assert (out / "last.pt").read_bytes() == b"the other process's"


@pytest.mark.parametrize("started", [False, True])
def test_ctrl_c_in_train_says_how_to_continue(started, small_world, tmp_path, monkeypatch, capsys):
    import bldseg.commands.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(bldseg.commands.train, "fit", interrupted)
    out = tmp_path / "run"
    if started:
        out.mkdir()
        (out / "last.pt").write_bytes(b"")
    try:
        assert cli.main(["train", *_tiny_train(small_world, out)]) == 130
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("Ctrl-C left bldseg train as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    said = (
        "interrupted; run the same command again to continue from the last finished epoch "
        f"(last.pt under {out})"
        if started
        else "interrupted before an epoch ended; run the same command again to start the run"
    )
    assert err.endswith(f"\n{said}\n"), err


@pytest.fixture
def sigterm_unhandled_fails(monkeypatch):
    """A SIGTERM no command handles fails the test (by default it would end the session)."""

    def unhandled(signum, frame):
        raise AssertionError("SIGTERM was not handled as Ctrl-C")

    before = signal.signal(signal.SIGTERM, unhandled)
    yield unhandled
    signal.signal(signal.SIGTERM, before)


def _sigterm(*args, **kwargs):
    """What a job scheduler's stop does to the command (Slurm, `timeout`, `kill`)."""
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the signal arrives first
    raise AssertionError("no signal came")


def test_train_prints_each_epochs_line_as_it_ends(small_world, tmp_path, monkeypatch, capsys):
    # The lines came all together after the last epoch: on a long run, no validation Dice for
    # hours, and none at all after Ctrl-C. A resumed run shows its earlier epochs first.
    import bldseg.commands.train

    real_fit = bldseg.commands.train.fit
    printed_by_epoch_end = []

    def spying_fit(*args, on_epoch_end, stop_after=None, **kwargs):
        def watched(row, out):
            on_epoch_end(row, out)
            printed_by_epoch_end.append(capsys.readouterr().out)

        return real_fit(*args, on_epoch_end=watched, stop_after=stop_after, **kwargs)

    out = tmp_path / "run"
    argv = ["train", *_tiny_train(small_world, out), "--set", "epochs=2"]
    monkeypatch.setattr(bldseg.commands.train, "fit", partial(spying_fit, stop_after=1))
    assert cli.main(argv) == 0  # stopped after epoch 1, as an interrupted run
    (first,) = printed_by_epoch_end
    assert _epochs(first) == [1]
    monkeypatch.setattr(bldseg.commands.train, "fit", spying_fit)
    assert cli.main(argv) == 0  # resumed: epoch 1's line, then epoch 2's as it ends
    assert _epochs(printed_by_epoch_end[1]) == [1, 2]
    assert "best epoch" in capsys.readouterr().out
    assert cli.main(argv) == 0  # a finished run: its epochs as they were, nothing trained
    assert len(printed_by_epoch_end) == 2
    assert _epochs(capsys.readouterr().out) == [1, 2]


def _epochs(out: str) -> list[int]:
    """The epochs of the JSON epoch lines in a command's output."""
    return [json.loads(x)["epoch"] for x in out.splitlines() if x.startswith("{")]


def test_sigterm_in_train_is_handled_as_ctrl_c(
    small_world, tmp_path, monkeypatch, capsys, sigterm_unhandled_fails
):
    # By default SIGTERM ended the process where it stood, without the line that says how to
    # continue: as Ctrl-C now, exit 130, and the handler from before is back
    import bldseg.commands.train

    monkeypatch.setattr(bldseg.commands.train, "fit", _sigterm)
    out = tmp_path / "run"
    assert cli.main(["train", *_tiny_train(small_world, out)]) == 130
    assert "interrupted before an epoch ended" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is sigterm_unhandled_fails


def test_sigterm_in_a_command_is_handled_as_ctrl_c(
    tmp_path, monkeypatch, capsys, sigterm_unhandled_fails
):
    import bldseg.commands.prepare

    monkeypatch.setattr(bldseg.commands.prepare, "prepare_data", _sigterm)
    err = _ctrl_c(["prepare", "--data-root", str(tmp_path)], capsys)
    assert "interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is sigterm_unhandled_fails


def test_sigterm_stops_a_command_whose_ctrl_c_is_ignored(
    tmp_path, monkeypatch, capsys, sigterm_unhandled_fails
):
    # A shell script's `bldseg ... &` starts with SIGINT ignored (POSIX), and Python then
    # installs no Ctrl-C handler: SIGTERM raised an ignored SIGINT, and the command ran on to
    # exit 0
    import bldseg.commands.prepare

    monkeypatch.setattr(bldseg.commands.prepare, "prepare_data", _sigterm)
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        err = _ctrl_c(["prepare", "--data-root", str(tmp_path)], capsys)
    finally:
        signal.signal(signal.SIGINT, before)
    assert "interrupted" in err
    assert signal.getsignal(signal.SIGTERM) is sigterm_unhandled_fails


# Ctrl-C in the other commands: one line saying what was and was not written, exit 130.


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


def _ctrl_c(argv: list[str], capsys) -> str:
    """Runs ``bldseg ARGV``, which is interrupted: its stderr, after checking the exit status."""
    try:
        assert cli.main(argv) == 130
    except KeyboardInterrupt:  # would end the test session
        pytest.fail(f"Ctrl-C left bldseg {argv[0]} as a KeyboardInterrupt traceback")
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_ctrl_c_in_prepare_is_one_line(tmp_path, monkeypatch, capsys):
    import bldseg.commands.prepare

    monkeypatch.setattr(bldseg.commands.prepare, "prepare_data", _interrupt)
    err = _ctrl_c(["prepare", "--data-root", str(tmp_path)], capsys)
    assert err == (
        "\nbldseg prepare: interrupted; what was finished is kept (a cache, or the synthetic "
        "world, counts only once complete); run the same command again to prepare the rest\n"
    )


@pytest.mark.parametrize("written", [False, True])
def test_ctrl_c_in_suspects_says_what_it_wrote(
    written, small_world, checkpoint, tmp_path, monkeypatch, capsys
):
    import bldseg.commands.suspects

    # while ranking (nothing written yet), or after writing (while precision@k is computed)
    where = "precision_at_k" if written else "rank_suspects"
    monkeypatch.setattr(bldseg.commands.suspects, where, _interrupt)
    out = tmp_path / "sus"
    data = ["--data", str(small_world.root), "--data-root", str(small_world.root.parent)]
    err = _ctrl_c(["suspects", "--checkpoint", str(checkpoint), *data, "--out", str(out)], capsys)
    said = (
        f"{out / 'suspects.csv'} and {out / 'suspects.png'} were written (only what it prints "
        "was cut short)"
        if written
        else f"nothing was written to --out {out} (a suspects.csv there is an earlier run's); "
        "run the same command again"
    )
    assert err.endswith(f"\nbldseg suspects: interrupted; {said}\n"), err
    assert (out / "suspects.csv").is_file() == written


@pytest.mark.parametrize("published", [False, True])
def test_ctrl_c_in_ensemble_says_whether_the_outputs_are_in(
    published, tmp_path, monkeypatch, capsys
):
    import bldseg.commands.ensemble
    from bldseg.ensemble.run import InterruptedAfterPublishing
    from bldseg.ensemble.synthetic import fake_library, write_runs

    write_runs(fake_library(3, 8, 16, seed=0), tmp_path / "runs")

    def interrupted(cfg):
        raise InterruptedAfterPublishing if published else KeyboardInterrupt

    monkeypatch.setattr(bldseg.commands.ensemble, "run_search", interrupted)
    out = tmp_path / "ens"
    argv = ["ensemble", "--runs", str(tmp_path / "runs"), "--workers", "0", "--out", str(out)]
    err = _ctrl_c(argv, capsys)
    said = (
        f"the outputs are in --out {out}, but the MLflow run was not finished (marked KILLED "
        "if it was started)"
        if published
        else f"nothing was written to --out {out} (an earlier run's outputs there are as they "
        "were); run the same command again"
    )
    assert err.endswith(f"\nbldseg ensemble: interrupted; {said}\n"), err


def test_ctrl_c_in_a_script_is_handled_by_main(tmp_path, monkeypatch, capsys):
    # experiments/*.py call each command's main directly, not bldseg.cli
    import bldseg.commands.prepare

    monkeypatch.setattr(bldseg.commands.prepare, "prepare_data", _interrupt)
    monkeypatch.setattr(sys, "argv", ["prepare_data.py", "--data-root", str(tmp_path)])
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(
                str(Path(__file__).parents[1] / "experiments" / "prepare_data.py"),
                run_name="__main__",
            )
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("Ctrl-C left experiments/prepare_data.py as a KeyboardInterrupt traceback")
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert err.startswith("\nprepare_data.py: interrupted; what was finished is kept"), err
