#!/usr/bin/env bash
# Why does an extension op that raises (TORCH_CHECK in csrc/) kill Python with SIGSEGV on the GPU
# machine? One run tells; < 60 s once the extension is built (`python3 -m fastconv build-ext`).
#
#   scripts/gpu_diag_errors.sh [OUTDIR] [--full]      (PYTHON=... picks the interpreter)
#
# Run it with the environment of the build (same TORCH_CUDA_ARCH_LIST, CC/CXX): the build's cache
# key depends on them, and a different key reads as "not built".
#
# Prints, in order:
#   1. the toolchain torch's cpp_extension uses (CC/CXX, version, configure line, linker, ABI),
#      torch's own build compiler and ABI;
#   2. the built library: ldd, program headers (PT_GNU_EH_FRAME), the .eh_frame_hdr encodings
#      (fde_count/table encoding 0xff = no binary-search table: libgcc then walks .eh_frame
#      linearly, the failure mode of pytorch#117645), unwinder/C++ runtime symbols linked in,
#      the newest GLIBCXX/CXXABI/GCC symbol versions it needs and what the runtime libstdc++ has;
#   3. which libstdc++/libgcc_s/libgomp the Python process actually maps;
#   4. cases, one process each (-X faulthandler): a torch-native error (control); the extension op
#      raising through its autograd kernel (the failing tests' path; a Python register_autograd
#      kernel when the crash was seen, C++ since session 2: csrc/autograd.cpp), directly below
#      autograd, through a backward op (C++ autograd kernel), on CPU and CUDA, and with
#      TORCH_SHOW_CPP_STACKTRACES=1 (torch's own unwinder instead of glibc backtrace());
#   5. cuda-gdb backtraces (host code) of the CPU and CUDA crash, if they crash;
#   6. a one-file mini extension (TORCH_CHECK, a plain std::runtime_error, and c10::str without a
#      throw) built in parallel with: the extension's exact flags; minimal flags; the exact flags
#      minus -march=native / -fopenmp / the CPU_CAPABILITY macros one at a time; and the system
#      g++ if CXX is another compiler. Which variants crash names the cause.
# --full also rebuilds the real extension's CPU half with FASTCONV_EXTENSION_FLAGS=minimal
# (~1 min more) and reruns the CPU case on it.
set -u
REPO=$(cd "$(dirname "$0")/.." && pwd)
OUT=
FULL=0
for a in "$@"; do
    case "$a" in
        --full) FULL=1 ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) OUT=$a ;;
    esac
done
OUT=${OUT:-/tmp/fastconv-diag-$$}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-$(command -v python3 || command -v python)}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export FASTCONV_NO_EXTENSION_BUILD=1   # never start the 80 s build from here
START=$(date +%s)
hr() { echo; echo "=== $* ($(( $(date +%s) - START ))s)"; }

# ------------------------------------------------------------------------------ helper code
cat > "$OUT/case.py" <<'EOF'
"""One diagnostic case: python case.py NAME. Prints OK/UNEXPECTED; a crash kills the process."""
import os, sys
import torch

name = sys.argv[1]


def ext():
    from fastconv.backends import extension as e
    reason = e.ExtensionBackend().unavailable_reason()
    if reason:
        print("SKIP: extension not loaded:", reason.splitlines()[0])
        sys.exit(3)
    return torch.ops.fastconv


def run(fn):
    try:
        fn()
    except RuntimeError as exc:
        print("OK: RuntimeError:", str(exc).splitlines()[0][:160])
        return
    print("UNEXPECTED: no error raised")
    sys.exit(4)


x3 = torch.randn(2, 4, 4)
if name == "torch_error":
    run(lambda: torch.empty(2).view(3))
elif name == "ext_cpu_autograd":     # test_direct_op_errors_name_arguments: the op's autograd kernel (C++ since session 2)
    ops = ext()
    run(lambda: ops.max_pool2d(x3, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False))
elif name == "ext_cpu_direct":       # straight to the CPU kernel
    ops = ext()
    with torch._C._AutoDispatchBelowAutograd():
        run(lambda: ops.max_pool2d(x3, [2, 2], [2, 2], [0, 0], [1, 1], False, False, False))
elif name == "ext_cpu_backward_op":  # C++ autograd kernel (autogradNotImplementedFallback)
    ops = ext()
    run(lambda: ops.avg_pool2d_backward(x3, [2, 4, 4], [2, 2], [2, 2], [0, 0], False, True, None))
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
            run(call)
    else:
        run(call)
