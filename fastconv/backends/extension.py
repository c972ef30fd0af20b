"""The "extension" backend: the C++ (CPU) and CUDA operators of ``csrc/``, built on first use.

Build. ``torch.utils.cpp_extension.load`` (ninja, honours ``MAX_JOBS``) compiles
``csrc/*.cpp`` (schemas, autograd), ``csrc/cpu/*.cpp`` and, where a CUDA device is present or
``FASTCONV_BUILD_CUDA=1`` asks for it (and torch is a CUDA build and nvcc is found),
``csrc/cuda/*.cu`` into the per-user cache, ``cache_dir("extension", <key>)``, where the key
hashes the sources, the flags, the torch/CUDA/Python versions, the CUDA arch list and the CPU's
features (the CPU code is compiled with ``-march=native``). A file lock keeps two processes from
building the same key at once (a waiting process says whom it waits for, and its progress); a
marker file says a build is complete, and later processes just load the library. Object files
stay in that directory (``cuobjdump`` them there). docs/ARCHITECTURE.md says why each piece
beyond cpp_extension's own flow is there.

Nothing is compiled at ``import fastconv``. The first real use (``unavailable_reason()``)
builds and loads, unless ``FASTCONV_NO_EXTENSION_BUILD=1``, in which case an unbuilt extension
reports itself unavailable. A failed build is remembered with its compiler output, in this
process and on disk for the same key, and is retried only by an explicit ``build()``
(``fastconv build-ext``).

Prebuilt. ``build_prebuilt(DIR)`` (``fastconv build-ext --prebuilt DIR``) builds with portable
CPU flags and copies the library, which links no Python, into DIR with DIR/manifest.json.
``FASTCONV_EXTENSION_LIB=DIR`` loads it (``torch.ops.load_library``) when the manifest's torch
version and source hash match; otherwise it says why and builds as usual (``status()`` says which).

Environment: ``MAX_JOBS`` (parallel compile jobs), ``TORCH_CUDA_ARCH_LIST`` (default
"8.0;9.0"), ``FASTCONV_BUILD_CUDA`` (1: CUDA half without a device; 0: never), ``CUDA_HOME``,
``CXX``, ``FASTCONV_NO_EXTENSION_BUILD=1`` (never build lazily), ``FASTCONV_EXTENSION_LIB``
(prebuilt library), ``FASTCONV_EXTENSION_SOURCES`` (another source tree of csrc/'s layout; the
build tests use it), ``FASTCONV_EXTENSION_FLAGS=minimal`` (diagnosis,
scripts/gpu_proof/errors.py: the CPU half without -march=native, OpenMP and the at::vec
capability macros; a separate cached build).

Builds of one configuration (flags, torch, CUDA, CPU) start from the newest earlier build's
object files, so an edit of one source file recompiles that file only; the newest few builds
per configuration are kept. The system CUDA toolkit may lack headers (cusparse.h) or the
unversioned libcudart.so: those are linked in from the nvidia wheels that the CUDA build of
torch installs (site-packages/nvidia/cu13/...), without shadowing the toolkit's own files.

Python side. Right after the library is loaded, this module registers for every op a fake
(meta) implementation giving shapes, dtypes and strides. The autograd formulas are C++
(``csrc/autograd.cpp``: a Python formula cost ~40 us per layer and step), and their backward
calls the registered ``*_backward`` ops, which refuse double backward (csrc/fastconv.cpp).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import platform
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from .base import OPS, Backend, ConvPasses

_EXT_NAME = "fastconv_ext"
_DEFAULT_ARCH_LIST = "8.0;9.0"
_MARKER = "fastconv-build.json"
_FAILED = "fastconv-build-failed.txt"
_LOG = "fastconv-build.log"

# dtypes the kernels serve, per device type (CUDA: as csrc/cuda dispatches them; its batch norm
# has no float64 kernel)
_CPU_DTYPES = ("float32", "float64", "bfloat16", "float16")
_CUDA_DTYPES = ("float32", "float64", "float16", "bfloat16")
_CUDA_DTYPES_BY_OP = {"batch_norm": ("float32", "float16", "bfloat16")}


class ExtensionBuildError(RuntimeError):
    """The extension could not be built or loaded; the message says why."""


class _NotBuilt(ExtensionBuildError):
    """Not built yet and building is not allowed here (not a failure: not remembered)."""


# ------------------------------------------------------------------------------------------
# build plan


def source_root() -> Optional[Path]:
    """``csrc/`` inside the package (wheel installs) or at the repository root (editable).

    ``$FASTCONV_EXTENSION_SOURCES`` names another directory of the same layout (the build tests
    use it to compile small or deliberately broken source trees).
    """
    here = Path(__file__).resolve()
    override = os.environ.get("FASTCONV_EXTENSION_SOURCES")
    candidates = [Path(override)] if override else [here.parents[1] / "csrc", here.parents[2] / "csrc"]
    for root in candidates:
        if (root / "fastconv.cpp").is_file():
            return root
    return None


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time CUDA_HOME warning (the
    guess it warns about is replaced by _cuda_home())."""
    import logging

    log = logging.getLogger("torch.utils.cpp_extension")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        log.setLevel(level)
    return cpp_extension


def _cuda_home() -> Optional[str]:
    """The CUDA toolkit root: has bin/nvcc and include/cuda_runtime.h.

    torch guesses CUDA_HOME from `which nvcc`, which is wrong when that is a wrapper script
    (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local); the toolkit's own layout decides here.
    """
    cpp_extension = _cpp_extension()

    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"),
                  cpp_extension.CUDA_HOME, "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (home and os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))):
            return home
    return None


