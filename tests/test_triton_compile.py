"""Compile-only check of the fused-conv Triton kernels for sm_80 and sm_90, on a machine without a GPU.

Every autotune config that the kernels' pruning keeps, for representative shapes (CIFAR-sized layers and
ResNet-50-sized ones at the largest rank each dtype allows) and for float16, bfloat16 and float32, is
compiled to a cubin with triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32)), with the
argument specialisation a launch would get (16-byte alignment, divisibility by 16, ints equal to 1).
A config fails on a compile error, on register spills (a stack frame in `cuobjdump --dump-resource-usage`
of the cubin: these kernels have no local arrays) and on shared memory above the target's per-block
opt-in limit. The compilation runs in subprocesses without TRITON_INTERPRET (tests/conftest.py sets it
on machines without a GPU), split over two workers.

`python tests/test_triton_compile.py --all` compiles every config, pruned or not, and prints the table
from which the register budgets (trp_kernels/triton/_common.py: REGS_PER_THREAD) were chosen."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = (80, 90)
# opt-in shared memory per block: sm_80 (A100) 163 KB, sm_90 (H100) 227 KB
SHARED_LIMIT = {80: 166912, 90: 232448}
DTYPES = ("float16", "bfloat16", "float32")
WORKERS = 2


def _shapes(kind, dtype):
    """(name, N, C, H, W, rank, n_out, k, stride, padding): a CIFAR ResNet layer, and ResNet-50-sized
    layers at the largest rank the kernel accepts for the dtype (the highest register pressure). For the
    decoupled kernel the rank is the number of paths per filter: at most kh*kw = 9 (larger kernels run as two
    convolutions)."""
    import torch
    if kind == "depthwise_decoupled":  # r paths per input channel, up to kh*kw; a 7 x 7 kernel unrolls 49 taps
        return [("cifar", 128, 32, 16, 16, 4, 32, 3, 1, 1),
                ("r50-28x28-full-rank", 32, 128, 28, 28, 9, 128, 3, 1, 1),
                ("r50-56x56-s2-full-rank", 32, 64, 56, 56, 9, 64, 3, 2, 1),
                ("r50-14x14-c256-full-rank", 32, 256, 14, 14, 9, 256, 3, 1, 1),
                ("7x7-kernel", 32, 64, 28, 28, 8, 64, 7, 1, 3)]
    if kind == "decoupled":
        return [("cifar", 128, 32, 16, 16, 4, 32, 3, 1, 1),
                ("r50-28x28-full-rank", 32, 128, 28, 28, 9, 128, 3, 1, 1),
                ("r50-56x56-s2-full-rank", 32, 64, 56, 56, 9, 64, 3, 2, 1),
                ("r50-14x14-c256-full-rank", 32, 256, 14, 14, 9, 256, 3, 1, 1)]
    from trp_kernels.triton._common import MAX_RANK_PAD
    r_max = MAX_RANK_PAD[(kind, dtype == torch.float32)]
    return [("cifar", 128, 32, 16, 16, 16, 32, 3, 1, 1),
            ("r50-28x28-half-max-rank", 32, 128, 28, 28, r_max // 2, 128, 3, 1, 1),
            ("r50-14x14-max-rank", 32, 256, 14, 14, r_max, 256, 3, 1, 1),
            ("r50-56x56-s2-max-rank", 32, 64, 56, 56, r_max, 64, 3, 2, 1)]


def _specialise(arg):
    """(type, attribute) of one launch argument, as the Triton launcher computes it."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend
    return native_specialize_impl(CUDABackend, arg, False, True, True)


def _cases(all_configs=False):
    """Every (kind, dtype, shape, arch, config) to compile, in a fixed order."""
    import torch
    import triton

    from trp_kernels import geometry
    from trp_kernels.triton import channel, decoupled, depthwise_decoupled, spatial
    cases = []
    for kind, mod in (("channel", channel), ("spatial", spatial), ("decoupled", decoupled),
                      ("depthwise_decoupled", depthwise_decoupled)):
        kernel = getattr(mod, f"_{kind}_kernel")
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            for name, nb, c, h, w, r, n, k, s, p in _shapes(kind, dtype):
                meta = dict(device="meta", dtype=dtype)
                x = torch.empty(nb, c, h, w, **meta)
                if kind == "channel":
                    w1, w2 = torch.empty(r, c, k, k, **meta), torch.empty(n, r, 1, 1, **meta)
                elif kind == "spatial":
                    w1, w2 = torch.empty(r, c, k, 1, **meta), torch.empty(n, r, 1, k, **meta)
                elif kind == "depthwise_decoupled":  # depthwise [c*r, 1, k, k], pointwise [n, c*r, 1, 1]
                    w1, w2 = torch.empty(c * r, 1, k, k, **meta), torch.empty(n, c * r, 1, 1, **meta)
                else:  # pointwise [n*r, c, 1, 1], depthwise [n, r, k, k]
                    w1, w2 = torch.empty(n * r, c, 1, 1, **meta), torch.empty(n, r, k, k, **meta)
                bias = torch.empty(n, **meta)
                conv = ([s, s], [p] * 4, [1, 1])
                y = geometry.empty_output(kind, x, w1, w2, *conv)
                _, args, consts = mod.launch_args(x, w1, w2, bias, *conv, y)
                configs = mod.TUNING.configs("full")
                if not all_configs:
                    configs = mod.TUNING.prune(configs, dict(zip(kernel.arg_names, args)), **consts)
                for arch in ARCHS:
                    for cfg in configs:
                        cases.append(dict(kind=kind, dtype=dtype_name, shape=name, arch=arch, args=args,
                                          consts={**consts, **cfg.kwargs}, num_warps=cfg.num_warps,
                                          num_stages=cfg.num_stages, kernel=kernel, mod=mod, triton=triton))
    return cases


