"""What scripts/aot/compile.py compiles: every configuration the Triton launchers or the
autotuner can pick, per op module, for sm_90.

Each ``<op>_specs()`` builds :class:`KernelSpec` objects with the launchers' own planning
functions (tiles, warps, reductions), so the specs follow the code. Mark the few
configurations that matter most with ``main=True``: tests/test_triton_aot.py compiles those,
scripts/aot_report.py compiles all of them into benchmarks/aot_sm90.md.
"""
import torch

from fastconv.backends.triton import avg_pool2d as ap
from fastconv.backends.triton import batch_norm as bn
from fastconv.backends.triton import conv2d_relu as conv
from fastconv.backends.triton import max_pool2d as mp
from fastconv.backends.triton.autotune import configs_path
from fastconv.backends.triton.utils import POOL_NUM_STAGES, pool_tile
from fastconv.shapes import memory_format, pool_output_size

from aot.compile import KernelSpec, int_signature, kernel_signature, runtime_args


# --------------------------------------------------------------------------- conv2d_relu
# integer arguments divisible by 16 in a channels_last problem whose channel counts are
# multiples of 16 (what Triton's JIT marks at launch)
_CONV_STRIDES16 = frozenset({"C", "K", "sxn", "sxh", "sxw", "swg", "swk", "swc", "swr", "sws",
                             "syn", "syh", "syw", "sgn", "sgp", "sgq", "sdn", "sdh", "sdw", "smn",
                             "smp", "smq"})


