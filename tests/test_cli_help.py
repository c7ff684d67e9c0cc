"""What the searches' and the pipeline's --help promise: what the augmentation search searches,
and every exit status the commands can end with."""

import ast
import inspect
import re
import textwrap
from pathlib import Path

import optuna
import pytest

import bldseg.commands
from bldseg.commands import pipeline
from bldseg.commands import tune as tune_command
from bldseg.tune import cli as tune_cli
from bldseg.tune import runner

REPO = Path(__file__).resolve().parents[1]

#: The words a description of the augmentation search uses for each key its space sets.
AUG_WORDS = {
    "aug.scale_limit": "scale",
    "aug.scale_p": "scale",
    "aug.vflip_p": "flip",
    "aug.hflip_p": "flip",
    "aug.rotate90_p": "rotations",
    "aug.transpose_p": "transposes",
    "aug.brightness_contrast_p": "brightness/contrast",
    "aug.hsv_p": "HSV",
    "aug.noise_p": "noise",
    "aug.blur_p": "blur",
    "aug.blur_sigma": "blur",
}


def _augmentation_keys() -> set[str]:
    """Every key the augmentation space sets (sampled widely: blur_sigma is conditional)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    keys: set[str] = set()
    for _ in range(64):
        trial = study.ask()
        constants = runner.get_space("augmentation")(trial) or {}
        keys.update({**trial.params, **constants})
        study.tell(trial, 0.0)
    return keys


def test_the_augmentation_search_says_what_it_searches():
    # It promised the reference pipeline's crop knob, which it never searched, and not blur
    keys = _augmentation_keys()
    assert keys <= set(AUG_WORDS), f"describe {sorted(keys - set(AUG_WORDS))} in the help"
    script = ast.get_docstring(ast.parse((REPO / "experiments" / "tune_aug.py").read_text()))
    for text in (tune_command.build_parser("aug").description, script):
        first = " ".join(text.split("\n\n")[0].split())  # the summary paragraph, unwrapped
        assert [k for k in keys if AUG_WORDS[k] not in first] == [], first
        assert "aug.crop_size" not in keys and "the crop is not searched" in first.lower(), first


def _listed(help_text: str) -> set[int]:
    """The statuses of a --help's "Exit status:" paragraph."""
    assert "\nExit status:\n" in help_text, help_text
    paragraph = help_text.split("\nExit status:\n", 1)[1]
    return {int(s) for s in re.findall(r"^  (\d+) ", paragraph, re.MULTILINE)}


def _returned(main, module) -> set[int]:
    """The statuses ``main`` returns: its return statements' numbers and named constants
    (``fail(...)``: 1)."""
    out = set()
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(main)))):
        if not isinstance(node, ast.Return):
            continue
        value = node.value
        if isinstance(value, ast.Constant) and isinstance(value.value, int):
            out.add(value.value)
        elif isinstance(value, ast.Name):
            out.add(getattr(module, value.id))
        elif isinstance(value, ast.Call) and getattr(value.func, "id", None) == "fail":
            out.add(1)
        else:
            raise AssertionError(f"a return status this test cannot read: {ast.unparse(value)}")
    return out


def _usage_status(parser) -> int:
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["--no-such-flag"])
    return e.value.code


def test_fail_returns_1(capsys):
    assert bldseg.commands.fail("x") == 1  # what _returned takes a fail(...) for


def test_a_lost_cluster_ends_the_search_process_with_its_status():
    # the status the searches and the pipeline end with outside main (ClusterWatch's callback)
    assert "os._exit(EXIT_CLUSTER_LOST)" in inspect.getsource(runner)


@pytest.mark.parametrize("search", ["aug", "sched", "tau"])
def test_a_search_help_lists_every_exit_status(search, capsys):
    parser = tune_command.build_parser(search, prog=f"bldseg tune {search}")
    statuses = _returned(tune_cli.main, tune_cli) | {_usage_status(parser)}
    statuses.add(runner.EXIT_CLUSTER_LOST)
    assert statuses == {0, 1, 2, 3, 130}
    assert _listed(parser.format_help()) == statuses


def test_the_pipeline_help_lists_every_exit_status(capsys):
    parser = pipeline.build_parser("bldseg pipeline")
    statuses = _returned(pipeline.main, pipeline) | {_usage_status(parser)}
    statuses.add(runner.EXIT_CLUSTER_LOST)  # a search stage's lost cluster ends the process
    assert statuses == {0, 1, 2, 3, 130}
    assert _listed(parser.format_help()) == statuses


def test_the_readme_lists_the_exit_statuses_of_the_searches_and_the_pipeline():
    readme = (REPO / "README.md").read_text()
    table = readme.split("\nExit status:\n", 1)[1].strip().split("\n\n", 1)[0]
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert {int(row[0].strip("| ")) for row in rows} == {0, 1, 2, 3, 130}
    # each row says the same as the commands' --help: its first words
    for row in rows:
        status = int(row[0].strip("| "))
        for cell, statuses in ((row[1], tune_cli.EXIT_STATUSES), (row[2], pipeline.EXIT_STATUSES)):
            said = re.sub(r"[`|]", "", cell).strip()
            assert statuses[status].startswith(said.split(";")[0].split(":")[0]), (status, said)
