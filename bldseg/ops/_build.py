"""The one JIT loader for bldseg's native code.

Every native op (DCNv3, the ensemble search's hot loop, ...) is built here with
``torch.utils.cpp_extension.load`` and ninja, on first use, into a folder keyed by a hash of
all its sources and headers, the torch version, the compiler flags, the CUDA arch list and the
compilers' and C library's versions, so edits and upgrades rebuild and nothing stale is ever
loaded (a build folder on a shared home serves machines with different compilers).

Concurrency: a finished build is marked by a ``.done`` file written last; processes that find
it load the library without building or locking. Otherwise they take a file lock on the key
folder, so when many Ray workers start at once one builds and the others wait, then load. The
holder of that lock also removes the ``lock`` file that torch's own builder leaves in the
folder when a build is killed (torch would otherwise wait for it forever, silently).

Build root: ``$BLDSEG_BUILD_DIR`` if set, else ``~/.cache/bldseg/ops``.

ninja: the one on PATH, else the one ``pip install ninja`` put beside this Python (the ninja
package's ``BIN_DIR``, or the environment's scripts folder), which is not on PATH when the
environment's ``python`` is run without activating it. torch runs ninja through PATH, so in
that case the folder is put at the front of ``PATH`` for the duration of the build only and
the previous value is restored afterwards; the environment is otherwise read, never written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from bldseg.io import file_lock


def _find_csrc() -> Path:
    """The folder of native sources (``csrc/<op>/...``).

    The repository keeps ``csrc/`` at its top level; a wheel ships the same files as the package
    data ``bldseg/_csrc`` (``pyproject.toml`` maps one onto the other), so an installed copy
    (``pip install .``, run from any folder) builds from its own sources.
    """
    installed = Path(__file__).resolve().parents[1] / "_csrc"
    if installed.is_dir():
        return installed
    return Path(__file__).resolve().parents[2] / "csrc"


# Folder holding the native sources (csrc/<op>/...).
CSRC_DIR = _find_csrc()

# Host-code flags. No -march=native (build folders may be shared by different machines) and
# no -ffast-math (the ops must equal the float64 reference within 1e-10).
_BASE_CFLAGS = ("-O3",)  # torch adds the C++ standard it needs
_OPENMP_CFLAGS = ("-fopenmp",)
_OPENMP_LDFLAGS = ("-fopenmp",)
_HEADER_SUFFIXES = (".h", ".hpp", ".cuh", ".inl")

log = logging.getLogger(__name__)

_lock = threading.Lock()
_loaded: dict[str, ModuleType | str] = {}  # key -> module (python) or library path (ops)


class BuildError(RuntimeError):
    """Raised when a native extension cannot be built or loaded; carries the compiler output."""


@dataclass(frozen=True)
class BuildInfo:
    """Where and how an extension was built."""

    name: str  # the extension's base name, e.g. "bldseg_dcnv3"
    folder: Path  # build folder (keyed by the hash of sources, headers, torch, flags, arch)
    library: Path  # the shared library inside ``folder``
    built: bool  # True when this call compiled it, False when a finished build was reused
    seconds: float  # wall time of this call (build or load)
    with_cuda: bool  # whether CUDA sources were compiled in


def build_root() -> Path:
    """Root folder of all build folders: ``$BLDSEG_BUILD_DIR`` or ``~/.cache/bldseg/ops``."""
    env = os.environ.get("BLDSEG_BUILD_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bldseg" / "ops"


def cuda_build_available() -> bool:
    """True when CUDA sources can be compiled and run: a CUDA device and a CUDA toolkit whose
    major version is torch's (:func:`cuda_toolkit_problem`; otherwise warned about once)."""
    from torch.utils.cpp_extension import CUDA_HOME

    if not torch.cuda.is_available() or CUDA_HOME is None:
        return False
    problem = cuda_toolkit_problem(CUDA_HOME, torch.version.cuda)
    if problem is not None:
        _warn_once(problem)
    return problem is None


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def nvcc_release(cuda_home: str | os.PathLike) -> str | None:
    """The release ``cuda_home``'s nvcc reports (``12.8``), or None where it does not run."""
    nvcc = Path(cuda_home, "bin", "nvcc")
    try:
        done = subprocess.run(
            [str(nvcc), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", done.stdout)
    return found.group(1) if found else None


@functools.cache
def cuda_toolkit_problem(cuda_home: str | os.PathLike, torch_cuda: str | None) -> str | None:
    """Why the CUDA toolkit at ``cuda_home`` cannot build for a torch built with CUDA
    ``torch_cuda``, or None. torch's JIT builder does not check it (only its setuptools
    ``BuildExtension`` does): another major version fails every build of the op, CPU part
    included, and each new process (every Ray trial) tries again."""
    release = nvcc_release(cuda_home)
    if release is None:
        return (
            f"CUDA_HOME={cuda_home} has no nvcc that runs: the native ops are built without "
            "their CUDA kernels (CUDA tensors use the reference op); set CUDA_HOME to the CUDA "
            f"toolkit {torch_cuda} that torch was built with"
        )
    if torch_cuda is not None and release.split(".")[0] != torch_cuda.split(".")[0]:
        return (
            f"the CUDA toolkit at {cuda_home} is {release}, torch was built with CUDA "
            f"{torch_cuda}: the native ops are built without their CUDA kernels (CUDA tensors "
            f"use the reference op); install CUDA {torch_cuda.split('.')[0]}.x and point "
            "CUDA_HOME at it"
        )
    return None


def _openmp_supported() -> bool:
    # GCC and Clang on Linux take -fopenmp; Apple Clang does not without extra setup.
    return sys.platform.startswith("linux")


def _cuda_arch_list() -> str:
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))