elif name == "maps":
    ext()
    seen = []
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if any(k in path for k in ("libstdc++", "libgcc_s", "libgomp", "fastconv_ext", "libc10.so",
                                   "libtorch_cpu", "libpython", "libc.so", "ld-linux")):
            if path not in seen:
                seen.append(path)
    print("\n".join(seen))
else:
    sys.exit(f"unknown case {name}")
EOF

cat > "$OUT/mini.cpp" <<'EOF'
// One op per way of raising, to find which one kills the process (scripts/gpu_diag_errors.sh).
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
static at::Tensor message(const at::Tensor& x) {  // c10::str / ostringstream, no throw
  const std::string s = c10::str("fcdiag: ", x.sizes(), " ", x.scalar_type(), " ", x.device());
  return x.new_full({1}, double(s.size()));
}
TORCH_LIBRARY(FCDIAG_NS, m) {
  m.def("check4d(Tensor x) -> Tensor");
  m.def("plain(Tensor x) -> Tensor");
  m.def("message(Tensor x) -> Tensor");
}
TORCH_LIBRARY_IMPL(FCDIAG_NS, CPU, m) {
  m.impl("check4d", &check4d);
  m.impl("plain", &plain);
  m.impl("message", &message);
}
EOF

cat > "$OUT/mini.py" <<'EOF'
"""python mini.py build VARIANT | python mini.py run VARIANT CASE"""
import json, os, sys, time
import torch
from torch.utils import cpp_extension

out = os.path.dirname(os.path.abspath(__file__))
mode, variant = sys.argv[1], sys.argv[2]
spec = json.load(open(os.path.join(out, "variants.json")))[variant]
ns = f"fcdiag_{variant.replace('-', '_')}"
bdir = os.path.join(out, f"build-{variant}")
os.makedirs(bdir, exist_ok=True)
if spec.get("cxx"):
    os.environ["CXX"] = spec["cxx"]


def load():
    return cpp_extension.load(
        name=ns, sources=[os.path.join(out, "mini.cpp")],
        extra_cflags=spec["cflags"] + [f"-DFCDIAG_NS={ns}"], extra_ldflags=spec["ldflags"],
        extra_include_paths=spec.get("include", []), build_directory=bdir,
        is_python_module=False, verbose=False, with_cuda=False)


if mode == "build":
    t = time.time()
    try:
        load()
    except Exception as exc:
        print(f"BUILD FAILED {variant}: {str(exc)[-800:]}")
        sys.exit(2)
    print(f"built {variant} in {time.time() - t:.0f}s")
    sys.exit(0)

case = sys.argv[3]
load()  # already built: just loads
op = getattr(torch.ops, ns)
x3 = torch.randn(2, 3, 4)
if case == "check4d_autograd":
    torch.library.register_autograd(f"{ns}::check4d", lambda ctx, g: g)
    fn = lambda: op.check4d(x3)  # noqa: E731
elif case == "check4d_direct":
    fn = lambda: op.check4d(x3)  # noqa: E731
elif case == "plain_direct":
    fn = lambda: op.plain(x3)  # noqa: E731
elif case == "message":
    print("OK: message length", float(op.message(x3)))
    sys.exit(0)
try:
    fn()
    print("UNEXPECTED: no error raised")
    sys.exit(4)
except RuntimeError as exc:
    print("OK: RuntimeError:", str(exc).splitlines()[0][:120])
EOF

# ------------------------------------------------------------------------------ background jobs
# started first (the mini builds are the slowest part); sections 1-3 print meanwhile
CASES="torch_error ext_cpu_autograd ext_cpu_direct ext_cpu_backward_op ext_cuda_autograd ext_cuda_direct"
for c in $CASES; do
    ( timeout 40 "$PY" -X faulthandler "$OUT/case.py" "$c" > "$OUT/case-$c.log" 2>&1; echo $? > "$OUT/case-$c.rc" ) &
done
( TORCH_SHOW_CPP_STACKTRACES=1 timeout 40 "$PY" -X faulthandler "$OUT/case.py" ext_cpu_autograd \
      > "$OUT/case-ext_cpu_autograd_cppstack.log" 2>&1; echo $? > "$OUT/case-ext_cpu_autograd_cppstack.rc" ) &