def _conv_shipped_specs(strides16) -> list:
    """One spec per configuration in conv2d_relu_configs.json (any device), compiled for the layer shape
    its key names, channels_last: what fastconv runs on a machine without its own tuning."""
    import json

    try:
        data = json.loads(configs_path("conv2d_relu").read_text())
    except (OSError, ValueError):
        return []
    specs = []
    for table in data.get("entries", {}).values():
        for key, entry in sorted(table.items()):
            parts = key.split("|")
            cfg = entry.get("config") if isinstance(entry, dict) else None
            if len(parts) != 12 or not isinstance(cfg, dict):
                continue
            kind, dt, _, chan, kout, rs, st, _, pad, _, _, dot = parts
            R, S = (int(v) for v in rs[1:].split("S"))
            C = int(chan[1:])
            dot = int(dot[3:])
            ptr = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "dx_ptr")}
            ptr["part_ptr"] = "*fp32"
            flat = cfg.get("flat", conv._use_flat(C, R, S))
            i16 = strides16 if C % 16 == 0 else strides16 - {"C"}
            tiles = dict(BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"])
            padded = pad == "pad1"
            if kind == "wgrad":
                name, kernel = "conv_wgrad", conv._conv_wgrad_kernel
                consts = dict(R=R, S=S, FLAT=flat, PADDED=padded, G_ROWS=True,
                              X_ROWS=not flat and st == "st1x1", DOT=dot, INDEX64=False, sgk=1,
                              sxc=1, **tiles)
                i16 = i16 | {"M_PER_SPLIT"}
            elif kind == "dgrad" and st != "st1x1":
                name, kernel = "conv_dgrad_strided", conv._conv_dgrad_kernel
                consts = dict(DOT=dot, INDEX64=False, sgk=1, swc=1, sdc=1, **tiles)
            else:
                name, kernel = ("conv_fwd", conv._conv_fwd_kernel) if kind == "fwd" else \
                    ("conv_dgrad", conv._conv_fwd_kernel)
                consts = dict(R=R, S=S, FLAT=flat, PADDED=padded, FLIP=kind == "dgrad",
                              HAS_BIAS=kind == "fwd", RELU=kind == "fwd", DOT=dot, INDEX64=False,
                              sxc=1, syc=1, **tiles)
                consts["swc" if kind == "fwd" else "swk"] = 1
            if C == 1:
                consts["C"] = 1  # the JIT specialises ints equal to 1
            label = f"{name} {dt} {R}x{S}{' C=1' if C == 1 else ''} (shipped)"
            specs.append(KernelSpec(
                name=label, kernel=kernel, signature=kernel_signature(kernel, consts, ptr, i16),
                constexprs=consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                expect_wgmma=True if dt in ("bf16", "fp16") else None))
    return _distinct(specs)


def _checked(specs: list) -> list:
    """``specs`` after checking each signature against its kernel's own arguments (every
    runtime argument typed once, nothing else)."""
    for s in specs:
        want = kernel_signature(s.kernel, s.constexprs, s.signature)
        if want != {k: v for k, v in s.signature.items() if k not in s.constexprs}:
            raise ValueError(f"{s.name}: signature {sorted(s.signature)} does not match the "
                             f"kernel's runtime arguments {sorted(want)}")
    return specs


def _distinct(specs: list) -> list:
    """One spec per distinct compile (KernelSpec.key), first wins."""
    out, seen = [], set()
    for s in specs:
        if s.key() not in seen:
            seen.add(s.key())
            out.append(s)
    return out


def conv2d_relu_specs() -> list[KernelSpec]:
    """Every configuration the heuristic or the autotuner can pick, for bf16/fp16/fp32-tf32.

    Specs assume a channels_last problem whose channel counts are multiples of 16 (strides
    divisible by 16, channel stride specialised to 1 as Triton's JIT does), the fast path.
    """
    specs = []
    dtypes = (("bf16", 16, 0), ("fp16", 16, 0), ("fp32", 32, 1))
    strides16 = _CONV_STRIDES16

    def gemm_cfgs(kind, pb):
        heur = conv._heuristic(kind, pb)
        return [heur] + [c for c in conv._candidates(kind, pb) if c != heur], heur

    for dt, bits, dot in dtypes:
        wgmma = True if bits == 16 else None
        main_dt = dt == "bf16"
        ptr = {n: f"*{dt}" for n in ("x_ptr", "w_ptr", "b_ptr", "y_ptr", "g_ptr", "dx_ptr")}
        # forward: a padded 3x3 layer (taps), a 1x1 layer (plain GEMM), an 11x11 C=1 layer (flat);
        # grad_input of stride-1 layers: the same kernel with mirrored taps and the weight read
        # along its output channels (swk=1 instead of swc=1)
        cases = [("conv_fwd", "3x3", 3, 3, False, True, 256, 256),
                 ("conv_fwd", "1x1", 1, 1, False, False, 192, 256),
                 ("conv_fwd", "11x11 C=1", 11, 11, True, False, 1, 96),
                 ("conv_dgrad", "3x3", 3, 3, False, True, 256, 256),
                 ("conv_dgrad", "1x1", 1, 1, False, False, 256, 192)]
        for kname, label, R, S, flat, padded, C, K in cases:
            kind = "fwd" if kname == "conv_fwd" else "dgrad"
            pb = dict(device="cuda", bits=bits, gemm_m=1 << 20, gemm_n=K, red=C * R * S, flat=flat,
                      chan=C, stride="1x1")
            cfgs, heur = gemm_cfgs(kind, pb)
            for cfg in cfgs:
                consts = dict(R=R, S=S, FLAT=flat, PADDED=padded, FLIP=kind == "dgrad",
                              HAS_BIAS=kind == "fwd", RELU=kind == "fwd", DOT=dot, INDEX64=False,
                              BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
                              sxc=1, syc=1)
                consts["swc" if kind == "fwd" else "swk"] = 1
                if C == 1:
                    consts["C"] = 1  # the JIT specialises ints equal to 1
                specs.append(KernelSpec(
                    name=f"{kname} {dt} {label}", kernel=conv._conv_fwd_kernel,
                    signature=kernel_signature(conv._conv_fwd_kernel, consts, ptr,
                                               strides16 if not flat else strides16 - {"C"}),
                    constexprs=consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    main=(cfg is heur and (main_dt or label == "3x3")), expect_wgmma=wgmma))
        # grad_input of strided convs: the phase kernel
        pb = dict(device="cuda", bits=bits, gemm_m=1 << 18, gemm_n=256, red=256 * 4, flat=False,
                  chan=256, stride="2x2")
        cfgs, heur = gemm_cfgs("dgrad", pb)
        for cfg in cfgs:
            consts = dict(DOT=dot, INDEX64=False, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_K=cfg["BLOCK_K"], sgk=1, swc=1, sdc=1)
            specs.append(KernelSpec(
                name=f"conv_dgrad_strided {dt} 3x3/2", kernel=conv._conv_dgrad_kernel,
                signature=kernel_signature(conv._conv_dgrad_kernel, consts, ptr, strides16),
                constexprs=consts,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                main=cfg is heur and main_dt, expect_wgmma=wgmma))
        ptr["part_ptr"] = "*fp32"
        for label, R, S, flat, padded, C, K in (("3x3", 3, 3, False, True, 256, 256),
                                                ("11x11 C=1", 11, 11, True, False, 1, 96)):
            pb = dict(device="cuda", bits=bits, gemm_m=1 << 20, gemm_n=K, red=1 << 20, flat=flat,
                      chan=C, cols=C * R * S if flat else C, stride="1x1")
            cfgs, heur = gemm_cfgs("wgrad", pb)
            for cfg in cfgs:
                consts = dict(R=R, S=S, FLAT=flat, PADDED=padded, G_ROWS=True, X_ROWS=not flat,
                              DOT=dot, INDEX64=False, BLOCK_M=cfg["BLOCK_M"],
                              BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], sgk=1, sxc=1)
                if C == 1:
                    consts["C"] = 1
                sig = kernel_signature(
                    conv._conv_wgrad_kernel, consts, ptr,
                    (strides16 if not flat else strides16 - {"C"}) | {"M_PER_SPLIT"})
                specs.append(KernelSpec(
                    name=f"conv_wgrad {dt} {label}", kernel=conv._conv_wgrad_kernel, signature=sig,
                    constexprs=consts, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    main=(cfg is heur and (main_dt or label == "3x3")), expect_wgmma=wgmma))
        # the ReLU-mask + grad_bias pass and the slice sum, as their launchers configure them
        consts = dict(RELU=True, WRITE=True, BIAS=True, INDEX64=False, BLOCK_R=64, BLOCK_C=128,
                      sgk=1, syk=1, smk=1)
        specs.append(KernelSpec(
            name=f"conv_relu_grad {dt}", kernel=conv._relu_grad_kernel,
            signature=kernel_signature(
                conv._relu_grad_kernel, consts,
                dict(ptr, y_ptr=f"*{dt}", gm_ptr=f"*{dt}", bpart_ptr="*fp32"),
                strides16 | {"K", "syn", "syp", "syq"}),
            constexprs=consts, num_warps=8, num_stages=3, main=main_dt))
        consts = dict(BLOCK_S=16, BLOCK=256)
        specs.append(KernelSpec(
            name=f"conv_sum_slices {dt}", kernel=conv._sum_slices_kernel,
            signature=kernel_signature(conv._sum_slices_kernel, consts,
                                       {"part_ptr": "*fp32", "out_ptr": f"*{dt}"}),
            constexprs=consts, num_warps=4, num_stages=3, main=main_dt))
    # the shipped table's configurations (tuned on an H100) with their layers' kernel shapes
    specs += _conv_shipped_specs(strides16)
    # tensors of 2**31 elements or more: 64-bit offsets (heuristic configs, bf16)
    big = []
    for s in specs:
        if (s.main and s.name.startswith(("conv_fwd", "conv_dgrad", "conv_wgrad"))
                and " bf16 " in s.name and not s.name.endswith(" 1x1")):
            big.append(KernelSpec(name=s.name + " index64", kernel=s.kernel, signature=s.signature,
                                  constexprs=dict(s.constexprs, INDEX64=True), num_warps=s.num_warps,
                                  num_stages=s.num_stages, main=False, expect_wgmma=s.expect_wgmma))
    return _checked(_distinct(specs + big))


