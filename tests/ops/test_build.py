"""The JIT loader: caching by content, failure reporting, fallback, concurrency, build CLI."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from bldseg.ops import BuildError, NativeExtension, _build, build_root, dcnv3, dcnv3_reference
from bldseg.ops import build as build_cli
from bldseg.ops._build import load_extension

REPO = Path(__file__).resolve().parents[2]
# The submodule, not the function of the same name that bldseg.ops exports.
dcnv3_module = importlib.import_module("bldseg.ops.dcnv3")

# A tiny CPython extension (no torch headers, so it compiles in about a second) whose result
# comes from a header, to check that headers are part of the build key.
TINY_SOURCE = textwrap.dedent(
    """
    #include <Python.h>
    #include "tiny.h"
    #define BLD_CAT2(a, b) a##b
    #define BLD_CAT(a, b) BLD_CAT2(a, b)
    #define BLD_STR2(x) #x
    #define BLD_STR(x) BLD_STR2(x)
    static PyObject* value(PyObject*, PyObject*) { return PyLong_FromLong(TINY_VALUE); }
    static PyMethodDef methods[] = {{"value", value, METH_NOARGS, ""}, {NULL, NULL, 0, NULL}};
    static struct PyModuleDef def = {
        PyModuleDef_HEAD_INIT, BLD_STR(TORCH_EXTENSION_NAME), NULL, -1, methods};
    PyMODINIT_FUNC BLD_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&def); }
    """
)

# dcnv3's parameters for a 3x3 kernel, 2 groups of 2 channels (inputs of 4 channels)
PARAMS = (3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)

BROKEN_SOURCE = "int bldseg_broken(int x) { return x + bldseg_syntax_error_marker }\n"


def _write_tiny(folder: Path, value: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.h").write_text(f"#define TINY_VALUE {value}\n")
    source = folder / "tiny.cpp"
    source.write_text(TINY_SOURCE)
    return source


def _write_broken(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "broken.cpp"
    source.write_text(BROKEN_SOURCE)
    return source


def test_build_root_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path))
    assert build_root() == tmp_path
    monkeypatch.delenv("BLDSEG_BUILD_DIR")
    assert build_root() == Path.home() / ".cache" / "bldseg" / "ops"


def test_builds_once_and_rebuilds_on_header_change(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    environ_before = dict(os.environ)
    source = _write_tiny(tmp_path / "src", value=7)

    module, info = load_extension("bldseg_tiny", [source], is_python_module=True)
    assert module.value() == 7
    assert info.built and info.folder.parent == tmp_path / "builds"
    assert info.library.is_file() and (info.folder / ".done").is_file()

    again, info_again = load_extension("bldseg_tiny", [source], is_python_module=True)
    assert again is module and not info_again.built  # cached in this process

    (source.parent / "tiny.h").write_text("#define TINY_VALUE 8\n")  # header only
    changed, info_changed = load_extension("bldseg_tiny", [source], is_python_module=True)
    assert changed.value() == 8
    assert info_changed.built and info_changed.folder != info.folder
    assert dict(os.environ) == environ_before  # the loader never writes the environment


def test_build_failure_carries_compiler_message(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    source = _write_broken(tmp_path / "src")
    with pytest.raises(BuildError, match="bldseg_syntax_error_marker") as err:
        load_extension("bldseg_broken", [source])
    assert "error" in str(err.value)
    assert isinstance(err.value, RuntimeError)


def test_unwritable_build_folder_is_a_build_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A read-only home (containers, HPC nodes): the op must fall back, not crash the model.
    # (A folder under a plain file: root may write anywhere else.)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "file" / "builds"))
    with pytest.raises(BuildError, match=r"cannot write the build folder.*BLDSEG_BUILD_DIR"):
        load_extension("bldseg_tiny_ro", [_write_tiny(tmp_path / "src", 1)])
    ext = NativeExtension("bldseg_tiny_ro", [_write_tiny(tmp_path / "src", 1)])
    with pytest.warns(RuntimeWarning, match="cannot write the build folder"):
        assert ext.try_load() is False


def test_native_extension_remembers_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    ext = NativeExtension("bldseg_broken", [_write_broken(tmp_path / "src")])
    with pytest.raises(BuildError) as first:
        ext.load()
    with pytest.raises(BuildError) as second:
        ext.load()
    assert second.value is first.value  # not rebuilt
    assert not ext.ready


def test_auto_falls_back_with_one_warning_and_compiled_raises(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    broken = NativeExtension("bldseg_broken", [_write_broken(tmp_path / "src")])
    monkeypatch.setattr(dcnv3_module, "_OP", broken)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 4, 4, generator=gen, dtype=torch.float64)
    offset = torch.randn(1, 4, 4, 2 * 9 * 2, generator=gen, dtype=torch.float64)
    mask = torch.rand(1, 4, 4, 2 * 9, generator=gen, dtype=torch.float64)
    params = (3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [dcnv3(x, offset, mask, *params, impl="auto") for _ in range(3)]
    ours = [w for w in caught if "bldseg" in str(w.message)]
    assert len(ours) == 1
    assert issubclass(ours[0].category, RuntimeWarning)
    assert "bldseg_syntax_error_marker" in str(ours[0].message)  # the compiler's message
    expected = dcnv3_reference(x, offset, mask, *params)
    for out in outs:
        torch.testing.assert_close(out, expected, atol=0, rtol=0)

    with pytest.raises(BuildError, match="bldseg_syntax_error_marker"):
        dcnv3(x, offset, mask, *params, impl="compiled")

    # impl="reference" (here from the environment) never touches the broken build.
    monkeypatch.setenv(dcnv3_module.IMPL_ENV_VAR, "reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(dcnv3(x, offset, mask, *params), expected, atol=0, rtol=0)


def test_fallback_warning_points_at_the_caller(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # load() and try_load() are wrapped by torch.compiler.disable: a fixed stacklevel named
    # torch's wrapper (torch/_dynamo/eval_frame.py) as the warning's place
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    source = _write_broken(tmp_path / "src")
    with pytest.warns(RuntimeWarning, match="bldseg_broken") as caught:
        NativeExtension("bldseg_broken", [source]).try_load()
    assert caught[0].filename == __file__
    # through the op: the place in bldseg that asked for it, not torch's wrapper
    monkeypatch.setattr(dcnv3_module, "_OP", NativeExtension("bldseg_broken", [source]))
    x = torch.zeros(1, 4, 4, 4)
    with pytest.warns(RuntimeWarning, match="bldseg_broken") as caught:
        dcnv3(x, x.new_zeros(1, 4, 4, 36), x.new_zeros(1, 4, 4, 18), *PARAMS, impl="auto")
    assert caught[0].filename == dcnv3_module.__file__


def test_the_fallback_warning_names_what_runs_instead(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # the ensemble kernel's said "using the pure-PyTorch reference", where its numpy kernel runs
    from bldseg.ensemble import kernels

    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    source = _write_broken(tmp_path / "src")
    with pytest.warns(RuntimeWarning, match="using the pure-PyTorch reference .* instead"):
        NativeExtension("bldseg_broken", [source]).try_load()
    broken = NativeExtension("bldseg_broken", [source], fallback=kernels._EXT.fallback)
    with pytest.warns(RuntimeWarning, match=r"using the numpy kernel \(--kernel numpy"):
        broken.try_load()


def test_concurrent_processes_build_once(tmp_path: Path) -> None:
    # Several fresh processes ask for the same extension at once: one builds, all load it.
    source = _write_tiny(tmp_path / "src", value=11)
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from bldseg.ops._build import load_extension
        module, info = load_extension("bldseg_tiny", [{str(source)!r}], is_python_module=True)
        print(json.dumps({{"value": module.value(), "built": info.built}}))
        """
    )
    env = dict(os.environ, BLDSEG_BUILD_DIR=str(tmp_path / "builds"))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(3)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["value"] for r in results] == [11, 11, 11]
    assert sum(r["built"] for r in results) == 1


