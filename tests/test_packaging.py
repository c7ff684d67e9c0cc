"""The wheel holds the whole package: every sub-package, the search spaces, the native sources.

The slow test is the issue's "done when": a wheel built from the working tree, installed
(not editable) into a bare folder and run from another folder, compiles the native ops from its
own sources and runs a search and a prediction through the ``bldseg`` console script.
"""

import fnmatch
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
PACKAGES = SETUPTOOLS["packages"]
PACKAGE_DIR = SETUPTOOLS.get("package-dir", {})


def _folder(package: str) -> Path:
    """The repository folder a package is built from (``package-dir``, longest prefix first)."""
    for prefix in sorted(PACKAGE_DIR, key=len, reverse=True):
        if package == prefix or package.startswith(prefix + "."):
            rest = package[len(prefix) :].lstrip(".").split(".")
            return REPO.joinpath(PACKAGE_DIR[prefix], *filter(None, rest))
    return REPO.joinpath(*package.split("."))


def _package_name(folder: Path) -> str:
    """The package a repository folder installs as (the inverse of :func:`_folder`)."""
    rel = folder.relative_to(REPO)
    for package, src in PACKAGE_DIR.items():
        if rel == Path(src) or Path(src) in rel.parents:
            return ".".join([package, *rel.relative_to(src).parts])
    return ".".join(rel.parts)


def _sub_folders(root: Path, keep) -> list[Path]:
    return [
        p
        for p in [root, *sorted(root.rglob("*"))]
        if p.is_dir() and p.name != "__pycache__" and keep(p)
    ]


def test_every_package_folder_is_listed():
    """A new sub-package (or csrc/ folder) must be named in pyproject's explicit list."""
    folders = _sub_folders(REPO / "bldseg", lambda p: (p / "__init__.py").is_file())
    folders += _sub_folders(REPO / "tune_spaces", lambda p: any(p.glob("*.py")))
    folders += _sub_folders(REPO / "csrc", lambda p: any(f.is_file() for f in p.iterdir()))
    names = [_package_name(f) for f in folders]
    assert "bldseg.commands" in names and "bldseg._csrc.dcnv3.cpu" in names
    missing = sorted(set(names) - set(PACKAGES))
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml: {missing}"
    stale = [p for p in PACKAGES if not _folder(p).is_dir()]
    assert not stale, f"packages without a folder: {stale}"
    assert len(PACKAGES) == len(set(PACKAGES))


def test_every_native_source_is_package_data():
    """Each file under csrc/ matches a package-data pattern, so the wheel can build the ops."""
    patterns = SETUPTOOLS["package-data"]["bldseg._csrc"]
    files = [p for p in (REPO / "csrc").rglob("*") if p.is_file()]
    assert files
    unshipped = [
        str(p.relative_to(REPO))
        for p in files
        if not any(fnmatch.fnmatch(p.name, pat.rsplit("/", 1)[-1]) for pat in patterns)
    ]
    assert not unshipped, f"not in [tool.setuptools.package-data]: {unshipped}"


def test_console_script_entry_point():
    assert PYPROJECT["project"]["scripts"] == {"bldseg": "bldseg.cli:main"}
    module, func = PYPROJECT["project"]["scripts"]["bldseg"].split(":")
    assert callable(getattr(importlib.import_module(module), func))


# --------------------------------------------------------------------------------------------
# The installed wheel, end to end
# --------------------------------------------------------------------------------------------

# Run by the installed copy's Python from a folder outside the repository: argv = the install
# folder (T) and the fresh build root ($BLDSEG_BUILD_DIR).
CHECK_INSTALLED = """
import sys, warnings
from pathlib import Path

import torch

T, BUILD = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import bldseg
from bldseg.ops import _build

assert Path(bldseg.__file__).resolve().is_relative_to(T), bldseg.__file__
assert _build.CSRC_DIR.resolve().is_relative_to(T), _build.CSRC_DIR
assert _build.build_root().resolve() == BUILD
csrc = T / "bldseg" / "_csrc"
assert list((csrc / "dcnv3" / "cpu").glob("*.cpp")) and list((csrc / "ensemble").glob("*.cpp"))
warnings.simplefilter("error")  # a fallback to the reference warns: make it fail here

def compiled_here(info):
    # Compiled by this process, into the fresh build root, from the installed sources.
    assert info.built and info.folder.resolve().is_relative_to(BUILD), info
    ninja = (info.folder / "build.ninja").read_text().splitlines()
    sources = [Path(line.split()[-1]) for line in ninja if line.startswith("build ")
               and ": compile " in line]
    assert sources and all(s.resolve().is_relative_to(csrc) for s in sources), sources

from bldseg.ops.dcnv3 import dcnv3, load_dcnv3_op
from bldseg.ops.dcnv3_reference import dcnv3_reference

compiled_here(load_dcnv3_op())
g = torch.Generator().manual_seed(0)
x = torch.randn(1, 5, 5, 4, generator=g, dtype=torch.float64)
offset = torch.randn(1, 5, 5, 18, generator=g, dtype=torch.float64)
mask = torch.rand(1, 5, 5, 9, generator=g, dtype=torch.float64)
params = (3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1.0)
out = dcnv3(x, offset, mask, *params, impl="compiled")
torch.testing.assert_close(out, dcnv3_reference(x, offset, mask, *params))

from bldseg.ensemble import kernels

module = kernels.load_native()
compiled_here(kernels._EXT.info)
assert Path(module.__file__).resolve().is_relative_to(BUILD) and module.search_chunk
assert kernels.native_available()

from bldseg.train import optim

optim._EXT.load()
compiled_here(optim._EXT.info)
w = torch.nn.Parameter(torch.ones(3))
sf = optim.AdamWScheduleFree([w], lr=0.1, fused=True)
sf.train()
w.grad = torch.ones(3)
sf.step()
assert torch.all(w < 1), w
print("installed copy OK")
"""