# --------------------------------------------------------------------------- pools
def _ints(kernel, *values, floats=("momentum", "eps", "inv_count")) -> tuple[dict, dict]:
    """int_signature of ``kernel``'s integer arguments (its runtime arguments that are not
    pointers or floats, in its own order) for ``values`` in that order: the launcher's."""
    names = [a for a in runtime_args(kernel) if not a.endswith("_ptr") and a not in floats]
    return int_signature(names, values)


def _dense_strides(shape, channels_last: bool):
    return torch.empty(shape, device="meta", memory_format=memory_format(channels_last)).stride()


def pool_specs() -> list[KernelSpec]:
    """Configurations the H100 runs most: the AlexNet/VGG/ResNet pools in bf16 (and fp32),
    channels_last and NCHW, forward and backward, tiled and specialised (unit strides,
    divisibility) as the launchers and the JIT do for AlexNet's first pool (96 x 54 x 54,
    batch 128) and ResNet's stem pool (64 x 112 x 112)."""
    dev = torch.device("cuda")
    specs = []
    geoms = [("3/2", (3, 3), (2, 2), (0, 0), (96, 54)), ("2/2", (2, 2), (2, 2), (0, 0), (64, 32)),
             ("3/2/1", (3, 3), (2, 2), (1, 1), (64, 112)),
             ("3/1/1", (3, 3), (1, 1), (1, 1), (192, 28))]
    for ty, esize in (("bf16", 2), ("fp32", 4)):
        for cl in (True, False):
            layout = "NHWC" if cl else "NCHW"
            for name, k, s, p, (c, hw) in geoms:
                # main (compiled by tests/test_triton_aot.py): the bf16 fused-ReLU training
                # kernels of AlexNet's 3/2 pool and ResNet's 3/2/1 stem (both layouts) and
                # VGG's 2/2 (channels_last)
                main = ty == "bf16" and (name in ("3/2", "3/2/1") or (name == "2/2" and cl))
                n = 128
                oh = pool_output_size(hw, k[0], s[0], p[0], 1, False)
                noh, now = (k[0] - 1) // s[0] + 1, (k[1] - 1) // s[1] + 1
                _, br, bs, warps = pool_tile(mp.TUNING, n, c, oh, oh, cl, dev, taps=k[0] * k[1],
                                         element_size=esize)
                cells, (gh, gw), _, _ = mp._bwd_geometry((n, c, hw, hw), k, s, p, (1, 1))
                _, bbr, bbs, bwarps = pool_tile(mp.TUNING, n, c, gh, gw, cl, dev, backward=True,
                                            taps=noh * now, element_size=esize,
                                            cell=s[0] * s[1])
                xs = _dense_strides((n, c, hw, hw), cl)
                ys = _dense_strides((n, c, oh, oh), cl)
                dims = (n, c, hw, hw, oh, oh)
                geo = dict(SH=s[0], SW=s[1], PH=p[0], PW=p[1], KH=k[0], KW=k[1], DH=1, DW=1)
                fsig, fconst = _ints(mp._max_pool2d_fwd_kernel, *dims, *xs, *ys)
                for relu, flat in ((True, False), (False, True)):
                    idx_ty = "*i64" if flat else "*i8"
                    tag = f"{name} {ty} {layout} relu={relu} flat={flat}"
                    specs.append(KernelSpec(
                        name=f"max_pool2d_fwd {tag}", kernel=mp._max_pool2d_fwd_kernel,
                        signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "idx_ptr": idx_ty,
                                   **fsig},
                        constexprs=dict(fconst, **geo, RELU=relu, FLAT_INDICES=flat,
                                        CHECK_BOUNDS=mp._check_bounds(p, False),
                                        CHANNELS_LAST=cl, INDEX64=False, BLOCK_R=br,
                                        BLOCK_S=bs),
                        num_warps=warps, num_stages=POOL_NUM_STAGES, main=main and relu))
                    y_from = relu and flat
                    bsig, bconst = _ints(mp._max_pool2d_bwd_kernel, *dims, gh, gw, *ys, *ys,
                                         *(ys if y_from else (0, 0, 0, 0)), *xs)
                    if not y_from:
                        bconst["y_ptr"] = None
                    specs.append(KernelSpec(
                        name=f"max_pool2d_bwd {tag}", kernel=mp._max_pool2d_bwd_kernel,
                        signature={"g_ptr": f"*{ty}", "idx_ptr": idx_ty, "dx_ptr": f"*{ty}",
                                   **({"y_ptr": f"*{ty}"} if y_from else {}), **bsig},
                        constexprs=dict(bconst, **geo, NOH=noh, NOW=now,
                                        RELU_FROM_OUTPUT=y_from, FLAT_INDICES=flat,
                                        CHANNELS_LAST=cl, INDEX64=False, BLOCK_R=bbr,
                                        BLOCK_S=bbs),
                        num_warps=bwarps, num_stages=POOL_NUM_STAGES, main=main and relu))
            # LeNet's 2x2 average pool, and global average pooling 7x7 -> 1 (run-time loops)
            for name, geo, adaptive, size, out in (
                    ("avg_pool2d 2/2", dict(SH=2, SW=2, PH=0, PW=0, KH=2, KW=2), False, 28, 14),
                    ("adaptive_avg_pool2d 7x7->1", dict(SH=1, SW=1, PH=0, PW=0, KH=7, KW=7),
                     True, 7, 1)):
                n, c = 128, 512
                taps = 1 if adaptive else geo["KH"] * geo["KW"]
                _, br, bs, warps = pool_tile(ap.TUNING, n, c, out, out, cl, dev, taps=taps,
                                         element_size=esize)
                _, bbr, bbs, bwarps = pool_tile(ap.TUNING, n, c, size, size, cl, dev, backward=True,
                                            element_size=esize)
                xs = _dense_strides((n, c, size, size), cl)
                ys = _dense_strides((n, c, out, out), cl)
                dims = (n, c, size, size, out, out)
                fsig, fconst = _ints(ap._avg_pool2d_fwd_kernel, *dims, *xs, *ys)
                bsig, bconst = _ints(ap._avg_pool2d_bwd_kernel, *dims, *ys, *xs)
                consts = dict(geo, COUNT_PAD=True, DIVISOR=0, ADAPTIVE=adaptive,
                              CHANNELS_LAST=cl, INDEX64=False)
                specs.append(KernelSpec(
                    name=f"{name} fwd {ty} {layout}", kernel=ap._avg_pool2d_fwd_kernel,
                    signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", **fsig},
                    constexprs=dict(consts, **fconst, BLOCK_R=br, BLOCK_S=bs),
                    num_warps=warps, num_stages=POOL_NUM_STAGES, main=False))
                specs.append(KernelSpec(
                    name=f"{name} bwd {ty} {layout}", kernel=ap._avg_pool2d_bwd_kernel,
                    signature={"g_ptr": f"*{ty}", "dx_ptr": f"*{ty}", **bsig},
                    constexprs=dict(consts, **bconst, NOH=1, NOW=1, BLOCK_R=bbr, BLOCK_S=bbs),
                    num_warps=bwarps, num_stages=POOL_NUM_STAGES, main=False))
    return _checked(specs)