def test_stale_torch_lock_of_a_killed_build_is_removed(tmp_path: Path) -> None:
    # torch's builder leaves <folder>/lock when it is SIGKILLed (OOM, a cancelled job); the next
    # build must remove it and build, not wait for it forever. A fresh process, so a hang
    # shows as a timeout here.
    source = _write_tiny(tmp_path / "src", value=13)
    env = dict(os.environ, BLDSEG_BUILD_DIR=str(tmp_path / "first"))
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(REPO)!r})
        from bldseg.ops._build import load_extension
        module, info = load_extension("bldseg_tiny", [{str(source)!r}], is_python_module=True)
        print(json.dumps({{"value": module.value(), "built": info.built,
                          "folder": str(info.folder)}}))
        """
    )

    def load(build_dir: Path) -> tuple[dict, str]:
        proc = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=dict(env, BLDSEG_BUILD_DIR=str(build_dir)),
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    first, _ = load(tmp_path / "first")  # where this extension's folder is named
    folder = tmp_path / "builds" / Path(first["folder"]).name
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what a killed build leaves
    result, err = load(tmp_path / "builds")
    assert result == {"value": 13, "built": True, "folder": str(folder)}
    assert f"removing {folder / 'lock'}" in err and "killed" in err
    assert not (folder / "lock").exists()


def test_ninja_beside_python_is_used_without_activation(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # `.venv/bin/python` run directly (Makefile, CI, pipx): the environment's bin/, where pip
    # put ninja, is not on PATH. PATH here holds only the compiler and binutils.
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja", path=scripts) is None:
        pytest.skip("no ninja beside this Python (pip install ninja)")
    tools = {name: shutil.which(name) for name in ("c++", "as", "ld")}
    if None in tools.values():
        pytest.skip(f"needs a C++ toolchain on PATH: {tools}")
    bare = tmp_path / "bin"
    bare.mkdir()
    for name, path in tools.items():
        (bare / name).symlink_to(path)
    monkeypatch.setenv("PATH", str(bare))
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    assert shutil.which("ninja") is None
    environ_before = dict(os.environ)

    module, info = load_extension(
        "bldseg_tiny", [_write_tiny(tmp_path / "src", value=17)], is_python_module=True
    )
    assert module.value() == 17 and info.built
    assert dict(os.environ) == environ_before  # PATH was widened for the build only


def test_missing_ninja_is_a_build_error_naming_where_it_looked(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import bldseg.ops._build as build_module

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    # neither the ninja package nor the scripts folder holds ninja
    monkeypatch.setitem(sys.modules, "ninja", None)
    monkeypatch.setattr(build_module.sysconfig, "get_path", lambda name: str(empty))
    with pytest.raises(BuildError, match=r"ninja was found neither on PATH.*pip install ninja"):
        load_extension("bldseg_tiny_no_ninja", [_write_tiny(tmp_path / "src", value=19)])


def test_build_cli_prints_folder_and_seconds(dcnv3_op, capsys: pytest.CaptureFixture) -> None:
    from bldseg.train import optim

    assert build_cli.main([]) == 0
    out = capsys.readouterr().out
    assert str(dcnv3_op.folder) in out
    # the training ops: DCNv3 and schedule-free's compiled step, both loaded now
    assert str(optim.load_step_op().folder) in out and "schedule-free AdamW step" in out
    assert out.count(" s -> ") == 2


def test_build_cli_reports_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    broken = NativeExtension("bldseg_broken", [_write_broken(tmp_path / "src")])
    monkeypatch.setattr(dcnv3_module, "_OP", broken)
    assert build_cli.main([]) == 1
    assert "bldseg_syntax_error_marker" in capsys.readouterr().err


def test_build_key_names_the_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A build folder shared by machines (an NFS home) must not give one compiler's library to
    # another: the key holds the compiler's own --version.
    from bldseg.ops._build import _build_key

    source = _write_tiny(tmp_path / "src", value=1)

    def key() -> str:
        return _build_key("k", [source], ["-O2"], [], [], False, True)

    monkeypatch.delenv("CXX", raising=False)
    base = key()
    assert key() == base
    other = tmp_path / "other-c++"
    other.write_text('#!/bin/sh\necho "other c++ 99.1"\n')
    other.chmod(0o755)
    monkeypatch.setenv("CXX", str(other))
    first = key()
    assert first != base
    other.write_text('#!/bin/sh\necho "other c++ 99.2"\n')  # same path, upgraded
    assert key() not in (base, first)


def test_builds_where_the_filesystem_cannot_lock(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # a build folder on NFS without a lock daemon: flock says ENOLCK; the build went to the
    # fallback path with "cannot write the build folder" although the folder was writable
    import errno
    import fcntl

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    monkeypatch.setenv("BLDSEG_BUILD_DIR", str(tmp_path / "builds"))
    source = _write_tiny(tmp_path / "src", value=5)
    module, info = load_extension("bldseg_tiny_nolock", [source], is_python_module=True)
    assert module.value() == 5 and info.built


def _cuda_home(tmp_path: Path, release: str | None) -> Path:
    """A CUDA_HOME whose bin/nvcc prints ``release`` as nvcc does (None: it fails)."""
    home = tmp_path / f"cuda-{release}"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    said = f"Cuda compilation tools, release {release}, V{release}.89" if release else ""
    nvcc.write_text(f"#!/bin/sh\necho 'nvcc: NVIDIA (R) Cuda compiler driver'\necho '{said}'\n")
    nvcc.chmod(0o755)
    return home


def test_a_cuda_toolkit_of_another_major_version_than_torchs_is_not_built_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's JIT builder does not check it: nvcc 11.8 for a CUDA 12 torch failed every build
    # of the op (its CPU part too), again in every new process and Ray trial
    from torch.utils import cpp_extension

    old, same = _cuda_home(tmp_path, "11.8"), _cuda_home(tmp_path, "12.4")
    assert _build.nvcc_release(old) == "11.8"
    problem = _build.cuda_toolkit_problem(str(old), "12.8")
    assert "is 11.8, torch was built with CUDA 12.8" in problem and "install CUDA 12.x" in problem
    assert _build.cuda_toolkit_problem(str(same), "12.8") is None  # minor versions may differ
    assert "has no nvcc that runs" in _build.cuda_toolkit_problem(str(tmp_path / "none"), "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(old))
    with pytest.warns(RuntimeWarning, match=r"built without their CUDA kernels"):
        assert _build.cuda_build_available() is False
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(same))
    assert _build.cuda_build_available() is True