def _cuda_decision(cu_sources: list[Path]) -> tuple[bool, str]:
    """Whether to compile the CUDA half, and why (not).

    Only where a CUDA device is present, or when FASTCONV_BUILD_CUDA=1 asks for it (CI's compile
    check of the CUDA sources, a build for another machine): on a GPU-less machine the CUDA half
    is minutes of nvcc for kernels that cannot run.
    """
    import torch

    asked = os.environ.get("FASTCONV_BUILD_CUDA", "").strip().lower()
    if asked in ("0", "false", "no", "off"):
        return False, "disabled by FASTCONV_BUILD_CUDA=0"
    if not cu_sources:
        return False, "no CUDA sources in csrc/cuda"
    if not torch.version.cuda:
        return False, "torch is a CPU-only build"
    if getattr(torch.version, "hip", None):
        return False, "ROCm builds are not supported"
    if not asked and torch.cuda.device_count() == 0:
        return False, "no CUDA device here (FASTCONV_BUILD_CUDA=1 builds the CUDA half anyway)"
    if _cuda_home() is None:
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"CUDA {torch.version.cuda}" + (" (FASTCONV_BUILD_CUDA=1)" if asked else "")


def cuda_arch_flags() -> list[str]:
    """nvcc -gencode flags for $TORCH_CUDA_ARCH_LIST (default "8.0;9.0"), e.g. "8.0;9.0a+PTX"."""
    text = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or _DEFAULT_ARCH_LIST
    flags: list[str] = []
    for item in re.split(r"[;\s]+", text):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", item)
        if not m:
            raise ExtensionBuildError(
                f"TORCH_CUDA_ARCH_LIST entry {item!r} is not of the form 8.0, 9.0a or 9.0+PTX")
        num = f"{m.group(1)}{m.group(2)}{m.group(3)}"
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if m.group(4):
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ExtensionBuildError("TORCH_CUDA_ARCH_LIST is empty")
    return flags


def _vec_flags() -> list[str]:
    """at::vec's instruction set for the CPU kernels: the one torch itself runs with."""
    import torch

    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except Exception:  # pragma: no cover - very old torch, or a non-x86 build
        cap = "DEFAULT"
    # AVX2 even where torch runs AVX512: at::vec's AVX512 comparisons yield k-masks that
    # blendv converts back and forth, and the blend-heavy max-pool loops measured 1.3-1.8x
    # slower that way on this project's CPU machine (Zen, AVX512); plain loops still get
    # AVX512 from -march=native.
    if cap in ("AVX512", "AVX2"):
        return ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _cpu_features() -> str:
    """The CPU's feature flags: -march=native code must be rebuilt on a different CPU."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_wheel_dirs() -> list[Path]:
    """site-packages/nvidia/<pkg> directories installed with the CUDA build of torch."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    out = []
    for loc in spec.submodule_search_locations:
        base = Path(loc)
        # cu13 first: the CUDA 13 wheels put every component in one tree
        for sub in sorted(base.iterdir(), key=lambda p: (p.name != "cu13", p.name)):
            if sub.is_dir() and ((sub / "include").is_dir() or (sub / "lib").is_dir()):
                out.append(sub)
    return out


def _fill_in_dir(dest: Path, sources: list[Path], present: Path, want) -> Optional[Path]:
    """Links into ``dest`` the entries of ``sources`` that ``present`` lacks.

    The system toolkit may lack headers (cusparse.h) or the unversioned libcudart.so that the
    nvidia wheels carry; linking only the missing ones never shadows the toolkit's own files.
    """
    made = False
    for src_dir in sources:
        if not src_dir.is_dir():
            continue
        for entry in sorted(src_dir.iterdir()):
            name = want(entry)
            if name is None or (present / name).exists() or (dest / name).exists():
                continue
            dest.mkdir(parents=True, exist_ok=True)
            try:
                os.symlink(entry, dest / name)
            except FileExistsError:  # another build of this config linked it meanwhile
                pass
            made = True
    return dest if made or dest.is_dir() else None


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def _portable_cpu_flags() -> tuple[list[str], list[str]]:
    """Flags of a prebuilt library's CPU half and the CPU features they need.

    x86-64 with AVX2/FMA/F16C (every x86 server CPU since 2015) and at::vec's AVX2 path; plain
    code elsewhere. Never -march=native: the library runs on another machine.
    """
    if platform.machine() in ("x86_64", "AMD64"):
        return (["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"],
                ["avx2", "fma", "f16c"])
    return [], []


