#!/usr/bin/env python
"""Registers, stack (spills) and shared memory of every CUDA kernel in csrc/cuda, from the
compiled objects, written to csrc/cuda/RESOURCES.md.

The objects come from the extension's build directory when it holds a build of the current
sources (``*.cuda.o``), else every ``csrc/cuda/*.cu`` is compiled here with nvcc (``-c`` only,
the same flags as the extension build; no GPU needed). ``cuobjdump --dump-resource-usage`` gives
the resources; ``cuobjdump -sass`` is scanned for tensor-core (HMMA) and 16-byte memory
instructions.

    python scripts/cuda_resource_report.py                 # sm_90, write csrc/cuda/RESOURCES.md
    python scripts/cuda_resource_report.py --arch sm_80 --check   # exit 1 on a spill in a main kernel
    python scripts/cuda_resource_report.py --arch sm_90,sm_90a    # several (sm_90a: the wgmma kernel)
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
REPORT = CUDA_DIR / "RESOURCES.md"

# Kernels that must not spill: the tensor-core conv paths with 16-byte loaders (the large-tile
# tc_gemm_kernel and its ReLU-mask pass, the 128x128x32 vector paths) and every pool and
# batch-norm kernel. The scalar-gather conv fallbacks (first layers with C = 1 or 3, odd channel
# counts) may keep a few bytes on the stack at 128 registers.
MAIN_KERNEL_PATTERNS = (
    r"^tc_gemm_kernel<",
    r"^wg_gemm_kernel<",
    r"^mask_bias_kernel<",
    r"mma_gemm_kernel<.*FwdAVec",
    r"mma_gemm_kernel<.*DgradAVec",
    r"mma_gemm_kernel<[^,]*, WgradAVec<[^>]*>, WgradBVec",
    r"^(maxpool|avgpool)_",
    r"^(reduce_nchw|reduce_nhwc|apply_nchw|apply_nhwc|stats_finalize|eval_prep|grad_finalize)",
    r"^simt_gemm_kernel",
)


@dataclass
class Kernel:
    source: str
    arch: str
    mangled: str
    name: str
    regs: int
    stack: int
    shared: int
    local: int
    sass: dict = field(default_factory=dict)

    @property
    def main(self) -> bool:
        return any(re.search(p, self.name) for p in MAIN_KERNEL_PATTERNS)


def find_tool(name: str) -> str | None:
    """A CUDA binary utility: CUDA_HOME, the toolkit on PATH, or the copy Triton ships."""
    cands = []
    for env in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(env):
            cands.append(Path(os.environ[env]) / "bin" / name)
    which = shutil.which(name)
    if which:
        cands.append(Path(which))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(os.path.realpath(nvcc)).parent / name)
        # /usr/local/bin/nvcc may be a wrapper script: look at what it execs
        try:
            text = Path(nvcc).read_text(errors="ignore")[:4096]
            m = re.search(r"(/\S+)/nvcc\b", text)
            if m:
                cands.append(Path(m.group(1)) / name)
        except OSError:
            pass
    cands.append(Path("/usr/local/cuda/bin") / name)
    try:
        import triton

        cands.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)
    except Exception:
        pass
    for c in cands:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def nvcc_command(src: Path, obj: Path, arch: str) -> list[str]:
    """nvcc -c with the extension build's flags (cpp_extension's defaults plus ours)."""
    import torch
    from torch.utils import cpp_extension

    try:
        incs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        incs = cpp_extension.include_paths(cuda=True)
    extra = []
    spec = None
    try:
        import importlib.util

        spec = importlib.util.find_spec("nvidia")
    except Exception:
        pass
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            for sub in sorted(Path(loc).iterdir()):
                if (sub / "include").is_dir():
                    extra.append(str(sub / "include"))
    aten = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    std = "c++20" if aten.is_file() and "C++20" in aten.read_text(errors="ignore") else "c++17"
    num = arch.replace("sm_", "")
    cmd = [find_tool("nvcc") or "nvcc", "-c", str(src), "-o", str(obj), f"-std={std}",
           "-DTORCH_EXTENSION_NAME=fastconv_ext", "-DTORCH_API_INCLUDE_EXTENSION_H",
           f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
           "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
           "--expt-relaxed-constexpr", "-O3", "-lineinfo", "-Xcompiler", "-fPIC",
           f"-gencode=arch=compute_{num},code=sm_{num}"]
    for d in incs + extra:
        cmd += ["-I", d]
    return cmd


def compile_objects(outdir: Path, arch: str = "sm_90", jobs: int | None = None,
                    sources: list[Path] | None = None) -> dict[str, Path]:
    """Compiles every csrc/cuda/*.cu for ``arch``; returns {source name: object}. Raises
    RuntimeError with the compiler output on failure."""
    sources = sources or sorted(CUDA_DIR.glob("*.cu"))
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0") or 0) or max(1, os.cpu_count() or 1)
    outdir.mkdir(parents=True, exist_ok=True)

    def one(src: Path) -> tuple[str, Path]:
        obj = outdir / f"{src.stem}.{arch}.o"
        res = subprocess.run(nvcc_command(src, obj, arch), capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed on {src.name}:\n{res.stdout}\n{res.stderr}")
        return src.name, obj

    with cf.ThreadPoolExecutor(max_workers=jobs) as ex:
        return dict(ex.map(one, sources))


def built_objects() -> dict[str, Path]:
    """Objects of the extension's cached build of the current sources, if it holds them."""
    try:
        sys.path.insert(0, str(ROOT))
        from fastconv.backends import extension

        d = extension.build_directory()
    except Exception:
        return {}
    found = {}
    for src in sorted(CUDA_DIR.glob("*.cu")):
        cand = d / f"{src.stem}.cuda.o"  # ninja's name (csrc/cpu objects are <stem>.o)
        if cand.is_file():
            found[src.name] = cand
    return found if len(found) == len(list(CUDA_DIR.glob("*.cu"))) else {}


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt") or find_tool("cu++filt")
    if not tool or not names:
        return names
    res = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    out = res.stdout.splitlines()
    return out if len(out) == len(names) else names


def short_name(full: str) -> str:
    """'void fastconv_cuda::(anonymous namespace)::mma_gemm_kernel<c10::Half, ...>(...)' ->
    'mma_gemm_kernel<Half, FwdAVec<Half>, ...>'."""
    s = re.sub(r"^void ", "", full)
    s = s.replace("(anonymous namespace)::", "")
    depth, cut = 0, len(s)
    for i, ch in enumerate(s):  # drop the parameter list
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    s = s[:cut]
    s = re.sub(r"\b(fastconv_cuda|convk|c10|at)::", "", s)
    s = s.replace("BFloat16", "BF16").replace("unsigned char", "u8").replace("signed char", "i8")
    return s


def resource_usage(obj: Path, source: str) -> list[Kernel]:
    tool = find_tool("cuobjdump")
    if tool is None:
        raise RuntimeError("cuobjdump not found (CUDA toolkit or triton's backends/nvidia/bin)")
    text = subprocess.run([tool, "--dump-resource-usage", str(obj)], capture_output=True,
                          text=True, check=True).stdout
    rows = []
    arch = "?"
    pending = None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            pending = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and pending:
            rows.append((arch, pending, *map(int, m.groups())))
            pending = None
    names = demangle([r[1] for r in rows])
    kernels = [Kernel(source, a, mg, short_name(nm), reg, stk, sh, loc)
               for (a, mg, reg, stk, sh, loc), nm in zip(rows, names)]
    sass = sass_stats(obj)
    for k in kernels:
        k.sass = sass.get((k.arch, k.mangled), {})
    return kernels


SASS_OPS = {"HMMA": r"\bHMMA\.", "HGMMA": r"\bHGMMA\.", "LDG128": r"\bLDG\.E\.128", "LDGSTS128": r"\bLDGSTS\.E\.\S*128",
            "STG128": r"\bSTG\.E\.128", "LDSM": r"\bLDSM\."}


def sass_stats(obj: Path) -> dict[tuple[str, str], dict[str, int]]:
    tool = find_tool("cuobjdump")
    text = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True,
                          check=True).stdout
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch, fn = "?", None
    for line in text.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            fn = m.group(1)
            out[(arch, fn)] = {k: 0 for k in SASS_OPS}
            continue
        if fn:
            for k, pat in SASS_OPS.items():
                if re.search(pat, line):
                    out[(arch, fn)][k] += 1
    return out


def collect(objects: dict[str, Path]) -> list[Kernel]:
    kernels = []
    for src, obj in sorted(objects.items()):
        kernels += resource_usage(obj, src)
    return kernels


def spills(kernels: list[Kernel]) -> list[Kernel]:
    """Main kernels with a stack frame (spilled registers or local arrays)."""
    return [k for k in kernels if k.main and (k.stack > 0 or k.local > 0)]


def render(kernels: list[Kernel], origin: str) -> str:
    lines = [
        "# Resource usage of the CUDA kernels",
        "",
        "Generated by `python scripts/cuda_resource_report.py` from " + origin + "; do not edit.",
        "REG: registers per thread; STACK: bytes of stack frame (spills); SHARED: static shared",
        "memory per CTA in bytes (sm_90 reserves 1 KiB per CTA; the large-tile conv kernels use",
        "dynamic shared memory, not shown); HMMA / LDG128 / LDGSTS128 / STG128 / HGMMA: count of",
        "tensor-core (mma.sync), 16-byte memory and warpgroup-MMA (wgmma, sm_90a) instructions in",
        "the kernel's SASS. Main kernels (marked *) must not spill.",
        "",
        "| file | arch | kernel | REG | STACK | SHARED | HMMA | LDG128 | LDGSTS128 | STG128 | HGMMA |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(kernels, key=lambda k: (k.source, k.arch, k.name)):
        s = k.sass
        lines.append(
            f"| {k.source} | {k.arch} | {'*' if k.main else ''}`{k.name}` | {k.regs} | {k.stack} | "
            f"{k.shared} | {s.get('HMMA', 0)} | {s.get('LDG128', 0)} | {s.get('LDGSTS128', 0)} | "
            f"{s.get('STG128', 0)} | {s.get('HGMMA', 0)} |")
    bad = spills(kernels)
    lines += ["", f"{len(kernels)} kernels; main kernels with a stack frame: {len(bad)}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="sm_90",
                    help="sm_80, sm_90, sm_90a, or a comma-separated list (default sm_90)")
    ap.add_argument("--objects", type=Path, help="directory with <name>.o or <name>.cuda.o objects")
    ap.add_argument("--compile", action="store_true", help="compile even if a build exists")
    ap.add_argument("--out", type=Path, default=REPORT)
    ap.add_argument("--check", action="store_true", help="exit 1 if a main kernel spills")
    args = ap.parse_args(argv)

    arches = [a.strip() for a in args.arch.split(",") if a.strip()]
    if args.objects:
        objects = {p.name.split(".")[0] + ".cu": p for p in sorted(args.objects.glob("*.o"))}
        origin = f"the objects in {args.objects}"
        kernels = collect(objects)
    else:
        objects = {} if args.compile else built_objects()
        origin = "the extension build's objects"
        kernels = [k for k in collect(objects) if k.arch in arches] if objects else []
        if {k.arch for k in kernels} != set(arches):
            tmp = Path(tempfile.mkdtemp(prefix="fastconv-cuobj-"))
            kernels = []
            for arch in arches:
                kernels += collect(compile_objects(tmp / arch, arch))
            origin = f"`nvcc -c` for {', '.join(arches)}"
    kernels = [k for k in kernels if k.arch in arches] or kernels
    args.out.write_text(render(kernels, origin))
    print(f"wrote {args.out} ({len(kernels)} kernels)")
    bad = spills(kernels)
    for k in bad:
        print(f"SPILL: {k.source} {k.arch} {k.name}: stack {k.stack} B", file=sys.stderr)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