def _default_depends(sources: Sequence[Path]) -> list[Path]:
    # Every header under the folders of the sources: a header edit must change the key.
    roots = {src.parent for src in sources}
    found = {
        path
        for root in roots
        for path in root.rglob("*")
        if path.is_file() and path.suffix in _HEADER_SUFFIXES
    }
    return sorted(found)


def _tool_version(command: Sequence[str]) -> str:
    """The first line a compiler prints for ``--version`` (its path and version), or why not.

    Part of the build key: a build folder shared between machines (an NFS home) must not
    hand a library built by another compiler or C library to this one.
    """
    try:
        done = subprocess.run(
            [*command, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError) as e:
        return f"{command[0]}: {type(e).__name__}"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    # nvcc prints its release on the last lines, gcc/clang on the first
    return f"{shutil.which(command[0]) or command[0]}: " + " / ".join(lines[:1] + lines[-1:])


def _compilers(with_cuda: bool) -> str:
    """Identity of the compilers torch's extension builder runs, and of the C library."""
    cxx = os.environ.get("CXX", "c++")
    parts = [_tool_version([cxx]), "libc=" + "-".join(platform.libc_ver())]
    if with_cuda:
        from torch.utils import cpp_extension

        home = cpp_extension.CUDA_HOME
        parts.append(_tool_version([str(Path(home, "bin", "nvcc")) if home else "nvcc"]))
    return " | ".join(parts)


def _build_key(
    name: str,
    files: Sequence[Path],
    cflags: Sequence[str],
    cuda_cflags: Sequence[str],
    ldflags: Sequence[str],
    with_cuda: bool,
    is_python_module: bool,
) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    parts = [
        name,
        torch.__version__,
        str(torch.version.cuda),
        sys.version.split()[0],
        platform.machine(),
        " ".join(cflags),
        " ".join(cuda_cflags),
        " ".join(ldflags),
        f"cuda={with_cuda}",
        _cuda_arch_list() if with_cuda else "",
        f"python_module={is_python_module}",
        _compilers(with_cuda),
    ]
    digest.update("\0".join(parts).encode())
    return digest.hexdigest()[:16]


def _load_library(path: Path, module_name: str, is_python_module: bool) -> ModuleType | str:
    if not is_python_module:
        torch.ops.load_library(str(path))
        return str(path)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import the extension {module_name} from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_extension(
    name: str,
    sources: Sequence[str | os.PathLike],
    *,
    depends: Sequence[str | os.PathLike] | None = None,
    cuda_sources: Sequence[str | os.PathLike] = (),
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_include_paths: Sequence[str | os.PathLike] = (),
    is_python_module: bool = False,
    verbose: bool = False,
) -> tuple[ModuleType | str, BuildInfo]:
    """Builds (once per machine) and loads (once per process) a native extension.

    Args:
        name: Base name of the extension; the library is ``<name>_<key>.so``.
        sources: C++ sources, always compiled.
        depends: Extra files that change the build (headers); default: every header under
            the folders of ``sources`` and ``cuda_sources``.
        cuda_sources: Sources (``.cu`` and CUDA glue ``.cpp``) compiled only when
            :func:`cuda_build_available` is true.
        extra_cflags: Host compiler flags added to ``-O3 [-fopenmp]``.
        extra_cuda_cflags: nvcc flags added to ``-O3``.
        extra_include_paths: Include folders (the folders of the sources are not implied).
        is_python_module: True for a pybind11 module (``PYBIND11_MODULE(TORCH_EXTENSION_NAME,
            m)``), returned as a module; False for a library that registers ``torch.ops``
            (``TORCH_LIBRARY``), returned as the library path.
        verbose: Print the compiler commands and output.

    Returns:
        The loaded module (or library path) and a :class:`BuildInfo`.

    Raises:
        BuildError: The build failed (the message carries the compiler output), ninja or a
            source is missing, or the library cannot be loaded.
    """
    start = time.perf_counter()
    src_paths = [Path(s).resolve() for s in sources]
    with_cuda = bool(cuda_sources) and cuda_build_available()
    if with_cuda:
        src_paths += [Path(s).resolve() for s in cuda_sources]
    missing = [str(p) for p in src_paths if not p.is_file()]
    if missing:
        raise BuildError(
            f"extension {name!r}: source files not found: {missing}. bldseg builds its native "
            "ops from csrc/ (bldseg/_csrc in an installed copy); reinstall the package "
            "(pip install .) from a complete checkout."
        )
    if depends is None:
        dep_paths = _default_depends(src_paths + [Path(s).resolve() for s in cuda_sources])
    else:
        dep_paths = [Path(d).resolve() for d in depends]

    cflags = list(_BASE_CFLAGS) + list(extra_cflags)
    ldflags: list[str] = []
    if _openmp_supported():
        cflags += _OPENMP_CFLAGS
        ldflags += _OPENMP_LDFLAGS
    cuda_cflags = ["-O3", *extra_cuda_cflags] if with_cuda else []
    if with_cuda:
        cflags.append("-DBLDSEG_WITH_CUDA")

    key = _build_key(
        name,
        sorted(set(src_paths + dep_paths)),
        cflags,
        cuda_cflags,
        ldflags,
        with_cuda,
        is_python_module,
    )
    # The key is in the module name too, so two versions can be loaded by one process (tests).
    module_name = f"{name}_{key}"
    folder = build_root() / module_name
    library = folder / f"{module_name}.so"
    done = folder / ".done"

    with _lock:
        if key in _loaded:
            info = BuildInfo(name, folder, library, False, time.perf_counter() - start, with_cuda)
            return _loaded[key], info
        built = False
        if not done.is_file():
            built = _build_locked(
                module_name,
                src_paths,
                folder,
                cflags,
                cuda_cflags,
                ldflags,
                [str(p) for p in extra_include_paths],
                with_cuda,
                verbose,
            )
        try:
            loaded = _load_library(library, module_name, is_python_module)
        except (OSError, ImportError, RuntimeError) as err:
            raise BuildError(
                f"extension {name!r} was built in {folder} but could not be loaded: {err}. "
                f"Delete that folder to force a rebuild."
            ) from err
        _loaded[key] = loaded
        info = BuildInfo(name, folder, library, built, time.perf_counter() - start, with_cuda)
        return loaded, info


def _build_locked(
    module_name: str,
    sources: list[Path],
    folder: Path,
    cflags: list[str],
    cuda_cflags: list[str],
    ldflags: list[str],
    include_paths: list[str],
    with_cuda: bool,
    verbose: bool,
) -> bool:
    """Builds under a file lock; returns False when another process finished it meanwhile."""
    from torch.utils.cpp_extension import load

    ninja_folder = _ninja_folder()
    held = contextlib.ExitStack()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        held.enter_context(file_lock(str(folder) + ".lock"))
    except OSError as err:
        # a read-only home (containers, HPC nodes): the callers fall back to the reference op
        raise BuildError(
            f"cannot write the build folder {folder} ({err}); point $BLDSEG_BUILD_DIR at a "
            "writable folder"
        ) from err
    with held:
        done = folder / ".done"
        if done.is_file():
            return False
        _remove_stale_baton(folder)
        try:
            # load() also imports the library; _load_library below loads it again, which is a
            # no-op for an already loaded shared object.
            with _ninja_on_path(ninja_folder):
                load(
                    name=module_name,
                    sources=[str(s) for s in sources],
                    extra_cflags=cflags,
                    extra_cuda_cflags=cuda_cflags,
                    extra_ldflags=ldflags,
                    extra_include_paths=include_paths,
                    build_directory=str(folder),
                    verbose=verbose,
                    with_cuda=with_cuda,
                    is_python_module=False,
                    is_standalone=False,
                )
        except (RuntimeError, OSError, ImportError) as err:
            raise BuildError(f"building {module_name} in {folder} failed:\n{err}") from err
        done.write_text(f"{torch.__version__}\n")
        return True


def _ninja_folder() -> str | None:
    """Where the build finds ninja: None when PATH has it, else the folder to put on PATH.

    ``pip install ninja`` puts the program into the environment's ``bin/`` (``Scripts\\`` on
    Windows), which is on PATH only once the environment is activated; a Makefile, a CI script
    or pipx calling ``.venv/bin/python`` directly does not activate it.

    Raises:
        BuildError: ninja is neither on PATH nor beside this Python.
    """
    if shutil.which("ninja") is not None:
        return None
    candidates = []
    try:
        import ninja  # the PyPI package that ships the program

        candidates.append(str(ninja.BIN_DIR))
    except (ImportError, AttributeError):
        pass
    candidates.append(sysconfig.get_path("scripts"))
    for folder in candidates:
        if folder and shutil.which("ninja", path=folder) is not None:
            return folder
    raise BuildError(
        "ninja was found neither on PATH nor beside this Python "
        f"({', '.join(c for c in candidates if c)}); it is needed to compile bldseg's native "
        "ops. Install it into this environment (pip install ninja) or put it on PATH."
    )


@contextlib.contextmanager
def _ninja_on_path(folder: str | None) -> Iterator[None]:
    """Puts ``folder`` at the front of PATH while torch builds (it runs ``ninja`` by name).

    Only for the duration of the build, under the loader's lock: PATH gets its previous value
    (or absence) back afterwards, unless something else set it meanwhile.
    """
    if folder is None:
        yield
        return
    before = os.environ.get("PATH")
    ours = folder + os.pathsep + before if before else folder
    os.environ["PATH"] = ours
    try:
        yield
    finally:
        if os.environ.get("PATH") == ours:
            if before is None:
                del os.environ["PATH"]
            else:
                os.environ["PATH"] = before


def _remove_stale_baton(folder: Path) -> None:
    """Removes the ``lock`` file a killed build left in ``folder``; call holding bldseg's lock.

    torch's builder creates ``<folder>/lock`` exclusively and removes it only when the build
    returns or raises: after a SIGKILL (an out-of-memory kill, a cancelled job) it stays, and
    every later build of that folder waits for it forever without a word. Every bldseg builder
    takes bldseg's own lock first, so while it is held and the build is not done, no builder
    can be running and a ``lock`` file there is stale.

    Raises:
        BuildError: The file cannot be removed (the message names it).
    """
    baton = folder / "lock"
    if not baton.exists():
        return
    log.warning(
        "bldseg: removing %s, left by an earlier build of %s that was killed before it "
        "finished; rebuilding",
        baton,
        folder.name,
    )
    try:
        baton.unlink(missing_ok=True)
    except OSError as err:
        raise BuildError(
            f"{baton} was left by a build that was killed, and cannot be removed ({err}); "
            "delete it by hand, or the build waits for it forever"
        ) from err


class NativeExtension:
    """One native extension of bldseg: built and loaded on first use, failure remembered.

    Ops hold one instance at module level. ``load()`` builds and loads (raising
    :class:`BuildError` with the compiler output, the same error on every later call, so a
    broken build is not retried in a loop); ``try_load()`` is the fast-path helper: it returns
    False and warns once per process instead of raising.

    Args:
        name: Base name of the extension (see :func:`load_extension`).
        sources: C++ sources, always compiled.
        cuda_sources: Sources compiled only where CUDA can be built.
        on_load: Called once after a successful load with the loaded module or library path,
            e.g. to register fake and autograd implementations of the ops.
        fallback: What runs instead where it cannot be loaded, as its warning names it.
        **options: More keyword arguments of :func:`load_extension`.
    """

    def __init__(
        self,
        name: str,
        sources: Sequence[str | os.PathLike],
        *,
        cuda_sources: Sequence[str | os.PathLike] = (),
        on_load: Callable[[ModuleType | str], None] | None = None,
        fallback: str = "the pure-PyTorch reference (slower, more memory)",
        **options: Any,
    ) -> None:
        self.name = name
        self.fallback = fallback
        self.sources = list(sources)
        self.cuda_sources = list(cuda_sources)
        self.on_load = on_load
        self.options = options
        self.ready = False  # True once loaded; read on every call of an op, so keep it cheap
        self.info: BuildInfo | None = None
        self.library: ModuleType | str | None = None
        self._error: BuildError | None = None
        self._warned = False
        self._lock = threading.Lock()

    @torch.compiler.disable
    def load(self, verbose: bool = False) -> BuildInfo:
        """Builds (if needed) and loads the extension; returns its :class:`BuildInfo`.

        Raises:
            BuildError: The build or the load failed, now or in an earlier call.
        """
        with self._lock:
            if self.ready:
                assert self.info is not None
                return self.info
            if self._error is not None:
                raise self._error
            try:
                library, info = load_extension(
                    self.name,
                    self.sources,
                    cuda_sources=self.cuda_sources,
                    verbose=verbose,
                    **self.options,
                )
                if self.on_load is not None:
                    self.on_load(library)
            except BuildError as err:
                self._error = err
                raise
            self.library, self.info, self.ready = library, info, True
            return info

    @torch.compiler.disable
    def try_load(self) -> bool:
        """Loads the extension; on failure warns once per process and returns False."""
        try:
            self.load()
        except BuildError as err:
            self.warn_once(f"{err}")
            return False
        return True

    def warn_once(self, reason: str) -> None:
        """Warns (once per process) that the fallback runs instead, and why.

        The warning points at the code that called ``try_load`` or this method.
        """
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"bldseg: the native extension {self.name!r} is not available, using "
                f"{self.fallback} instead. Reason: {reason}",
                RuntimeWarning,
                stacklevel=_caller_stacklevel(),
            )


# Frames a warning must not point at: this loader's, and the torch.compiler.disable wrapper
# (torch/_dynamo) around load() and try_load(), which a fixed stacklevel landed in.
_INTERNAL_FRAMES = (__file__, str(Path(torch.__file__).parent / "_dynamo") + os.sep)


def _caller_stacklevel() -> int:
    """The ``stacklevel`` of a warning raised here that names the first frame outside."""
    level, frame = 1, sys._getframe(1)  # level 1: the function calling warnings.warn
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL_FRAMES):
        level, frame = level + 1, frame.f_back
    return level