GDB=$(command -v cuda-gdb || command -v gdb || true)
if [ -n "$GDB" ]; then
    for c in ext_cpu_autograd ext_cuda_autograd; do
        # symbols of the few libraries that matter only (all of libtorch takes minutes to read)
        ( timeout 50 "$GDB" -q -batch -nx -iex "set auto-solib-add off" \
              -iex "set debuginfod enabled off" -ex "set pagination off" -ex "set confirm off" \
              -ex "set print thread-events off" -ex "handle SIGPIPE nostop noprint" -ex run \
              -ex "sharedlibrary libgcc_s" -ex "sharedlibrary libstdc" -ex "sharedlibrary libc.so" \
              -ex "sharedlibrary fastconv_ext" -ex "sharedlibrary libc10.so" \
              -ex "bt 40" -ex "x/3i \$pc" -ex "info sharedlibrary" \
              --args "$PY" "$OUT/case.py" "$c" > "$OUT/gdb-$c.log" 2>&1 ) &
    done
fi

# mini-extension variants: the exact flags of the real build, then with one flag group removed
"$PY" - "$OUT" <<'EOF'
import json, os, shutil, sys
from fastconv.backends import extension as e
out = sys.argv[1]
p = e._Plan()
inc = [str(p.shared / "cuda-extra-include")] if (p.shared / "cuda-extra-include").is_dir() else []
base = {"cflags": p.cflags, "ldflags": p.ldflags, "include": inc}
drop = lambda pred: [f for f in p.cflags if not pred(f)]  # noqa: E731
v = {
    "same": base,
    "minimal": {"cflags": ["-O2"], "ldflags": []},
    "no-march": dict(base, cflags=drop(lambda f: f.startswith("-march"))),
    "no-openmp": dict(base, cflags=drop(lambda f: f == "-fopenmp"), ldflags=[]),
    "no-cpucap": dict(base, cflags=drop(lambda f: "CPU_CAPABILITY" in f)),
    "no-fillin": dict(base, include=[]),
}
cxx = shutil.which(os.environ.get("CXX", "c++"))
if os.path.exists("/usr/bin/g++") and cxx and os.path.realpath(cxx) != os.path.realpath("/usr/bin/g++"):
    v["system-gxx"] = {"cflags": ["-O2"], "ldflags": [], "cxx": "/usr/bin/g++"}
    v["system-gxx-same"] = dict(base, cxx="/usr/bin/g++")
json.dump(v, open(os.path.join(out, "variants.json"), "w"), indent=1)
print("variants:", " ".join(v))
for k, s in v.items():
    print(f"  {k}: cflags {' '.join(s['cflags'])} | ldflags {' '.join(s['ldflags'])}"
          f"{' | cxx ' + s['cxx'] if s.get('cxx') else ''}")
EOF
VARIANTS=$("$PY" -c "import json; print(' '.join(json.load(open('$OUT/variants.json'))))")
MINI_CASES="check4d_autograd check4d_direct plain_direct message"
for v in $VARIANTS; do
    (
        timeout 40 "$PY" "$OUT/mini.py" build "$v" > "$OUT/mini-build-$v.log" 2>&1
        rc=$?
        echo $rc > "$OUT/mini-build-$v.rc"
        if [ $rc -eq 0 ]; then
            for c in $MINI_CASES; do
                ( timeout 15 "$PY" -X faulthandler "$OUT/mini.py" run "$v" "$c" \
                      > "$OUT/mini-$v-$c.log" 2>&1; echo $? > "$OUT/mini-$v-$c.rc" ) &
            done
            wait
        fi
    ) &
done

# ------------------------------------------------------------------------------ 1. toolchain
hr "1. toolchain"
echo "python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
for v in CC CXX CUDA_HOME LD_LIBRARY_PATH LD_PRELOAD TORCH_SHOW_CPP_STACKTRACES; do
    echo "$v=${!v-<unset>}"
done
CXXBIN=${CXX:-c++}
echo "--- $CXXBIN (what torch.utils.cpp_extension compiles and links with)"
command -v "$CXXBIN" && readlink -f "$(command -v "$CXXBIN")"
"$CXXBIN" --version 2>&1 | head -1
"$CXXBIN" -v 2>&1 | grep -E "^(Configured with|Thread model)" | cut -c1-600
echo "linker: $("$CXXBIN" -print-prog-name=ld) -> $("$("$CXXBIN" -print-prog-name=ld)" --version 2>&1 | head -1)"
echo "driver passes --eh-frame-hdr: $("$CXXBIN" -dumpspecs 2>/dev/null | grep -c -- '--eh-frame-hdr')"
echo "its libstdc++: $("$CXXBIN" -print-file-name=libstdc++.so)  libgcc_s: $("$CXXBIN" -print-file-name=libgcc_s.so.1)"
echo "its default _GLIBCXX_USE_CXX11_ABI: $(echo '#include <string>' | "$CXXBIN" -x c++ -E -dM - 2>/dev/null | grep -E 'define _GLIBCXX_USE_CXX11_ABI' | awk '{print $3}')"
[ -x /usr/bin/g++ ] && echo "system /usr/bin/g++: $(/usr/bin/g++ --version | head -1)"
command -v nvcc >/dev/null && nvcc --version | tail -2
"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "cxx11abi", torch._C._GLIBCXX_USE_CXX11_ABI)
cfg = torch.__config__.show().splitlines()
print("\n".join(l for l in cfg if "GCC" in l or "C++ Version" in l or "CXX_COMPILER" in l)[:800])
EOF

