"""Ahead-of-time compilation of fastconv's Triton kernels for Hopper (sm_90), without a GPU.

Why: CI has no GPU, yet we want to know that every kernel configuration autotuning can pick
builds for an H100, how many registers it takes, whether it spills, how much shared memory it
needs and whether its dots became ``wgmma`` instructions. Triton compiles for any target
offline; ``cuobjdump`` (shipped with Triton) reads the resulting cubin.

Specs
-----
``scripts/aot/specs.py`` lists, per op module, every configuration its launchers or autotuner can
pick (``SPECS``: module -> function returning ``list[KernelSpec]``). Mark the few configurations
that matter most with ``main=True``: ``tests/test_triton_aot.py`` compiles those,
``scripts/aot_report.py`` compiles all of them into ``benchmarks/aot_sm90.md``. A spec gives the
kernel, the types of its runtime arguments and the values of its constexprs::

    KernelSpec(name="max_pool2d_fwd bf16 BLOCK=1024",
               kernel=_max_pool_fwd_kernel,                    # the @triton.jit function
               signature={"x_ptr": "*bf16", "y_ptr": "*bf16",  # every non-constexpr argument;
                          "n_elements": "i32", "C": "i32:16"},  # ":16" = divisible by 16 (as the
               constexprs={"BLOCK": 1024, "RELU": True},        # JIT specialises it at run time)
               num_warps=4, num_stages=1, main=True,
               expect_wgmma=None)                # True: must use wgmma; None: don't care

    res = compile_spec(spec)          # -> AotResult(registers, spill_bytes, stack_bytes, shared_bytes, wgmma,
                                      #              loop_instructions, loop_sync_loads, ...)
    results = compile_modules(["conv2d_relu", "pool", "batch_norm"], main_only=True)

Pointers are marked 16-byte aligned (torch allocations are); integer arguments are not unless
written ``"i32:16"``; an integer the JIT would see as 1 (a unit stride) belongs in ``constexprs``
(``{"sxc": 1}``), since the JIT specialises it so. Type strings are Triton's: ``*fp16``, ``*bf16``, ``*fp32``, ``*i64``, ``i32``,
``i64``, ``fp32``, ``i1``.

Besides resources, the SASS of the hottest loop (the longest backward branch) is summarised: its
instruction count, its synchronous global loads (``LDG``: an MMA operand routed through registers
instead of ``cp.async``/TMA into shared memory) and whether it drains the wgmma queue every
iteration. These are what separate a pipelined GEMM loop from a stalled one, readable without a GPU
(tests/test_triton_aot.py holds the conv kernels to the forward's figures).

``@triton.jit`` returns an interpreter object when ``TRITON_INTERPRET=1`` was set at import, which
cannot be compiled. :func:`compile_modules` therefore compiles in child processes with the
interpreter off whenever it is on here, or when ``jobs > 1``; a spec that crashes the compiler is
reported as a failed build and the rest still compile. From the shell::

    python scripts/aot/compile.py --modules conv2d_relu pool --main-only --jobs 2   # markdown
    python scripts/aot_report.py                       # everything -> benchmarks/aot_sm90.md
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

MODULES = ("conv2d_relu", "pool", "batch_norm")
SM90_SHARED_LIMIT = 227 * 1024  # opt-in dynamic shared memory per block on H100
_SCRIPTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ROOT = os.path.dirname(_SCRIPTS)
for _p in (_ROOT, _SCRIPTS):  # also when run as a script
    if _p not in sys.path:
        sys.path.insert(0, _p)


@dataclass
class KernelSpec:
    name: str
    kernel: Any
    signature: dict[str, str]
    constexprs: dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    main: bool = False
    expect_wgmma: Optional[bool] = None

    def config(self) -> str:
        consts = ", ".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{consts}; warps={self.num_warps} stages={self.num_stages}"

    def key(self) -> tuple:
        """What makes two specs the same compile (and the same report row)."""
        return (self.name, tuple(sorted(self.constexprs.items())), self.num_warps,
                self.num_stages)


def runtime_args(kernel) -> list[str]:
    """The arguments of a @triton.jit ``kernel`` that are not declared ``tl.constexpr``, in
    its own order: what a launcher passes positionally after the tensors it names."""
    fn = _jit_function(kernel)
    return [p.name for p in fn.params if not p.is_constexpr]


def kernel_signature(kernel, constexprs: dict, types: dict[str, str],
                     divisible=frozenset()) -> dict[str, str]:
    """Types of ``kernel``'s runtime arguments, read from the kernel itself: ``types[name]``
    where given (pointers, floats), else ``i32`` (``i32:16`` for names in ``divisible``).
    Arguments in ``constexprs`` (unit strides and None pointers the JIT specialises) are left
    out; a pointer without a type is an error."""
    out = {}
    for name in runtime_args(kernel):
        if name in constexprs:
            continue
        if name in types:
            out[name] = types[name]
        elif name.endswith("_ptr"):
            raise ValueError(f"{_jit_function(kernel).__name__}: no type for pointer {name}")
        else:
            out[name] = "i32:16" if name in divisible else "i32"
    return out


def int_signature(names, values) -> tuple[dict, dict]:
    """(signature, constexprs) of the integer arguments ``names`` given ``values`` as Triton's
    JIT specialises them at launch: a value of 1 becomes a constant (unit strides: what makes
    loads vectorise), a multiple of 16 is marked divisible."""
    sig, consts = {}, {}
    for name, v in zip(names, values, strict=True):
        if v == 1:
            consts[name] = 1
        else:
            sig[name] = "i32:16" if v % 16 == 0 else "i32"
    return sig, consts


@dataclass
class AotResult:
    module: str
    name: str
    config: str
    ok: bool
    error: Optional[str] = None
    registers: Optional[int] = None
    spill_bytes: Optional[int] = None   # per-thread local memory (spills, local arrays)
    stack_bytes: Optional[int] = None
    shared_bytes: Optional[int] = None  # dynamic shared memory Triton requests + static
    wgmma: Optional[bool] = None
    expect_wgmma: Optional[bool] = None
    # the hottest loop (the longest backward-branch body in the SASS): its length, synchronous
    # global loads in it (an MMA operand going through registers: no cp.async pipelining), and
    # whether it waits for every wgmma to finish (no MMA/MMA overlap). None: no SASS or no loop.
    loop_instructions: Optional[int] = None
    loop_sync_loads: Optional[int] = None
    loop_wgmma_wait_all: Optional[bool] = None
    # ptxas's reason (C7515) when it serialises the kernel's wgmma itself, whatever Triton asked
    # for: e.g. a zero-trip path around the main loop that writes the accumulator
    serialized: Optional[str] = None
    main: bool = False
    seconds: float = 0.0
    order: int = 0

    def problems(self) -> list[str]:
        """What a CI check should reject: build failure, spills, stack, too much smem, no wgmma."""
        if not self.ok:
            return [f"does not build: {self.error}"]
        out = []
        if self.spill_bytes:
            out.append(f"spills {self.spill_bytes} B of local memory per thread")
        if self.stack_bytes:
            out.append(f"uses a {self.stack_bytes} B stack")
        if self.shared_bytes is not None and self.shared_bytes > SM90_SHARED_LIMIT:
            out.append(f"needs {self.shared_bytes} B shared memory > {SM90_SHARED_LIMIT}")
        if self.expect_wgmma and not self.wgmma:
            out.append("16-bit dot did not lower to wgmma")
        if self.serialized:
            out.append(f"ptxas serialises wgmma: {self.serialized}")
        return out


def _tool(name: str) -> Optional[str]:
    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else shutil.which(name)


def _jit_function(kernel):
    """The compilable JITFunction behind ``kernel`` (also when it was built for the interpreter)."""
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, JITFunction):
        return kernel
    fn = getattr(kernel, "fn", None)
    if fn is not None and not hasattr(fn, "fn"):
        return JITFunction(fn)
    raise TypeError(f"{kernel!r} is not a @triton.jit function")


def _source(spec: KernelSpec):
    import triton

    fn = _jit_function(spec.kernel)
    signature, attrs = {}, {}
    for i, arg in enumerate(fn.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
            continue
        if arg not in spec.signature:
            raise ValueError(f"{spec.name}: argument {arg!r} has neither a type nor a constexpr value")
        ty = spec.signature[arg]
        divisible = ty.startswith("*") or ty.endswith(":16")
        ty = ty.split(":")[0]
        signature[arg] = ty
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    extra = set(spec.signature) | set(spec.constexprs)
    extra -= set(fn.arg_names)
    if extra:
        raise ValueError(f"{spec.name}: {sorted(extra)} are not arguments of {fn.__name__}")
    return triton.compiler.ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)


def _resource_usage(cubin: bytes) -> dict[str, int]:
    tool = _tool("cuobjdump")
    if tool is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True, check=False).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    if not m:
        return {}
    reg, stack, shared, local = map(int, m.groups())
    return {"registers": reg, "stack": stack, "static_shared": shared, "local": local}


def _sass(cubin: bytes) -> Optional[str]:
    tool = _tool("cuobjdump")
    if tool is None:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=False)
    return res.stdout if res.returncode == 0 else None


def main_loop(sass: str) -> Optional[dict]:
    """The longest loop of a SASS listing (a backward ``BRA``'s body): ``instructions``,
    ``sync_loads`` (``LDG``: global loads into registers, as opposed to ``LDGSTS`` cp.async or
    TMA copies into shared memory) and ``wgmma_wait_all`` (a ``WARPGROUP.DEPBAR.LE gsb0, 0x0``:
    the loop drains the tensor-core queue every iteration)."""
    ins = []
    for line in sass.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            ins.append((int(m.group(1), 16), m.group(2).strip()))
    index = {addr: i for i, (addr, _) in enumerate(ins)}
    best = None
    for i, (addr, text) in enumerate(ins):
        m = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if not m:
            continue
        start = index.get(int(m.group(1), 16))
        if start is None or start >= i or (best and i - start <= best[1] - best[0]):
            continue
        best = (start, i)
    if best is None:
        return None
    body = [t for _, t in ins[best[0]:best[1] + 1]]
    return dict(instructions=len(body),
                sync_loads=sum(1 for t in body if re.search(r"\bLDG\.", t)),
                wgmma_wait_all=any(re.search(r"WARPGROUP\.DEPBAR\.LE\s+gsb0,\s*0x0\b", t)
                                   for t in body))


def _ptxas_serialization(ptx: str, arch: int) -> Optional[str]:
    """Assemble ``ptx`` again with ``ptxas -v`` and return why it serialises wgmma, if it does.

    ptxas reports it only as an info line (C7515), which Triton does not surface; the SASS then
    waits for each wgmma before the next, which the loop analysis also shows as wait-all.
    """
    tool = _tool("ptxas")
    if tool is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        try:
            proc = subprocess.run([tool, f"--gpu-name=sm_{arch}a", "-v", src, "-o",
                                   os.path.join(tmp, "k.cubin")],
                                  capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired):
            return None
    m = re.search(r"wgmma\.mma_async instructions are serialized due to (.*?)(?: in the function|$)",
                  proc.stdout + proc.stderr, re.M)
    return " ".join(m.group(1).split()) if m else None


def compile_spec(spec: KernelSpec, module: str = "", arch: int = 90, order: int = 0) -> AotResult:
    """Compile one spec for ``cuda:<arch>`` (no GPU needed) and read its resource usage."""
    import triton
    from triton.backends.compiler import GPUTarget

    res = AotResult(module=module, name=spec.name, config=spec.config(), ok=False,
                    expect_wgmma=spec.expect_wgmma, main=spec.main, order=order)
    t0 = time.perf_counter()
    try:
        ck = triton.compile(_source(spec), target=GPUTarget("cuda", arch, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        cubin = ck.asm["cubin"]
        usage = _resource_usage(cubin)
        res.registers = usage.get("registers", getattr(ck, "n_regs", None))
        res.spill_bytes = usage.get("local", getattr(ck, "n_spills", None))
        res.stack_bytes = usage.get("stack")
        res.shared_bytes = int(ck.metadata.shared) + usage.get("static_shared", 0)
        in_ptx = "wgmma.mma_async" in ck.asm.get("ptx", "")
        if in_ptx:
            res.serialized = _ptxas_serialization(ck.asm["ptx"], arch)
        sass = _sass(cubin)
        # HGMMA (16-bit, tf32) / IGMMA / QGMMA on sm_90
        res.wgmma = in_ptx if sass is None else (in_ptx and "GMMA" in sass)
        loop = main_loop(sass) if sass is not None else None
        if loop is not None:
            res.loop_instructions = loop["instructions"]
            res.loop_sync_loads = loop["sync_loads"]
            res.loop_wgmma_wait_all = loop["wgmma_wait_all"]
        res.ok = True
    except Exception as exc:  # report, do not abort the whole batch
        res.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    res.seconds = time.perf_counter() - t0
    return res


def module_specs(module: str, main_only: bool = False) -> list[KernelSpec]:
    """The specs of ``module`` (a key of ``specs.SPECS``)."""
    from aot.specs import SPECS

    specs = list(SPECS[module]())
    return [s for s in specs if s.main] if main_only else specs


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _child(modules: list[str], main_only: bool, name_filter: Optional[str], shard: str,
           resume_after: int) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = os.pathsep.join([_SCRIPTS, _ROOT, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "aot.compile", "--stream", "--modules", *modules, "--shard", shard,
           "--resume-after", str(resume_after)]
    if main_only:
        cmd.append("--main-only")
    if name_filter:
        cmd += ["--filter", name_filter]
    return subprocess.Popen(cmd, env=env, cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _run_shard(modules, main_only, name_filter, shard: str, timeout: float) -> list[AotResult]:
    """One child process per shard; the compiler can crash (segfault) on a spec: that spec is
    reported as failed and a new child resumes after it."""
    results, resume_after, deadline = [], -1, time.monotonic() + timeout
    while True:
        proc = _child(modules, main_only, name_filter, shard, resume_after)
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        started = None
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            if "start" in d:
                started = d
            else:
                started = None
                results.append(AotResult(**d))
                resume_after = d["order"]
        if proc.returncode == 0:
            return results
        if started is None:  # died outside a compile: nothing to blame, give up
            raise RuntimeError(f"AOT child process failed ({proc.returncode}):\n{err[-4000:]}")
        results.append(AotResult(module=started["module"], name=started["name"],
                                 config=started["config"], ok=False, main=started["main"],
                                 expect_wgmma=started["expect_wgmma"], order=started["start"],
                                 error=f"compiler process died (exit {proc.returncode})"))
        resume_after = started["start"]


def _iter_specs(modules, main_only, name_filter):
    order = 0
    for module in modules:
        for spec in module_specs(module, main_only):
            if name_filter and not re.search(name_filter, spec.name):
                continue
            yield order, module, spec
            order += 1


def compile_modules(modules: Iterable[str] = MODULES, main_only: bool = False,
                    name_filter: Optional[str] = None, timeout: float = 1800,
                    jobs: int = 1) -> list[AotResult]:
    """Compile every spec of ``modules`` (keys of ``specs.SPECS``).

    With ``jobs > 1``, or when the interpreter is on here, the work runs in ``jobs`` child
    processes (each takes every ``jobs``-th spec), which also survive compiler crashes.
    """
    modules = list(modules)
    if jobs > 1 or _interpreting():
        jobs = max(1, jobs)
        import concurrent.futures as cf

        with cf.ThreadPoolExecutor(jobs) as pool:  # threads only wait on the children
            parts = list(pool.map(lambda i: _run_shard(modules, main_only, name_filter,
                                                       f"{i}/{jobs}", timeout), range(jobs)))
        return sorted((r for part in parts for r in part), key=lambda r: r.order)
    return [compile_spec(spec, module, order=order)
            for order, module, spec in _iter_specs(modules, main_only, name_filter)]


def markdown_table(results: list[AotResult]) -> str:
    lines = ["| module | kernel | main | config | registers | spill / stack (B) | shared (KB) | wgmma "
             "| loop: SASS / LDG / wait-all | ok |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        main = "main" if r.main else ""
        if r.ok:
            wg = "yes" if r.wgmma else "no"
            if r.expect_wgmma and not r.wgmma:
                wg += " (expected)"
            loop = ""
            if r.loop_instructions is not None:
                loop = (f"{r.loop_instructions} / {r.loop_sync_loads} / "
                        f"{'yes' if r.loop_wgmma_wait_all else 'no'}")
            probs = r.problems()
            lines.append(f"| {r.module} | {r.name} | {main} | {r.config} | {r.registers} | "
                         f"{r.spill_bytes} / {r.stack_bytes} | {r.shared_bytes / 1024:.1f} | {wg} | "
                         f"{loop} | {'yes' if not probs else '; '.join(probs)} |")
        else:
            lines.append(f"| {r.module} | {r.name} | {main} | {r.config} | | | | | | {r.error} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modules", nargs="*", default=list(MODULES))
    p.add_argument("--main-only", action="store_true")
    p.add_argument("--filter", default=None, help="regex on spec names")
    p.add_argument("--jobs", type=int, default=1, help="parallel compiler processes")
    # internal: a child process streams one JSON line per spec (and one before it starts)
    p.add_argument("--stream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    p.add_argument("--resume-after", type=int, default=-1, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if not a.stream:
        print(markdown_table(compile_modules(a.modules, a.main_only, a.filter, jobs=a.jobs)))
        return 0
    index, count = (int(v) for v in a.shard.split("/"))
    for order, module, spec in _iter_specs(a.modules, a.main_only, a.filter):
        if order % count != index or order <= a.resume_after:
            continue
        print(json.dumps({"start": order, "module": module, "name": spec.name,
                          "config": spec.config(), "main": spec.main,
                          "expect_wgmma": spec.expect_wgmma}), flush=True)
        print(json.dumps(dataclasses.asdict(compile_spec(spec, module, order=order))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