# --------------------------------------------------------------------------- batch_norm
def batch_norm_specs() -> list[KernelSpec]:
    """The kernels of a bf16 (and fp32) training step, channels_last and NCHW, configured as
    the launchers configure them for ResNet-18's first stage (128 x 64 x 56 x 56: chunked
    reductions with the ticketed merge, separate elementwise passes) and VGG-16-BN's
    512 x 4 x 4 layer (one program per channel block: single-launch forward and backward),
    plus the eval-mode kernels."""
    dev = torch.device("cuda")
    specs = []
    for ty, esize in (("bf16", 2), ("fp32", 4)):
        main_ty = ty == "bf16"
        for cl in (True, False):
            layout = "NHWC" if cl else "NCHW"
            for label, shape in (("64x56x56", (128, 64, 56, 56)), ("512x4x4", (128, 512, 4, 4))):
                n, c, h, w = shape
                red = bn._reduce_plan(shape, cl, dev, esize)
                single = red["single"]
                tag = f"{ty} {layout} {label}"
                # the statistics and backward reductions take the same integers
                ints, iconsts = _ints(bn._bn_stats_kernel, c, h * w, red["rows"],
                                      red["per_chunk"], red["chunks"])
                assert (ints, iconsts) == _ints(bn._bn_bwd_reduce_kernel, c, h * w, red["rows"],
                                                red["per_chunk"], red["chunks"])
                rconsts = dict(iconsts, CHANNELS_LAST=cl, INDEX64=False,
                               BLOCK_R=red["BLOCK_R"], BLOCK_C=red["BLOCK_C"],
                               BLOCK_S=red["BLOCK_S"], BLOCK_K=bn._FINALIZE_BLOCK_K)
                io = {"x_ptr": f"*{ty}", "w_ptr": "*fp32", "b_ptr": "*fp32", "rm_ptr": "*fp32",
                      "rv_ptr": "*fp32", "centre_ptr": "*fp32", "invstd_ptr": "*fp32"}
                chunked = {} if single else {"part_ptr": "*fp32", "ticket_ptr": "*i32"}
                nones = dict(mean_ptr=None, **({"part_ptr": None, "ticket_ptr": None}
                                               if single else {"y_ptr": None}))
                # a residual (relu(bn(x) + r)) is read only by the single-chunk fused apply
                for res in ((False, True) if single else (False,)):
                    specs.append(KernelSpec(
                        name=f"bn_stats{' residual' if res else ''} {tag}",
                        kernel=bn._bn_stats_kernel,
                        signature=dict(io, **chunked, **({"y_ptr": f"*{ty}"} if single else {}),
                                       **({"r_ptr": f"*{ty}"} if res else {}),
                                       **ints, momentum="fp32", eps="fp32"),
                        constexprs=dict(rconsts, **nones, **({} if res else {"r_ptr": None}),
                                        HAS_RUNNING=True, WRITE_MEAN=False, SINGLE=single,
                                        APPLY=single, HAS_W=True, HAS_B=True, RELU=True,
                                        HAS_RES=res),
                        num_warps=red["warps"], num_stages=bn.NUM_STAGES, main=main_ty))
                for relu, from_x, dres in ((True, False, False), (True, True, False),
                                           (False, False, False), (True, False, True)):
                    rtag = (f"relu={relu}{' mask-from-x' if from_x else ''}"
                            f"{' grad_residual' if dres else ''} {tag}")
                    main = main_ty and relu and not from_x
                    bsig = {"dy_ptr": f"*{ty}", "x_ptr": f"*{ty}", "centre_ptr": "*fp32",
                            "invstd_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32",
                            "dw_ptr": "*fp32", "db_ptr": "*fp32", **chunked, **ints,
                            "inv_count": "fp32"}
                    bnone = {} if single else {"dx_ptr": None}
                    if single:
                        bsig["dx_ptr"] = f"*{ty}"
                        bnone.update(coef_ptr=None, part_ptr=None, ticket_ptr=None)
                    else:
                        bsig["coef_ptr"] = "*fp32"
                    if relu and not from_x:
                        bsig["y_ptr"] = f"*{ty}"
                    else:
                        bnone["y_ptr"] = None
                    # grad_residual: in the fused dx loop (single), else in the dx pass; the
                    # reduction loop writes it only when grad_input is not wanted
                    dr_here = dres and single
                    if dr_here:
                        bsig["dr_ptr"] = f"*{ty}"
                    else:
                        bnone["dr_ptr"] = None
                    if dres and not single:
                        continue  # same compile as without (the dx kernel writes it)
                    specs.append(KernelSpec(
                        name=f"bn_bwd_reduce {rtag}", kernel=bn._bn_bwd_reduce_kernel,
                        signature=bsig,
                        constexprs=dict(rconsts, **bnone, TRAINING=True, RELU=relu,
                                        RELU_FROM_X=from_x, HAS_W=True, HAS_B=True,
                                        WRITE_DW=True, WRITE_DB=True, WRITE_COEF=not single,
                                        SINGLE=single, DX=single, WRITE_DR=dr_here),
                        num_warps=red["warps"], num_stages=bn.NUM_STAGES, main=main))
                if single:
                    continue
                # the separate elementwise passes of a chunked layer
                rows, cols = bn._matrix(shape, cl)
                _, br, bs, warps = bn._stream_tile(rows, cols, cl, dev, esize)
                sints, sconsts = _ints(bn._bn_apply_kernel, c, rows, cols)
                assert (sints, sconsts) == _ints(bn._bn_bwd_dx_kernel, c, rows, cols)
                sconsts = dict(sconsts, CHANNELS_LAST=cl, INDEX64=False, BLOCK_R=br,
                               BLOCK_S=bs)
                for relu, from_running, res in ((True, False, False), (True, True, False),
                                                (False, False, False), (False, True, False),
                                                (True, False, True), (True, True, True)):
                    specs.append(KernelSpec(
                        name=f"bn_apply relu={relu}{' eval' if from_running else ''}"
                             f"{' residual' if res else ''} {tag}",
                        kernel=bn._bn_apply_kernel,
                        signature={"x_ptr": f"*{ty}", "y_ptr": f"*{ty}", "w_ptr": "*fp32",
                                   "b_ptr": "*fp32", **sints, "eps": "fp32",
                                   **({"r_ptr": f"*{ty}"} if res else {}),
                                   **({"rm_ptr": "*fp32", "rv_ptr": "*fp32"}
                                      if from_running else
                                      {"centre_ptr": "*fp32", "invstd_ptr": "*fp32"})},
                        constexprs=dict(sconsts, FROM_RUNNING=from_running, HAS_W=True,
                                        HAS_B=True, RELU=relu, HAS_RES=res,
                                        **({} if res else {"r_ptr": None}),
                                        **({"centre_ptr": None, "invstd_ptr": None}
                                           if from_running else
                                           {"rm_ptr": None, "rv_ptr": None})),
                        num_warps=warps, num_stages=bn.NUM_STAGES,
                        main=main_ty and relu and not from_running))
                for relu, from_x, training, dres in (
                        (True, False, True, False), (True, True, True, False),
                        (False, False, True, False), (True, False, False, False),
                        (True, False, True, True)):
                    dsig = {"dy_ptr": f"*{ty}", "x_ptr": f"*{ty}", "centre_ptr": "*fp32",
                            "w_ptr": "*fp32", "b_ptr": "*fp32", "dx_ptr": f"*{ty}", **sints}
                    dnone = {}
                    if training:
                        dsig["coef_ptr"] = "*fp32"
                        dnone["invstd_ptr"] = None
                    else:
                        dsig["invstd_ptr"] = "*fp32"
                        dnone["coef_ptr"] = None
                    if relu and not from_x:
                        dsig["y_ptr"] = f"*{ty}"
                    else:
                        dnone["y_ptr"] = None
                    if dres:
                        dsig["dr_ptr"] = f"*{ty}"
                    else:
                        dnone["dr_ptr"] = None
                    specs.append(KernelSpec(
                        name=f"bn_bwd_dx relu={relu}{' mask-from-x' if from_x else ''}"
                             f"{'' if training else ' eval'}{' grad_residual' if dres else ''}"
                             f" {tag}",
                        kernel=bn._bn_bwd_dx_kernel, signature=dsig,
                        constexprs=dict(sconsts, **dnone, RELU=relu, RELU_FROM_X=from_x,
                                        HAS_W=True, HAS_B=True, TRAINING=training,
                                        FROM_STATS=not training, WRITE_DX=True,
                                        WRITE_DR=dres),
                        num_warps=warps, num_stages=bn.NUM_STAGES,
                        main=main_ty and relu and not from_x and training))
    return _checked(specs)


# op module -> its specs (the "module" column of the reports)
SPECS = {"conv2d_relu": conv2d_relu_specs, "pool": pool_specs, "batch_norm": batch_norm_specs}
