"""Error paths of the extension: an op that raises (TORCH_CHECK in csrc/) must give a Python
RuntimeError, never kill the process. On the H100 image (torch 2.11) three tests that make an
extension op raise segfaulted their worker; this stage finds out whether that still happens and,
when a case crashes, why (what scripts/gpu_diag_errors.sh did, folded in).

1. cases, one process each (``-X faulthandler``): a torch-native error (control), the extension
   op raising through its autograd kernel, directly below autograd, through a backward op, on
   CPU and CUDA, and with ``TORCH_SHOW_CPP_STACKTRACES=1`` (torch's own unwinder);
2. only when a case crashed: the library's unwind tables and C++ runtime (``.eh_frame_hdr``
   without a search table is pytorch#117645's failure), the libstdc++/libgcc_s the process
   maps, a cuda-gdb backtrace of the crash, and a one-file mini extension built with the
   extension's flags, with minimal flags and with one flag group dropped at a time: which
   variants crash names the cause.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = ("torch_error", "ext_cpu_autograd", "ext_cpu_direct", "ext_cpu_backward_op",
         "ext_cuda_autograd", "ext_cuda_direct")


# ------------------------------------------------------------------------------------------
# one case, in its own process: python errors.py --case NAME


def _run_case(name: str) -> None:
    import torch

    def ext():
        from fastconv.backends import extension as e

        reason = e.ExtensionBackend().unavailable_reason()
        if reason:
            print("SKIP: extension not loaded:", reason.splitlines()[0])
            sys.exit(3)
        return torch.ops.fastconv

    def expect_error(fn):
        try:
            fn()
        except RuntimeError as exc:
            print("OK: RuntimeError:", str(exc).splitlines()[0][:160])
            return
        print("UNEXPECTED: no error raised")
        sys.exit(4)

    x3 = torch.randn(2, 4, 4)  # 3-D: every op refuses it
    if name == "torch_error":
        expect_error(lambda: torch.empty(2).view(3))
    elif name == "ext_cpu_autograd":
        ops = ext()
        expect_error(lambda: ops.max_pool2d(x3, [2, 2], [2, 2], [0, 0], [1, 1], False, False,
                                            False))
    elif name == "ext_cpu_direct":
        ops = ext()
        with torch._C._AutoDispatchBelowAutograd():
            expect_error(lambda: ops.max_pool2d(x3, [2, 2], [2, 2], [0, 0], [1, 1], False, False,
                                                False))
    elif name == "ext_cpu_backward_op":
        ops = ext()
        expect_error(lambda: ops.avg_pool2d_backward(x3, [2, 4, 4], [2, 2], [2, 2], [0, 0], False,
                                                     True, None))
    elif name in ("ext_cuda_autograd", "ext_cuda_direct"):
        if not torch.cuda.is_available():
            print("SKIP: no CUDA device")
            sys.exit(3)
        ops = ext()
        x = torch.randn(2, 8, 8, 8, device="cuda", dtype=torch.float16)
        w = torch.randn(8, 3, 3, 3, device="cuda", dtype=torch.float16)  # groups mismatch
        call = lambda: ops.conv2d_relu(x, w, None, [1, 1], [0, 0], [1, 1], 1, True)  # noqa: E731
        if name == "ext_cuda_direct":
            with torch._C._AutoDispatchBelowAutograd():
                expect_error(call)
        else:
            expect_error(call)
    elif name == "maps":
        ext()
        seen = []
        for line in open("/proc/self/maps"):
            path = line.split()[-1]
            if any(k in path for k in ("libstdc++", "libgcc_s", "libgomp", "fastconv_ext",
                                       "libc10.so", "libc.so")) and path not in seen:
                seen.append(path)
        print("\n".join(seen))
    else:
        sys.exit(f"unknown case {name}")


def verdict(rc: int, out: str) -> str:
    if rc == 0:
        return "ok"
    if rc == 3:
        return "skip"
    if rc in (124, 137) or rc == -9:
        return "timeout"
    if rc in (139, -11) or "Segmentation fault" in out:
        return "crash:SIGSEGV"
    if rc in (134, -6):
        return "crash:SIGABRT"
    if "Fatal Python error" in out:
        return "crash:fatal"
    return f"rc={rc}"


def _spawn(argv: list[str], timeout: float, env=None) -> tuple[int, str]:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        return res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) \
            else (exc.stdout or "")
        return 124, out


# ------------------------------------------------------------------------------------------
# diagnosis (only after a crash)


def _sh(cmd: str, timeout: float = 30) -> str:
    try:
        res = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
        return (res.stdout + res.stderr).strip()
    except subprocess.TimeoutExpired:
        return "(timed out)"


def library_facts(so: Path) -> dict:
    """Unwind tables and C++ runtime of the built library."""
    facts: dict = {"library": str(so), "exists": so.is_file()}
    if not so.is_file():
        return facts
    hdr = _sh(f"readelf -x .eh_frame_hdr '{so}'")
    hexes = "".join(line.split()[1] for line in hdr.splitlines()
                    if line.strip().startswith("0x"))[:8]
    facts["eh_frame_hdr"] = hexes or "(missing)"
    facts["eh_frame_hdr_search_table"] = bool(hexes) and "ff" not in (hexes[4:6], hexes[6:8])
    facts["pt_gnu_eh_frame"] = "GNU_EH_FRAME" in _sh(f"readelf -lW '{so}'")
    facts["unwinder_symbols_linked_in"] = _sh(
        f"nm -D --defined-only '{so}' | grep -E ' (_Unwind_[A-Za-z]+|__register_frame\\w*|"
        f"__cxa_throw|__gxx_personality_v0)$' || true").splitlines()
    facts["needed"] = [line.split()[0] for line in _sh(f"ldd '{so}'").splitlines()
                       if re.search(r"libstdc|libgcc|libgomp|libc\.so", line)]
    newest: dict = {}  # the newest version the library needs of each runtime
    for fam, ver in re.findall(r"\b(GLIBCXX|CXXABI|GCC|GOMP)_([0-9.]+)", _sh(f"objdump -T '{so}'")):
        key = tuple(int(p) for p in ver.split(".") if p)
        if key > newest.get(fam, ((), ""))[0]:
            newest[fam] = (key, f"{fam}_{ver}")
    facts["symbol_versions"] = sorted(v for _, v in newest.values())
    return facts


def toolchain() -> dict:
    import torch

    cxx = os.environ.get("CXX", "c++")
    return {"cxx": cxx, "cxx_version": _sh(f"{cxx} --version").splitlines()[:1],
            "torch": torch.__version__, "cxx11abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
            "torch_compiler": [line.strip() for line in torch.__config__.show().splitlines()
                               if "GCC" in line or "C++ Version" in line][:3]}


def gdb_backtrace(case: str, work: Path, timeout: float) -> list[str]:
    gdb = shutil.which("cuda-gdb") or shutil.which("gdb")
    if gdb is None:
        return ["(no cuda-gdb or gdb on PATH)"]
    rc, out = _spawn([gdb, "-q", "-batch", "-nx", "-iex", "set auto-solib-add off",
                      "-iex", "set debuginfod enabled off", "-ex", "set pagination off",
                      "-ex", "run", "-ex", "sharedlibrary libgcc_s", "-ex", "sharedlibrary libstdc",
                      "-ex", "sharedlibrary fastconv_ext", "-ex", "sharedlibrary libc10.so",
                      "-ex", "bt 30", "--args", sys.executable, str(HERE / "errors.py"),
                      "--case", case], timeout=timeout)
    (work / f"errors-gdb-{case}.log").write_text(out)
    frames = [line[:200] for line in out.splitlines() if re.match(r"#\d+ ", line)]
    sig = [line for line in out.splitlines() if "received signal" in line][:1]
    return sig + frames[:20]


MINI_CPP = r'''
#include <ATen/core/Tensor.h>
#include <torch/library.h>
#include <stdexcept>
static at::Tensor check4d(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "fcdiag: expected 4-D input, got ", x.dim(), "-D ", x.sizes());
  return x.clone();
}
static at::Tensor plain(const at::Tensor& x) {
  if (x.dim() != 4) throw std::runtime_error("fcdiag: plain std::runtime_error");
  return x.clone();
}
TORCH_LIBRARY(FCDIAG_NS, m) {
  m.def("check4d(Tensor x) -> Tensor");
  m.def("plain(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(FCDIAG_NS, CPU, m) { m.impl("check4d", &check4d); m.impl("plain", &plain); }
'''

MINI_PY = r'''
import json, os, sys
import torch
from torch.utils import cpp_extension
out, variant, mode = sys.argv[1], sys.argv[2], sys.argv[3]
spec = json.load(open(os.path.join(out, "variants.json")))[variant]
ns = "fcdiag_" + variant.replace("-", "_")
bdir = os.path.join(out, "build-" + variant)
os.makedirs(bdir, exist_ok=True)
if spec.get("cxx"):
    os.environ["CXX"] = spec["cxx"]
cpp_extension.load(name=ns, sources=[os.path.join(out, "mini.cpp")],
                   extra_cflags=spec["cflags"] + ["-DFCDIAG_NS=" + ns],
                   extra_ldflags=spec["ldflags"],
                   build_directory=bdir, is_python_module=False, verbose=False, with_cuda=False)
if mode == "build":
    sys.exit(0)
op = getattr(torch.ops, ns)
x3 = torch.randn(2, 3, 4)
if mode == "check4d_autograd":
    torch.library.register_autograd(ns + "::check4d", lambda ctx, g: g)
try:
    (op.plain if mode == "plain" else op.check4d)(x3)
    print("UNEXPECTED: no error raised"); sys.exit(4)
except RuntimeError as exc:
    print("OK:", str(exc).splitlines()[0][:120])
'''


def mini_variants(work: Path, build: bool, timeout: float) -> dict:
    """Builds the mini extension per flag variant (in parallel) and runs its raising ops."""
    from fastconv.backends import extension as e

    mdir = work / "errors-mini"
    mdir.mkdir(exist_ok=True)
    (mdir / "mini.cpp").write_text(MINI_CPP)
    (mdir / "mini.py").write_text(MINI_PY)
    plan = e._Plan()
    cflags, ldflags = list(getattr(plan, "cflags", [])), list(getattr(plan, "ldflags", []))
    base = {"cflags": cflags, "ldflags": ldflags}
    drop = lambda pred: [f for f in cflags if not pred(f)]  # noqa: E731
    variants = {
        "same": base,
        "minimal": {"cflags": ["-O2"], "ldflags": []},
        "no-march": dict(base, cflags=drop(lambda f: f.startswith("-march"))),
        "no-openmp": {"cflags": drop(lambda f: f == "-fopenmp"), "ldflags": []},
        "no-cpucap": dict(base, cflags=drop(lambda f: "CPU_CAPABILITY" in f)),
    }
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    system = "/usr/bin/g++"
    if os.path.exists(system) and cxx and os.path.realpath(cxx) != os.path.realpath(system):
        variants["system-gxx"] = {"cflags": ["-O2"], "ldflags": [], "cxx": system}
    (mdir / "variants.json").write_text(json.dumps(variants, indent=1))
    if not build:
        return {v: "planned (not built in --cpu-smoke)" for v in variants}

    def one(v: str) -> tuple[str, dict]:
        rc, out = _spawn([sys.executable, str(mdir / "mini.py"), str(mdir), v, "build"],
                         max(5.0, timeout - 20))
        if rc != 0:
            return v, {"build": f"failed: {out.strip().splitlines()[-1:] if out.strip() else rc}"}
        row = {"build": "ok"}
        for mode in ("check4d_autograd", "check4d", "plain"):
            rc, out = _spawn([sys.executable, "-X", "faulthandler", str(mdir / "mini.py"),
                              str(mdir), v, mode], 15)
            row[mode] = verdict(rc, out)
        return v, row

    with ThreadPoolExecutor(max_workers=len(variants)) as pool:
        return dict(pool.map(one, variants))


# ------------------------------------------------------------------------------------------


def main() -> None:
    from common import Results, parse_args

    args = parse_args(__doc__)
    work = Path(args.work)
    res = Results(args.work, "errors", args.deadline)
    env = dict(os.environ, FASTCONV_NO_EXTENSION_BUILD="1")  # never start a build from here
    me = str(HERE / "errors.py")
    # the smoke: the control and one extension case (each case is a process importing torch)
    cases = ("torch_error", "ext_cpu_autograd") if args.cpu_smoke else CASES
    runs = [(c, [sys.executable, "-X", "faulthandler", me, "--case", c], env) for c in cases]
    if not args.cpu_smoke:
        runs.append(("ext_cpu_autograd_cppstack",
                     [sys.executable, "-X", "faulthandler", me, "--case", "ext_cpu_autograd"],
                     dict(env, TORCH_SHOW_CPP_STACKTRACES="1")))
    with ThreadPoolExecutor(max_workers=len(runs)) as pool:
        results = list(pool.map(lambda r: (r[0], *_spawn(r[1], 60, r[2])), runs))
    crashed = []
    for name, rc, out in results:
        (work / f"errors-case-{name}.log").write_text(out)
        v = verdict(rc, out)
        first = next((line for line in out.splitlines()
                      if line.startswith(("OK", "SKIP", "UNEXPECTED", "Fatal Python error"))), "")
        status = {"ok": "passed", "skip": "skipped"}.get(v, "failed")
        res.add(name=name, status=status, verdict=v, first_line=first[:200])
        if v.startswith("crash"):
            crashed.append(name)
    if crashed or args.cpu_smoke:
        # the smoke runs the diagnosis' plumbing without building anything
        t0 = time.time()
        try:
            from fastconv.backends import extension as e

            rc, out = _spawn([sys.executable, me, "--case", "maps"], 60, env)
            maps = out.strip().splitlines()
            so = next((m for m in maps if "fastconv_ext" in m), "") or \
                str(e.build_directory() / "fastconv_ext.so")
            diag = {"toolchain": toolchain(), "library": library_facts(Path(so)),
                    "process_maps": maps[-8:]}
            # debugger runs and the mini builds side by side, within what the stage has left
            left = min(120.0, res.time_left() - 5)
            with ThreadPoolExecutor(max_workers=3) as pool:
                gdb = {c: pool.submit(gdb_backtrace, c, work, left)
                       for c in crashed[:2] if left > 10}
                mini = pool.submit(mini_variants, work, not args.cpu_smoke, left) \
                    if left > 25 or args.cpu_smoke else None
                diag["gdb"] = {c: f.result() for c, f in gdb.items()}
                diag["mini_variants"] = mini.result() if mini else "no time left"
            res.add(name="diagnosis", status="passed" if not crashed else "failed",
                    crashed=crashed, seconds=round(time.time() - t0, 1), **diag)
        except Exception as exc:
            from common import first_line

            res.add(name="diagnosis", status="failed", error=first_line(exc), crashed=crashed)
    res.finish(crashed=crashed)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--case":
        sys.path.insert(0, str(HERE.parents[1]))
        _run_case(sys.argv[2])
    else:
        main()