def files_digest(root: Path, suffixes: tuple[str, ...]) -> str:
    """sha256 over every file under ``root`` with one of ``suffixes`` (paths and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def source_hash(root: Optional[Path] = None) -> str:
    """sha256 over every source and header under csrc/ (paths and contents)."""
    root = root or source_root()
    if root is None:
        raise ExtensionBuildError(
            "the C++ sources (csrc/fastconv.cpp) are not present next to the fastconv package")
    return files_digest(root, (".cpp", ".cu", ".h", ".hpp", ".cuh"))


class _Plan:
    """Everything that determines a build: sources, flags, and the cache key derived from them.

    portable: the flags of a prebuilt library (`fastconv build-ext --prebuilt DIR`).
    """

    def __init__(self, portable: bool = False) -> None:
        import torch
        from .. import _cache

        root = source_root()
        if root is None:
            raise ExtensionBuildError(
                "the C++ sources (csrc/fastconv.cpp) are not present next to the fastconv package")
        self.root = root
        # fastconv.cpp (schemas) and autograd.cpp, then the CPU kernels
        self.cpp = sorted(root.glob("*.cpp")) + sorted((root / "cpu").glob("*.cpp"))
        cu = sorted((root / "cuda").glob("*.cu"))
        self.with_cuda, self.cuda_note = _cuda_decision(cu)
        self.cu = cu if self.with_cuda else []
        self.portable = portable
        self.cpu_needs: list[str] = []
        if portable:
            cpu_flags, self.cpu_needs = _portable_cpu_flags()
        else:
            cpu_flags = ["-march=native"] + _vec_flags()
        self.cflags = ["-O3", "-fno-math-errno", "-fopenmp", "-Wno-unknown-pragmas"] + cpu_flags
        # --as-needed drops libtorch_python, which cpp_extension adds and no fastconv code uses:
        # the library then loads into any Python that runs the same torch (prebuilt libraries)
        self.ldflags = ["-fopenmp", "-Wl,--as-needed"]
        if os.environ.get("FASTCONV_EXTENSION_FLAGS", "").strip().lower() == "minimal":
            # diagnosis only: rules the CPU-specific flags in or out as a cause (slower CPU code)
            self.cflags = ["-O2", "-Wno-unknown-pragmas"]
            self.ldflags = ["-Wl,--as-needed"]
        self.cuda_cflags: list[str] = []
        self.arch = ""
        if self.with_cuda:
            self.arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip() or _DEFAULT_ARCH_LIST
            # no --use_fast_math: batch-norm statistics and NaN propagation need IEEE division
            # and comparisons
            self.cuda_cflags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + cuda_arch_flags()
        self.sources = source_hash(root)
        config_parts = {
            "root": str(root), "files": [str(p.relative_to(root)) for p in self.cpp + self.cu],
            "cflags": self.cflags, "ldflags": self.ldflags, "cuda_cflags": self.cuda_cflags,
            "torch": torch.__version__, "cuda": torch.version.cuda if self.with_cuda else None,
            "python": sys.version_info[:2], "cpu": "portable" if portable else _cpu_features(),
            "cxx": os.environ.get("CXX", "c++"), "cuda_home": _cuda_home() if self.with_cuda else None,
        }
        # config: everything but the source contents. Builds of one config share the CUDA
        # fill-in directories (so their compile commands are identical) and a new build
        # starts from the previous one's object files: ninja recompiles only what changed.
        self.config = _digest(config_parts)
        self.key = _digest({"config": self.config, "sources": self.sources})
        self.dir = _cache.cache_dir("extension", self.key)
        self.shared = _cache.cache_dir("extension", f"config-{self.config}")
        self.library = self.dir / f"{_EXT_NAME}.so"


# ------------------------------------------------------------------------------------------
# build and load


_lock = threading.RLock()
_loaded: Optional[dict[str, Any]] = None  # the marker of the library loaded in this process
_failure: Optional[str] = None  # why building/loading failed in this process


def _toolchain_problem() -> Optional[str]:
    cpp_extension = _cpp_extension()

    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler: {cxx!r} is not on PATH (install g++ or set CXX)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not available (pip install ninja)"
    return None


def _ninja_on_path() -> None:
    # `pip install ninja` puts the binary next to the interpreter, which need not be on PATH
    # when the venv is not activated.
    if shutil.which("ninja") is None:
        bindir = os.path.dirname(sys.executable)
        if os.path.exists(os.path.join(bindir, "ninja")):
            os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")


def _tail(text: str, lines: int = 40) -> str:
    rows = [r for r in text.strip().splitlines() if r.strip()]
    return "\n".join(rows[-lines:])


def _compile(plan: _Plan, verbose: bool) -> None:
    """Runs the ninja build into plan.dir (caller holds the file lock)."""
    cpp_extension = _cpp_extension()

    include_paths: list[str] = []
    ldflags = list(plan.ldflags)
    if plan.with_cuda:
        home = Path(_cuda_home() or "")
        wheels = _nvidia_wheel_dirs()
        inc = _fill_in_dir(plan.shared / "cuda-extra-include", [w / "include" for w in wheels],
                           home / "include", lambda p: p.name)
        if inc is not None:
            include_paths.append(str(inc))

        def unversioned(p: Path) -> Optional[str]:
            m = re.fullmatch(r"(lib[\w+-]+)\.so\.\d+", p.name)
            return m.group(1) + ".so" if m else None

        lib_present = home / "lib64" if (home / "lib64").is_dir() else home / "lib"
        lib = _fill_in_dir(plan.shared / "cuda-extra-lib", [w / "lib" for w in wheels],
                           lib_present, unversioned)
        if lib is not None:
            ldflags.append(f"-L{lib}")
    stale = plan.dir / "lock"  # torch<2.12's lock file blocks forever if a build was killed
    if stale.exists():
        stale.unlink()
    saved_home = cpp_extension.CUDA_HOME
    if plan.with_cuda:
        cpp_extension.CUDA_HOME = _cuda_home()  # torch reads this global when it builds
    try:
        _load_ext(cpp_extension, plan, include_paths, ldflags, verbose)
    finally:
        cpp_extension.CUDA_HOME = saved_home


def _load_ext(cpp_extension, plan: _Plan, include_paths: list[str], ldflags: list[str],
              verbose: bool) -> None:
    cpp_extension.load(
        name=_EXT_NAME,
        sources=[str(p) for p in plan.cpp + plan.cu],
        extra_cflags=plan.cflags,
        extra_cuda_cflags=plan.cuda_cflags,
        extra_ldflags=ldflags,
        extra_include_paths=include_paths,
        build_directory=str(plan.dir),
        verbose=verbose,
        with_cuda=plan.with_cuda,
        is_python_module=False,
    )


def _seed_from_previous_build(plan: _Plan) -> bool:
    """Copies the newest same-config build's object files and ninja logs into plan.dir.

    copy2 keeps their times, so ninja rebuilds exactly the objects whose sources (or included
    headers) changed since, and links; a first build of a config copies nothing.
    """
    from .. import _cache

    if any(plan.dir.glob("*.o")):
        return True
    best, best_time = None, 0.0
    for marker in plan.dir.parent.glob(f"*/{_MARKER}"):
        info = _cache.read_json(marker)
        if not info or info.get("config") != plan.config or marker.parent == plan.dir:
            continue
        t = marker.stat().st_mtime
        if t > best_time:
            best, best_time = marker.parent, t
    if best is None:
        return False
    for src in [*best.glob("*.o"), best / ".ninja_deps", best / ".ninja_log"]:
        if src.is_file():
            shutil.copy2(src, plan.dir / src.name)
    return True


_KEEP_BUILDS = 3  # per config: each edit of csrc/ makes a new one (~25 MB with CUDA objects)


def _prune_old_builds(plan: _Plan) -> None:
    """Deletes all but the newest few completed builds of plan's config.

    A process that already loaded a deleted library keeps its mapping (Linux semantics)."""
    from .. import _cache

    builds = []
    for marker in plan.dir.parent.glob(f"*/{_MARKER}"):
        info = _cache.read_json(marker)
        if info and info.get("config") == plan.config and marker.parent != plan.dir:
            builds.append((marker.stat().st_mtime, marker.parent))
    for _, old in sorted(builds, reverse=True)[_KEEP_BUILDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)
        lock = old.parent / f"{old.name}.lock"
        if lock.exists():
            lock.unlink()


_WAIT_REPORT_S = 15.0  # a process waiting on another's build says so this often


def _lock_holder(fd: int) -> str:
    """Who holds the build lock, from what the holder wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "null")
        since = time.strftime("%H:%M:%S", time.localtime(info["since"]))
        ago = time.time() - info["since"]
        return f"pid {info['pid']} on {info['host']} (building since {since}, {ago:.0f} s ago)"
    except Exception:  # written by an older fastconv, or being rewritten right now
        return "another process"


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """The per-key build lock (fcntl: released by the kernel if the holder dies).

    The holder writes its pid, host and start time into the lock file; a process that has to
    wait prints who it waits for and then its progress every ~15 s, instead of hanging silently
    for the minutes a build takes.
    """
    import fcntl
    import socket

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            start = time.monotonic()
            print(f"fastconv: waiting for the extension build of {_lock_holder(fd)} ({path})",
                  file=sys.stderr, flush=True)
            next_report = start + _WAIT_REPORT_S
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    time.sleep(0.25)
                if time.monotonic() >= next_report:
                    next_report += _WAIT_REPORT_S
                    print(f"fastconv: still waiting ({time.monotonic() - start:.0f} s) for "
                          f"{_lock_holder(fd)}", file=sys.stderr, flush=True)
            print(f"fastconv: the other build finished; waited {time.monotonic() - start:.0f} s",
                  file=sys.stderr, flush=True)
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        os.ftruncate(fd, 0)
        os.pwrite(fd, me.encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _build_and_load(plan: _Plan, *, allow_build: bool, retry_failed: bool, verbose: bool) -> None:
    """Loads the cached build of ``plan``, building it first if needed. Raises ExtensionBuildError."""
    global _loaded
    from .. import _cache

    marker = plan.dir / _MARKER
    failed = plan.dir / _FAILED
    info = _cache.read_json(marker)
    if info is None or not plan.library.is_file():
        if not retry_failed and failed.is_file():
            raise ExtensionBuildError(
                f"an earlier build of this extension failed (run `fastconv build-ext` to retry); "
                f"its output ends with:\n{failed.read_text()}")
        if not allow_build:
            if _truthy("FASTCONV_NO_EXTENSION_BUILD"):
                raise _NotBuilt("the C++ extension is not built and FASTCONV_NO_EXTENSION_BUILD "
                                "forbids building it here; run `fastconv build-ext`")
            raise _NotBuilt("the C++ extension is not built yet (it builds on first use, or "
                            "run `fastconv build-ext`)")
        problem = _toolchain_problem()
        if problem:
            raise ExtensionBuildError(problem)
        with _build_lock(plan.dir.parent / f"{plan.key}.lock"):
            info = _cache.read_json(marker)  # another process may have finished meanwhile
            if (info is None or not plan.library.is_file()) and not retry_failed \
                    and failed.is_file():
                raise ExtensionBuildError(
                    f"the build of this extension failed (run `fastconv build-ext` to retry); "
                    f"its output ends with:\n{failed.read_text()}")
            if info is None or not plan.library.is_file():
                what = "C++/CUDA" if plan.with_cuda else "C++"
                if _seed_from_previous_build(plan):
                    when = "sources changed: recompiling what changed"
                else:
                    when = f"first use, ~{'5-10' if plan.with_cuda else '2-4'} min"
                print(f"fastconv: building the {what} extension ({when}) in {plan.dir} ...",
                      file=sys.stderr, flush=True)

                def record_failure(text: str) -> None:
                    _cache.atomic_write_text(failed, _tail(text) + "\n")
                    print(f"fastconv: the extension build failed; see {plan.dir / _LOG}",
                          file=sys.stderr, flush=True)

                seconds = _compile_logged(plan, verbose, "the extension", record_failure)
                info = {"library": str(plan.library), "cuda": plan.with_cuda,
                        "cuda_note": plan.cuda_note, "arch": plan.arch, "key": plan.key,
                        "config": plan.config, "seconds": seconds}
                _cache.atomic_write_json(marker, info)
                if failed.exists():
                    failed.unlink()
                _prune_old_builds(plan)
                print(f"fastconv: extension built in {info['seconds']:.0f} s", file=sys.stderr,
                      flush=True)
                _loaded = info  # cpp_extension.load has loaded it already
                _register_python_side()
                return
    _load_library(info)


def _compile_logged(plan: _Plan, verbose: bool, what: str,
                    on_failure: Callable[[str], None] = lambda text: None) -> float:
    """Compiles ``plan`` (``what``: how the error names it) and returns the seconds it took; on
    a compiler error writes the full output to the build's log, calls ``on_failure`` with it
    and raises with its tail."""
    from .. import _cache

    start = time.monotonic()
    _ninja_on_path()
    try:
        _compile(plan, verbose)
    except Exception as exc:  # compiler errors arrive as RuntimeError text
        text = str(exc)
        _cache.atomic_write_text(plan.dir / _LOG, text + "\n")
        on_failure(text)
        raise ExtensionBuildError(
            f"building {what} failed (full log: {plan.dir / _LOG}):\n{_tail(text)}") from exc
    return round(time.monotonic() - start, 1)


def _load_library(info: dict[str, Any]) -> None:
    global _loaded
    import torch

    try:
        torch.ops.load_library(info["library"])
    except Exception as exc:
        raise ExtensionBuildError(f"loading {info['library']} failed: {exc}") from exc
    _loaded = info
    _register_python_side()


# ------------------------------------------------------------------------------------------
# prebuilt libraries (FASTCONV_EXTENSION_LIB=DIR)

_MANIFEST = "manifest.json"
_prebuilt_note: Optional[str] = None  # what happened to $FASTCONV_EXTENSION_LIB in this process


def build_prebuilt(dest: Path, verbose: bool = False) -> dict[str, Any]:
    """Builds the extension with portable flags and copies it into ``dest`` with a manifest.

    The library registers its ops with TORCH_LIBRARY and links no Python, so any Python running
    the same torch loads it (FASTCONV_EXTENSION_LIB=dest). The CUDA half follows the usual rule
    (a device present, or FASTCONV_BUILD_CUDA=1), for TORCH_CUDA_ARCH_LIST's architectures.
    """
    import torch
    from .. import _cache

    plan = _Plan(portable=True)
    problem = _toolchain_problem()
    if problem:
        raise ExtensionBuildError(problem)
    with _lock:
        if (_cache.read_json(plan.dir / _MARKER) is None or not plan.library.is_file()):
            with _build_lock(plan.dir.parent / f"{plan.key}.lock"):
                if _cache.read_json(plan.dir / _MARKER) is None or not plan.library.is_file():
                    print(f"fastconv: building a prebuilt extension in {plan.dir} ...",
                          file=sys.stderr, flush=True)
                    # cpp_extension.load also loads it here: this process must not load
                    # another fastconv library afterwards (build-ext --prebuilt exits)
                    seconds = _compile_logged(plan, verbose, "the prebuilt extension")
                    _cache.atomic_write_json(plan.dir / _MARKER, {
                        "library": str(plan.library), "cuda": plan.with_cuda, "key": plan.key,
                        "config": plan.config, "seconds": seconds})
    dest.mkdir(parents=True, exist_ok=True)
    tmp = dest / f".{_EXT_NAME}.so.{os.getpid()}"
    shutil.copy2(plan.library, tmp)
    os.replace(tmp, dest / f"{_EXT_NAME}.so")
    manifest = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "sources": plan.sources, "cuda_archs": plan.arch if plan.with_cuda else "",
                "cuda_note": plan.cuda_note, "cpu_needs": plan.cpu_needs,
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _cache.atomic_write_json(dest / _MANIFEST, manifest)
    return manifest


def _prebuilt_mismatch(lib_dir: Path) -> tuple[Optional[str], dict[str, Any]]:
    """Why the prebuilt library in lib_dir cannot serve this process (None: it can)."""
    import torch
    from .. import _cache

    manifest = _cache.read_json(lib_dir / _MANIFEST)
    if not isinstance(manifest, dict):
        return f"no readable {_MANIFEST} in {lib_dir}", {}
    if not (lib_dir / f"{_EXT_NAME}.so").is_file():
        return f"{lib_dir / f'{_EXT_NAME}.so'} is missing", manifest
    # The local part (+cu130) names the wheel's index, not its ABI: PyPI's 2.11.0 and the GPU
    # image's 2.11.0+cu130 are one libtorch. A different CUDA major version is a different ABI.
    base = lambda v: str(v).split("+")[0]  # noqa: E731
    major = lambda v: str(v or "").split(".")[0]  # noqa: E731
    if base(manifest.get("torch")) != base(torch.__version__):
        return (f"built for torch {manifest.get('torch')}, this is torch {torch.__version__}",
                manifest)
    if manifest.get("cuda_archs") and major(manifest.get("torch_cuda")) != major(torch.version.cuda):
        return (f"built against CUDA {manifest.get('torch_cuda')}, this torch uses CUDA "
                f"{torch.version.cuda}", manifest)
    if manifest.get("sources") != source_hash():
        return "built from other sources than this csrc/ (source hash differs)", manifest
    have = set(_cpu_features().split())
    missing = [f for f in manifest.get("cpu_needs", []) if f not in have]
    if missing:
        return f"this CPU lacks {', '.join(missing)}", manifest
    return None, manifest


def _load_prebuilt(lib_dir: Path) -> Optional[str]:
    """Loads lib_dir's library if its manifest matches; returns None or why not."""
    global _prebuilt_note
    reason, manifest = _prebuilt_mismatch(lib_dir)
    if reason is None:
        info = {"library": str(lib_dir / f"{_EXT_NAME}.so"), "cuda": bool(manifest["cuda_archs"]),
                "cuda_note": manifest.get("cuda_note", ""), "arch": manifest["cuda_archs"],
                "prebuilt": str(lib_dir)}
        try:
            _load_library(info)
        except ExtensionBuildError as exc:
            reason = str(exc)
    if reason is None:
        _prebuilt_note = (f"prebuilt library loaded from {lib_dir} (built "
                          f"{manifest.get('built_at')}, torch {manifest['torch']})")
    else:
        _prebuilt_note = f"prebuilt library in {lib_dir} not used: {reason}"
        print(f"fastconv: {_prebuilt_note}; using the per-user build", file=sys.stderr, flush=True)
    return reason


def _ensure(*, allow_build: bool, retry_failed: bool = False, verbose: bool = False) -> Optional[str]:
    """Loads (building if allowed) once per process; returns None or why it is unavailable."""
    global _failure
    with _lock:
        if _loaded is not None:
            return None
        if _failure is not None and not retry_failed:
            return _failure
        lib_dir = os.environ.get("FASTCONV_EXTENSION_LIB", "").strip()
        if lib_dir and _prebuilt_note is None:
            try:
                if _load_prebuilt(Path(lib_dir)) is None:
                    return None
            except Exception as exc:  # a broken manifest must not take the backend down
                _note_prebuilt_failure(lib_dir, exc)
        try:
            plan = _Plan()
            _build_and_load(plan, allow_build=allow_build, retry_failed=retry_failed,
                            verbose=verbose)
        except _NotBuilt as exc:
            return str(exc)  # may still be built later in this process
        except ExtensionBuildError as exc:
            _failure = str(exc)
            return _failure
        except Exception as exc:  # an unsafe cache dir, a broken torch: never crash the caller
            _failure = f"{type(exc).__name__}: {exc}"
            return _failure
        _failure = None
        return None


def _note_prebuilt_failure(lib_dir: str, exc: Exception) -> None:
    global _prebuilt_note
    _prebuilt_note = f"prebuilt library in {lib_dir} not used: {type(exc).__name__}: {exc}"
    print(f"fastconv: {_prebuilt_note}", file=sys.stderr, flush=True)


def build(verbose: bool = False) -> Path:
    """Builds (or reuses) and loads the extension; returns the build directory.

    Retries a build that failed before. Raises :class:`ExtensionBuildError` with the reason.
    """
    reason = _ensure(allow_build=True, retry_failed=True, verbose=verbose)
    if reason is not None:
        raise ExtensionBuildError(reason)
    assert _loaded is not None
    return Path(_loaded["library"]).parent


def build_directory() -> Path:
    """Where the current sources' build lives (or will): .so, ninja file, object files."""
    return _Plan().dir


def status(build: bool = False) -> tuple[bool, str]:
    """``(available, description or reason)`` for ``fastconv info``.

    Loads a build that is already cached; builds only when ``build`` is true.
    """
    if _loaded is None:
        reason = _ensure(allow_build=build)
        if reason is not None:
            return False, reason + (f"; {_prebuilt_note}" if _prebuilt_note else "")
    assert _loaded is not None
    cuda = (f"CUDA kernels compiled in (TORCH_CUDA_ARCH_LIST={_loaded['arch']})"
            if _loaded["cuda"] else f"no CUDA kernels ({_loaded['cuda_note']})")
    where = str(Path(_loaded["library"]).parent)
    if _prebuilt_note:
        where = _prebuilt_note if _loaded.get("prebuilt") else f"{where}; {_prebuilt_note}"
    return True, f"CPU kernels ({', '.join(_CPU_DTYPES)}); {cuda}; {where}"


def loaded() -> bool:
    return _loaded is not None


def has_cuda_kernels() -> bool:
    return _loaded is not None and bool(_loaded["cuda"])


# ------------------------------------------------------------------------------------------
# fake implementations and autograd (registered once the library is loaded)


_registered = False


def layout_of(t) -> Any:
    """The memory format an op's output takes from tensor ``t`` (c10's suggest_memory_format)."""
    from ..shapes import suggest_memory_format

    return suggest_memory_format(t)


def _full_input_size(input_size, grad_output):
    if len(input_size) == 2:
        return [grad_output.shape[0], grad_output.shape[1], *input_size]
    return list(input_size)


def _local_index_dtype(kernel_size):
    import torch

    return torch.int8 if kernel_size[0] * kernel_size[1] <= 127 else torch.int32


def _register_python_side() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import torch
    from torch.library import register_fake

    from ..shapes import conv_output_size, pool_output_size

    def empty(shape, like, fmt, dtype=None):
        return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=fmt)

    def nothing(like, dtype=None):
        return torch.empty((0,), dtype=dtype or like.dtype, device=like.device)

    # ---- fakes: shapes, dtypes and strides exactly as the kernels produce them

    @register_fake("fastconv::conv2d_relu")
    def _(input, weight, bias, stride, padding, dilation, groups, relu):
        oh = conv_output_size(input.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
        ow = conv_output_size(input.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
        return empty((input.shape[0], weight.shape[0], oh, ow), input, layout_of(input))

    @register_fake("fastconv::conv2d_relu_backward")
    def _(grad_output, input, weight, output, stride, padding, dilation, groups, relu, output_mask):
        gi = empty(input.shape, input, layout_of(input)) if output_mask[0] else nothing(input)
        gw = empty(weight.shape, weight, layout_of(weight)) if output_mask[1] else nothing(weight)
        gb = (torch.empty((weight.shape[0],), dtype=grad_output.dtype, device=grad_output.device)
              if output_mask[2] else nothing(weight))
        return gi, gw, gb

    @register_fake("fastconv::max_pool2d")
    def _(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices, relu):
        oh = pool_output_size(input.shape[2], kernel_size[0], stride[0], padding[0], dilation[0],
                              ceil_mode)
        ow = pool_output_size(input.shape[3], kernel_size[1], stride[1], padding[1], dilation[1],
                              ceil_mode)
        shape = (input.shape[0], input.shape[1], oh, ow)
        fmt = layout_of(input)
        idx = torch.int64 if return_indices else _local_index_dtype(kernel_size)
        return empty(shape, input, fmt), empty(shape, input, fmt, dtype=idx)

    @register_fake("fastconv::max_pool2d_backward")
    def _(grad_output, output, indices, input_size, kernel_size, stride, padding, dilation,
          ceil_mode, return_indices, relu):
        return empty(_full_input_size(input_size, grad_output), grad_output, layout_of(grad_output))

    @register_fake("fastconv::batch_norm")
    def _(input, weight, bias, running_mean, running_var, training, momentum, eps, relu,
          residual=None):
        c = input.shape[1]
        sdtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        stat = torch.empty((c,), dtype=sdtype, device=input.device)
        return empty(input.shape, input, layout_of(input)), stat, torch.empty_like(stat)

    @register_fake("fastconv::batch_norm_backward")
    def _(grad_output, input, output, weight, save_mean, save_invstd, training, relu, output_mask):
        c = input.shape[1]
        pdtype = weight.dtype if weight is not None else input.dtype
        gi = empty(input.shape, input, layout_of(input)) if output_mask[0] else nothing(input)
        gw = (torch.empty((c,), dtype=pdtype, device=input.device) if output_mask[1]
              else nothing(input))
        gb = (torch.empty((c,), dtype=pdtype, device=input.device) if output_mask[2]
              else nothing(input))
        gr = empty(input.shape, input, layout_of(input)) if output_mask[3] else nothing(input)
        return gi, gw, gb, gr

    @register_fake("fastconv::avg_pool2d")
    def _(input, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        oh = pool_output_size(input.shape[2], kernel_size[0], stride[0], padding[0], 1, ceil_mode)
        ow = pool_output_size(input.shape[3], kernel_size[1], stride[1], padding[1], 1, ceil_mode)
        return empty((input.shape[0], input.shape[1], oh, ow), input, layout_of(input))

    @register_fake("fastconv::avg_pool2d_backward")
    def _(grad_output, input_size, kernel_size, stride, padding, ceil_mode, count_include_pad,
          divisor_override):
        return empty(_full_input_size(input_size, grad_output), grad_output, layout_of(grad_output))

    @register_fake("fastconv::adaptive_avg_pool2d")
    def _(input, output_size):
        return empty((input.shape[0], input.shape[1], *output_size), input, layout_of(input))

    @register_fake("fastconv::adaptive_avg_pool2d_backward")
    def _(grad_output, input_size):
        return empty(_full_input_size(input_size, grad_output), grad_output, layout_of(grad_output))

    # (the autograd kernels of every op are C++: csrc/autograd.cpp)


# ------------------------------------------------------------------------------------------
# the backend


def _dtype_name(t) -> str:
    return str(t.dtype).replace("torch.", "")


class ExtensionConvPasses(ConvPasses):
    """The extension's conv2d_relu and conv2d_relu_backward ops (the backward masks
    grad_output in its own pass, grad_bias on the way)."""

    def forward(self, input, weight, bias, stride, padding, dilation, groups, relu):
        import torch

        return torch.ops.fastconv.conv2d_relu(input, weight, bias, list(stride), list(padding),
                                              list(dilation), int(groups), bool(relu))

    def backward(self, grad_output, input, weight, output, stride, padding, dilation, groups,
                 relu, output_mask):
        import torch

        if output is None:
            output = grad_output.new_empty((0,))
        return torch.ops.fastconv.conv2d_relu_backward(
            grad_output, input, weight, output, list(stride), list(padding), list(dilation),
            int(groups), bool(relu), [bool(m) for m in output_mask])


_PASSES = ExtensionConvPasses()


class ExtensionBackend(Backend):
    """Runs the ops through ``torch.ops.fastconv.*`` (C++ CPU kernels, CUDA kernels if built)."""

    name = "extension"

    def conv2d_relu_passes(self):
        return _PASSES

    def unavailable_reason(self) -> Optional[str]:
        if _loaded is not None:
            return None
        import torch

        if torch.compiler.is_compiling():
            # never build or load inside a trace; convert() calls prepare() beforehand
            return "the extension was not loaded before torch.compile (call fastconv.convert " \
                   "or fastconv.dispatch.prepare() first)"
        return _ensure(allow_build=not _truthy("FASTCONV_NO_EXTENSION_BUILD"))

    def prepare(self) -> None:
        """Load the extension now (building it on first use unless forbidden)."""
        self.unavailable_reason()

    def why_not(self, op: str, args: dict[str, Any]) -> Optional[str]:
        reason = self.unavailable_reason()
        if reason:
            return reason
        if op not in OPS:
            return f"extension has no {op} kernel"
        import torch

        x = args["input"]
        device = x.device.type
        if device == "cuda":
            if not _loaded["cuda"]:
                return f"extension built without CUDA ({_loaded['cuda_note']})"
            if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastconv::{op}", "CUDA"):
                return f"extension has no CUDA kernel for {op}"
            dtypes = _CUDA_DTYPES_BY_OP.get(op, _CUDA_DTYPES)
        elif device == "cpu":
            dtypes = _CPU_DTYPES
        else:
            return f"extension has no kernels for {device} tensors"
        if _dtype_name(x) not in dtypes:
            return f"extension {op} on {device} takes {', '.join(dtypes)}, got {_dtype_name(x)}"
        if op == "conv2d_relu" and args["weight"].dtype != x.dtype:
            return (f"extension conv2d_relu needs weight dtype == input dtype, got "
                    f"{_dtype_name(args['weight'])} and {_dtype_name(x)}")
        if op == "batch_norm":
            if args["training"] and x.numel() == 0:
                return (f"extension batch_norm cannot train on an empty batch (input of shape "
                        f"{tuple(x.shape)}); the torch backend serves it")
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = args.get(name)
                if t is not None and not t.is_floating_point():
                    return f"extension batch_norm needs a floating-point {name}, got {_dtype_name(t)}"
            r = args.get("residual")
            if r is not None and (r.dtype != x.dtype or r.device != x.device):
                return (f"extension batch_norm needs the residual on the input's device and "
                        f"dtype ({x.device}, {_dtype_name(x)}), got {r.device}, {_dtype_name(r)}")
        return None

    def bind(self, op: str, args: dict[str, Any]):
        import torch

        if op == "conv2d_relu":  # the op's overload itself, its arguments converted once
            conv = torch.ops.fastconv.conv2d_relu.default
            rest = (list(args["stride"]), list(args["padding"]), list(args["dilation"]),
                    int(args["groups"]), bool(args["relu"]))
            return lambda input, weight, bias: conv(input, weight, bias, *rest)
        if op == "batch_norm":
            bn = torch.ops.fastconv.batch_norm.default
            rest = (bool(args["training"]), float(args["momentum"]), float(args["eps"]),
                    bool(args["relu"]))
            return lambda x, rm, rv, w, b, residual=None: bn(x, w, b, rm, rv, *rest,
                                                             residual)[0]
        return super().bind(op, args)

    def conv2d_relu(self, input, weight, bias, stride, padding, dilation, groups, relu):
        import torch

        return torch.ops.fastconv.conv2d_relu(input, weight, bias, list(stride), list(padding),
                                              list(dilation), int(groups), bool(relu))

    def max_pool2d(self, input, kernel_size, stride, padding, dilation, ceil_mode,
                   return_indices, relu):
        import torch

        out, indices = torch.ops.fastconv.max_pool2d(
            input, list(kernel_size), list(stride), list(padding), list(dilation),
            bool(ceil_mode), bool(return_indices), bool(relu))
        return (out, indices) if return_indices else out

    def batch_norm(self, input, running_mean, running_var, weight, bias, training, momentum,
                   eps, relu, residual=None):
        import torch

        return torch.ops.fastconv.batch_norm(input, weight, bias, running_mean, running_var,
                                             bool(training), float(momentum), float(eps),
                                             bool(relu), residual)[0]

    def avg_pool2d(self, input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                   divisor_override):
        import torch

        return torch.ops.fastconv.avg_pool2d(input, list(kernel_size), list(stride),
                                             list(padding), bool(ceil_mode),
                                             bool(count_include_pad), divisor_override)

    def adaptive_avg_pool2d(self, input, output_size):
        import torch

        return torch.ops.fastconv.adaptive_avg_pool2d(input, list(output_size))


def _register_if_already_loaded() -> None:
    """If another path loaded the library (torch.ops.load_library), register the Python side.

    torch imports this module when it needs a fake kernel of a fastconv op (set_python_module
    in csrc/fastconv.cpp), so this keeps compile/export working in that case too.
    """
    global _loaded
    if "torch" not in sys.modules:
        return
    import torch

    try:
        has = torch._C._dispatch_has_kernel_for_dispatch_key("fastconv::conv2d_relu", "CPU")
    except Exception:
        return
    if has and _loaded is None:
        cuda = torch._C._dispatch_has_kernel_for_dispatch_key("fastconv::conv2d_relu", "CUDA")
        _loaded = {"library": "(loaded elsewhere)", "cuda": cuda,
                   "cuda_note": "loaded by another path", "arch": "?"}
        _register_python_side()


_register_if_already_loaded()