def _resource_usage(cubin, cuobjdump):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if m is None:
        raise RuntimeError(f"unexpected cuobjdump output: {out!r}")
    return dict(zip(("regs", "stack", "static_shared", "local"), map(int, m.groups())))


def _compile(case, cuobjdump):
    """Compiles one case; returns its resource usage or the compile error."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    triton, kernel = case["triton"], case["kernel"]
    signature, constexprs, attrs = {}, dict(case["consts"]), {}
    positional = dict(zip(kernel.arg_names, case["args"]))
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, attr = _specialise(positional[name])
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = attr
        elif attr == "D":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", case["arch"], 32),
                                  options={"num_warps": case["num_warps"], "num_stages": case["num_stages"]})
    except Exception as exc:  # reported per config by the test
        return {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    usage = _resource_usage(compiled.asm["cubin"], cuobjdump)
    usage["shared"] = compiled.metadata.shared + usage["static_shared"]
    return usage


def _label(case):
    keys = ("BLOCK_M", "M_TARGET", "BLOCK_Q", "BLOCK_C", "BLOCK_N", "BLOCK_K")
    tile = "/".join(f"{k}={case['consts'][k]}" for k in keys if k in case["consts"])
    r_pad = case["consts"].get("R_PAD", "-")
    return (f"{case['kind']} {case['dtype']} {case['shape']} sm_{case['arch']} R_PAD={r_pad} "
            f"{tile} warps={case['num_warps']} stages={case['num_stages']}")


def _words_per_thread(case):
    """The pruning's register estimate (channel and spatial kernels; the decoupled kernels prune by tile
    sizes alone, so they report 0 here)."""
    import torch
    k, dtype = case["consts"], getattr(torch, case["dtype"])
    if case["kind"] in ("decoupled", "depthwise_decoupled"):
        return 0.0
    if case["kind"] == "channel":
        words = case["mod"].live_words(k["R_PAD"], k["BLOCK_M"], k["BLOCK_C"], k["BLOCK_N"], case["num_stages"], dtype)
    else:
        words = case["mod"].live_words(k["R_PAD"], k["SPAN"], k["OUT_W"], k["M_TARGET"], k["BLOCK_C"], k["BLOCK_N"],
                                       case["num_stages"], dtype)
    return words / (case["num_warps"] * 32)


def worker(index, count, all_configs, cuobjdump):
    """Compiles every count-th case starting at index; one JSON line per case on stdout."""
    for case in _cases(all_configs)[index::count]:
        result = _compile(case, cuobjdump)
        result.update(label=_label(case), arch=case["arch"], words_per_thread=_words_per_thread(case))
        print(json.dumps(result), flush=True)


def nvidia_tool(name):
    """Path of an NVIDIA tool: Triton's bundled one, else the CUDA toolkit's; None if neither exists."""
    try:
        import triton
        path = getattr(triton.knobs.nvidia, name.replace("-", "_")).path
        if path and os.path.exists(path):
            return path
    except Exception:
        pass
    for d in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if d and os.path.exists(os.path.join(d, "bin", name)):
            return os.path.join(d, "bin", name)
    return shutil.which(name)


def run_all(all_configs=False, workers=WORKERS):
    """Runs the workers in subprocesses (never under the interpreter); returns one result per case."""
    cuobjdump = nvidia_tool("cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "python"), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(i), str(workers),
                               "1" if all_configs else "0", cuobjdump], env=env, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(workers)]
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"compile worker failed ({p.returncode}):\n{err[-4000:]}")
        results += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return results


def _summary(results):
    lines = []
    for arch in ARCHS:
        ok = [r for r in results if r["arch"] == arch and "error" not in r]
        if ok:
            lines.append(f"sm_{arch}: {len(ok)} configs, registers <= {max(r['regs'] for r in ok)}, "
                         f"stack <= {max(r['stack'] for r in ok)} B, "
                         f"shared <= {max(r['shared'] for r in ok)} B (limit {SHARED_LIMIT[arch]})")
    return "\n".join(lines)


def _meta_call(kind, x_format, w_format):
    """(module, named launch arguments, constexprs) of one call on meta tensors (no GPU, no interpreter)."""
    import torch

    from trp_kernels import geometry
    from trp_kernels.triton import channel, decoupled, depthwise_decoupled, spatial
    mod = {"channel": channel, "spatial": spatial, "decoupled": decoupled,
           "depthwise_decoupled": depthwise_decoupled}[kind]
    meta = dict(device="meta", dtype=torch.float16)
    x = torch.empty(4, 32, 14, 14, **meta).to(memory_format=x_format)
    shapes = {"channel": ((16, 32, 3, 3), (32, 16, 1, 1)), "spatial": ((16, 32, 3, 1), (32, 16, 1, 3)),
              "decoupled": ((32 * 4, 32, 1, 1), (32, 4, 3, 3)),
              "depthwise_decoupled": ((32 * 4, 1, 3, 3), (32, 32 * 4, 1, 1))}[kind]
    w1, w2 = (torch.empty(*shape, **meta).to(memory_format=w_format) for shape in shapes)
    conv = ([1, 1], [1] * 4, [1, 1])
    y = geometry.empty_output(kind, x, w1, w2, *conv)
    _, args, consts = mod.launch_args(x, w1, w2, None, *conv, y)
    return mod, dict(zip(getattr(mod, f"_{kind}_kernel").arg_names, args)), consts


@pytest.mark.parametrize("kind", ["channel", "spatial", "decoupled", "depthwise_decoupled"])
def test_the_autotune_key_tells_the_input_layouts_apart(kind):
    """NCHW and channels_last inputs of the same shapes want different tiles: the autotuner's key must differ,
    also when a channels_last weight makes both outputs channels_last (y's strides alone do not tell)."""
    import torch
    keys = []
    for x_format in (torch.contiguous_format, torch.channels_last):
        mod, named, consts = _meta_call(kind, x_format, torch.channels_last)
        keys.append([named.get(k, consts.get(k)) for k in mod.TUNING.key])
    assert keys[0] != keys[1], keys


def test_the_decoupled_kernel_refuses_more_filters_than_the_grid_axis_holds():
    """Its grid's second axis holds the filter blocks (one filter per program when BLOCK_Q = R_PAD), and CUDA allows
    65535 there: more filters run as two convolutions instead of failing to launch on the GPU."""
    import torch

    from trp_kernels.triton import _common, decoupled
    _, named, consts = _meta_call("decoupled", torch.contiguous_format, torch.contiguous_format)
    grid, _, _ = decoupled.launch_args(*(named[k] for k in ("X", "PW", "DW")), None, [1, 1], [1] * 4, [1, 1],
                                       named["Y"])
    assert grid({"BLOCK_M": 16, "BLOCK_Q": consts["R_PAD"]})[1] == named["NOUT"] == 32  # axis 1: one per filter
    assert not _common.grid_fits((1, 65536)) and _common.grid_fits((2 ** 31 - 1, 65535, 65535))
    if not (torch.cuda.is_available() or _common.interpreting()):
        pytest.skip("supported() answers for CUDA tensors, or CPU ones under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.empty(1, 4, 8, 8, device=device)
    for n, ok in ((65535, True), (65536, False)):
        pw, dw = torch.empty(n * 2, 4, 1, 1, device=device), torch.empty(n, 2, 3, 3, device=device)
        why = decoupled.supported(x, pw, dw, None, (8, 8))
        assert (why is None) == ok, why


@pytest.mark.slow
def test_triton_kernels_compile_for_sm80_sm90_without_spills():
    pytest.importorskip("triton")
    for tool in ("ptxas", "cuobjdump"):
        if nvidia_tool(tool) is None:
            pytest.skip(f"{tool} not found (neither bundled with Triton nor in a CUDA toolkit)")
    results = run_all()
    assert results, "no config was compiled"
    bad = []
    for r in results:
        if "error" in r:
            bad.append(f"{r['label']}: compile error: {r['error']}")
        elif r["stack"] or r["local"]:
            bad.append(f"{r['label']}: spills ({r['stack']} B stack frame, {r['regs']} registers, "
                       f"{r['words_per_thread']:.0f} estimated words per thread)")
        elif r["shared"] > SHARED_LIMIT[r["arch"]]:
            bad.append(f"{r['label']}: {r['shared']} B shared memory > {SHARED_LIMIT[r['arch']]}")
    print(_summary(results))
    assert not bad, f"{len(bad)} of {len(results)} configs fail:\n" + "\n".join(bad)


if __name__ == "__main__":
    sys.path[:0] = [ROOT, os.path.join(ROOT, "python")]
    if sys.argv[1:2] == ["--worker"]:
        worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5])
    else:  # the calibration table: every config, pruned or not
        rows = run_all(all_configs="--all" in sys.argv)
        for r in sorted(rows, key=lambda r: (r["label"].split(" R_PAD")[0], r["words_per_thread"])):
            status = r.get("error", "")[:80] or (f"regs={r['regs']:3d} stack={r['stack']:5d} "
                                                  f"shared={r['shared']:6d}")
            print(f"{r['words_per_thread']:6.1f}/thread  {status}  {r['label']}")
        print(_summary(rows))