def _run(args: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert r.returncode == 0, f"{args}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs a git checkout: the wheel is built from git's list of files")
    t0 = time.perf_counter()
    times = {}
    python = sys.executable

    # 1. The working tree as it would be committed: tracked + untracked files git does not
    #    ignore (a fresh clone of HEAD would miss uncommitted work).
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    src = tmp_path / "src"
    for rel in filter(None, listed.split("\0")):
        if (REPO / rel).is_file():  # a tracked file deleted in the working tree is left out
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)

    # 2. Build the wheel offline with this environment's setuptools, install it (not
    #    editable) into a bare folder.
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist", "."],
         src, dict(os.environ))  # fmt: skip
    (wheel,) = (src / "dist").glob("bldseg-*.whl")
    with zipfile.ZipFile(wheel) as z:  # Apache-2.0 asks that recipients get its text
        assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist())
    target = tmp_path / "T"
    _run([*pip, "install", "--no-deps", "--no-index", "--target", target, wheel], tmp_path,
         dict(os.environ))  # fmt: skip
    times["build + install"] = time.perf_counter() - t0

    # 3. From another folder, with only the install folder on the path and a fresh build root.
    work = tmp_path / "elsewhere"
    work.mkdir()
    build = tmp_path / "ops"
    #    PATH without this environment's bin/, as when its python is run without activating
    #    it (Makefile, CI, pipx): the loader finds the ninja pip put there by itself.
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "RAY_ADDRESS", "BLDSEG_DCNV3_IMPL")
    }
    bin_dir = Path(python).parent.resolve()
    path = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p]
    env.update(
        PYTHONPATH=str(target),
        BLDSEG_BUILD_DIR=str(build),
        PATH=os.pathsep.join(p for p in path if Path(p).resolve() != bin_dir),
        PYTHONUNBUFFERED="1",
    )
    t = time.perf_counter()
    r = _run([python, "-c", CHECK_INSTALLED, target, build], work, env)
    assert "installed copy OK" in r.stdout
    times["compile both ops"] = time.perf_counter() - t

    # 4. A tiny search and a prediction through the installed console script.
    from bldseg.data.synthetic import generate_world

    world = tmp_path / "world"
    generate_world(
        world, n_train=16, train_size=96, n_test=8, test_size=32, test_scene_size=96, progress=False
    )
    bldseg = target / "bin" / "bldseg"
    data = ["--data", world, "--data-root", tmp_path / "data"]
    t = time.perf_counter()
    r = _run(
        [
            bldseg, "tune", "aug", *data,
            "--trials", "2", "--epochs", "1", "--scheduler", "fifo", "--name", "e2e",
            "--set", "samples_per_epoch=16", "--set", "batch_size=8", "--set", "impl=compiled",
            "--storage", tmp_path / "runs", "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db",
        ],
        work,
        env,
        timeout=900,
    )  # fmt: skip
    times["bldseg tune aug"] = time.perf_counter() - t
    assert "=== e2e: 2 trials ===" in r.stdout
    (checkpoint,) = re.findall(r"checkpoint: (\S+/best\.pt)", r.stdout)
    assert Path(checkpoint).is_file()

    t = time.perf_counter()
    sub = tmp_path / "sub.csv"
    r = _run(
        [bldseg, "predict", "--checkpoint", checkpoint, *data, "--out", sub, "--device", "cpu"],
        work,
        env,
    )
    times["bldseg predict"] = time.perf_counter() - t
    assert f"wrote {sub}: 8 tiles" in r.stdout and "official score vs" in r.stdout
    csv = pd.read_csv(sub)
    assert list(csv.columns) == ["img_id", "mask_rle"]
    assert list(csv["img_id"]) == list(pd.read_csv(world / "test.csv")["img_id"])

    times["total"] = time.perf_counter() - t0
    print("\n" + "\n".join(f"{k:18s} {v:6.1f} s" for k, v in times.items()))


def test_albumentations_update_check_off():
    # albumentations asks PyPI for a newer version at import unless this is set
    code = "import os, bldseg; print(os.environ['NO_ALBUMENTATIONS_UPDATE'])"
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


def test_relative_build_dir_is_made_absolute(tmp_path):
    # Ray trials chdir: a relative $BLDSEG_BUILD_DIR gave every trial its own build
    code = "import bldseg.ops._build as b; print(b.build_root())"
    env = {**os.environ, "BLDSEG_BUILD_DIR": "ops-builds", "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path.resolve() / "ops-builds")