# ------------------------------------------------------------------------------ 2. the library
hr "2. the built library"
SO=$("$PY" -c "from fastconv.backends import extension as e; print(e.build_directory() / 'fastconv_ext.so')" 2>&1 | tail -1)
echo "library: $SO"
if [ -f "$SO" ]; then
    ldd "$SO" | grep -vE "libtorch|libc10|libcudart|linux-vdso"
    echo "--- program headers"
    readelf -lW "$SO" | grep -E "GNU_EH_FRAME|GNU_STACK|GNU_PROPERTY" || echo "NO PT_GNU_EH_FRAME"
    echo "--- sections"
    readelf -SW "$SO" | grep -E "eh_frame|gcc_except|sframe" | awk '{$1=""; print}'
    readelf -dW "$SO" | grep -E "NEEDED|RPATH|RUNPATH|FLAGS" | grep -vE "libtorch|libc10"
    "$PY" - "$SO" <<'EOF'
import struct, subprocess, sys
so = sys.argv[1]
# .eh_frame_hdr: version, eh_frame_ptr_enc, fde_count_enc, table_enc (0xff = omitted)
out = subprocess.run(["readelf", "-x", ".eh_frame_hdr", so], capture_output=True, text=True).stdout
hexes = "".join(l.split()[1] for l in out.splitlines() if l.strip().startswith("0x"))[:8]
print(".eh_frame_hdr header bytes:", hexes or "(missing)",
      "-> NO BINARY SEARCH TABLE" if hexes[4:6] == "ff" or hexes[6:8] == "ff" else "")
EOF
    echo "--- unwinder / C++ runtime code linked into the library (should be none)"
    nm -D --defined-only "$SO" 2>/dev/null | grep -E " (_Unwind_[A-Za-z]+|__register_frame\w*|__cxa_throw|__gxx_personality_v0|__cxa_begin_catch)$" || echo "none"
    echo "--- newest symbol versions it needs"
    objdump -T "$SO" | grep -oE "(GLIBCXX|CXXABI|GCC|GOMP|OMP|GLIBC)_[0-9.]+" | sort -uV | awk -F_ '{v[$1]=$0} END {for (k in v) print v[k]}'
else
    echo "NOT BUILT: run $PY -m fastconv build-ext first"
fi

# ------------------------------------------------------------------------------ 3. the process
hr "3. libraries the Python process maps"
timeout 30 "$PY" "$OUT/case.py" maps 2>&1 | tail -15
RT=$(timeout 30 "$PY" "$OUT/case.py" maps 2>/dev/null | grep libstdc++ | head -1)
[ -n "$RT" ] && echo "runtime libstdc++ provides up to: $(strings "$RT" | grep -E '^GLIBCXX_3\.4\.[0-9]+$' | sort -V | tail -1)"

# ------------------------------------------------------------------------------ results
hr "waiting for the cases, debugger runs and mini builds"
wait

verdict() {  # verdict RCFILE LOGFILE
    local rc; rc=$(cat "$1" 2>/dev/null || echo "?")
    case "$rc" in
        0) echo "ok      $(grep -m1 '^OK' "$2" | cut -c1-110)" ;;
        3) echo "skip    $(grep -m1 '^SKIP' "$2" | cut -c1-110)" ;;
        124|137) echo "TIMEOUT" ;;
        139) echo "CRASH   SIGSEGV" ;;
        134) echo "CRASH   SIGABRT $(grep -m1 -E 'terminate|what\(\)' "$2" | cut -c1-90)" ;;
        *) if grep -q "Fatal Python error" "$2" 2>/dev/null; then
               echo "CRASH   $(grep -m1 'Fatal Python error' "$2" | cut -c1-90) (rc $rc)"
           else echo "rc=$rc  $(tail -1 "$2" 2>/dev/null | cut -c1-100)"; fi ;;
    esac
}
hr "4. cases (real extension)"
for c in $CASES ext_cpu_autograd_cppstack; do
    printf '%-28s %s\n' "$c" "$(verdict "$OUT/case-$c.rc" "$OUT/case-$c.log")"
