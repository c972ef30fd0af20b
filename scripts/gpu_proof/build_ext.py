"""Extension stage: load the prebuilt library when ``$FASTCONV_EXTENSION_LIB``'s manifest
matches this torch and these sources, else build (the orchestrator runs this in the background,
overlapping the Triton tests). Says which happened and how long it took.

With ``--cpu-smoke`` nothing is built: a cached build is loaded if there is one.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from common import Results, parse_args


def main() -> None:
    args = parse_args(__doc__)
    res = Results(args.work, "extension", args.deadline)

    def load():
        from fastconv.backends import extension as ext

        t0 = time.perf_counter()
        if args.cpu_smoke:
            ok, text = ext.status(build=False)
            return {"status": "passed" if ok else "skipped", "path": "cached" if ok else "none",
                    "detail": text.splitlines()[0][:300],
                    "load_s": round(time.perf_counter() - t0, 1)}
        built_in = ext.build()  # loads the prebuilt library or builds; raises with the reason
        lib = os.environ.get("FASTCONV_EXTENSION_LIB")
        where = built_in.resolve()
        prebuilt = bool(lib) and Path(lib).resolve() in (where, *where.parents)
        ok, text = ext.status()
        return {"path": "prebuilt" if prebuilt else "built", "library_dir": str(built_in),
                "cuda_kernels": ext.has_cuda_kernels(), "detail": text[:300],
                "load_s": round(time.perf_counter() - t0, 1)}

    res.case("load-or-build", load)
    res.finish()


if __name__ == "__main__":
    main()
