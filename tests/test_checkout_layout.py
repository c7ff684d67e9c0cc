"""A checkout used as it is, without the editable install's mapping of its folders."""

import os
import site
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_search_spaces_import_from_a_plain_checkout(tmp_path):
    # `python -m bldseg tune ...` inside a checkout puts the checkout's bldseg/ first (it
    # shadows a `pip install .` copy), and that folder has no tune_spaces/: the spaces live at
    # the top of the checkout. -S: no .pth files, so no editable-install finder either.
    code = (
        "import bldseg.tune_spaces as t\n"
        "from bldseg.tune.runner import get_space\n"
        "print(t.__file__); print(sorted(t.SPACES)); print(callable(get_space('augmentation')))\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *site.getsitepackages()])}
    done = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    file, spaces, found = done.stdout.splitlines()
    assert Path(file) == ROOT / "tune_spaces" / "__init__.py"
    assert "augmentation" in spaces and found == "True"