done
for c in $CASES ext_cpu_autograd_cppstack; do
    if grep -q "Fatal Python error" "$OUT/case-$c.log" 2>/dev/null; then
        echo "--- $c faulthandler:"; grep -v "^  File" "$OUT/case-$c.log" | head -5
        grep "^  File" "$OUT/case-$c.log" | head -4
    fi
done

hr "5. native backtraces ($GDB)"
for c in ext_cpu_autograd ext_cuda_autograd; do
    f="$OUT/gdb-$c.log"
    [ -f "$f" ] || continue
    echo "--- $c"
    if grep -q "received signal" "$f"; then
        grep -m1 "received signal" "$f"
        grep -E "^#[0-9]+ " "$f" | head -28 | cut -c1-200
        grep -A3 "^=> " "$f" | head -3
        echo "mapped runtime libraries:"; grep -E "libstdc\+\+|libgcc_s|libgomp|fastconv_ext" "$f" | awk '{print "   ", $NF}' | sort -u
    elif grep -q "exited normally\|exited with code" "$f"; then
        echo "no signal under the debugger: $(grep -m1 -E 'exited (normally|with code)' "$f")"
    else
        tail -5 "$f"
    fi
done
[ -z "$GDB" ] && echo "no cuda-gdb/gdb on PATH"

hr "6. mini extension: which build variant crashes"
printf '%-16s %-7s' variant build
for c in $MINI_CASES; do printf ' %-18s' "$c"; done; echo
for v in $VARIANTS; do
    brc=$(cat "$OUT/mini-build-$v.rc" 2>/dev/null || echo "?")
    printf '%-16s %-7s' "$v" "$([ "$brc" = 0 ] && echo ok || echo "FAIL$brc")"
    for c in $MINI_CASES; do
        printf ' %-18s' "$(verdict "$OUT/mini-$v-$c.rc" "$OUT/mini-$v-$c.log" | awk '{print $1, $2}' | cut -c1-18)"
    done
    echo
done
for v in $VARIANTS; do
    [ "$(cat "$OUT/mini-build-$v.rc" 2>/dev/null)" = 0 ] || { echo "--- build $v:"; tail -3 "$OUT/mini-build-$v.log"; }
done

if [ $FULL = 1 ]; then
    hr "7. (--full) the real extension's CPU half with FASTCONV_EXTENSION_FLAGS=minimal"
    FASTCONV_EXTENSION_FLAGS=minimal FASTCONV_BUILD_CUDA=0 FASTCONV_NO_EXTENSION_BUILD= \
        timeout 600 "$PY" -m fastconv build-ext 2>&1 | tail -2
    for c in ext_cpu_autograd ext_cpu_direct; do
        FASTCONV_EXTENSION_FLAGS=minimal FASTCONV_BUILD_CUDA=0 timeout 40 "$PY" -X faulthandler \
            "$OUT/case.py" "$c" > "$OUT/full-$c.log" 2>&1; echo $? > "$OUT/full-$c.rc"
        printf '%-28s %s\n' "minimal: $c" "$(verdict "$OUT/full-$c.rc" "$OUT/full-$c.log")"
    done
fi

hr "how to read this"
cat <<'EOF'
- torch_error crashes too: the process/runtime is broken for every C++ exception (libgcc_s /
  libstdc++ mix: see 3 and the gdb frames), not fastconv.
- gdb frames in libgcc_s (_Unwind_Find_FDE, linear_search_fdes, uw_frame_state_for) under
  backtrace()/c10::get_lazy_backtrace or _Unwind_RaiseException: unwind tables; compare the
  .eh_frame_hdr line in 2 and the mini variants (system-gxx fine but same crashes: the /opt/gcc
  toolchain's link; then link with the system compiler or add -static-libgcc / -Wl,--eh-frame-hdr).
- only ext_cpu_autograd_cppstack differs: torch's own unwinder (TORCH_SHOW_CPP_STACKTRACES) trips.
- a mini variant that stops crashing when one flag group is dropped names that flag group;
  minimal fine but every single-drop variant crashing: two groups together.
- mini fine everywhere but the real extension crashes: something in csrc/ (the gdb frames name it).
EOF
echo "(logs in $OUT; $(( $(date +%s) - START ))s)"
