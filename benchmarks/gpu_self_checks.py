"""The custom kernels' first-use self-checks (trp_kernels/selfcheck.py) on this machine, at the signatures that
take every path: the projection's Jacobi kernel (n <= 64) and cuSOLVER (n > 64), its warm step with a narrow
(<= 64, the Jacobi kernel) and a wide Ritz basis, float32 / bfloat16 / float64, and each fused Triton convolution
in float16 and float32. Prints one line per verdict and, last, trp_kernels.backend_info() as JSON (the device
suite's record of what ran). Exits 1 when a kernel failed its check.

    python benchmarks/gpu_self_checks.py --device cuda     # the device suite's step
    python benchmarks/gpu_self_checks.py --device cpu      # its dry run: the C++ CPU kernels, checked too"""
import argparse
import json
import os
import sys

import torch  # noqa: E402

import harness  # noqa: F401  (first: puts the checkout on sys.path)
import trp_kernels  # noqa: E402
from trp_kernels import conv, probes, selfcheck  # noqa: E402

# (B, p, q, dtype, rank): the designed probes' spectra, so the warm step certifies
PROJECTIONS = [(4, 48, 80, torch.float32, 12), (3, 96, 150, torch.float32, 20), (2, 64, 576, torch.bfloat16, 10),
               (2, 40, 60, torch.float64, 8), (2, 200, 300, torch.float32, 90)]
CONVS = [("channel", torch.float16), ("channel", torch.float32), ("spatial", torch.float16),
         ("decoupled", torch.float16), ("depthwise_decoupled", torch.float16)]
OPS = {"decoupled": trp_kernels.decoupled_conv, "depthwise_decoupled": trp_kernels.depthwise_decoupled_conv}


def projections(device):
    for B, p, q, dtype, rank in PROJECTIONS:
        W, energy = probes.designed_batch(B, p, q, rank, dtype, device, seed=p)
        state = trp_kernels.WarmStart()
        W_low = trp_kernels.lowrank_project(W, energy, subgradient=True, warm=state)[0]  # full solve, checked
        trp_kernels.lowrank_project(W_low, energy, subgradient=True, warm=state)  # the warm step, checked
        print(f"projection {B} x {p} x {q} {dtype}: rank {rank}, warm {int(state.warm.sum())}/{B}", flush=True)


def convolutions(device):
    os.environ[conv.BACKEND_ENV] = "triton"
    os.environ["TRP_TRITON_AUTOTUNE"] = "off"  # one tile config per kernel: a compile each, within the step's limit
    gen = torch.Generator().manual_seed(0)
    for kind, dtype in CONVS:
        shapes = {"channel": ((16, 32, 3, 3), (64, 16, 1, 1)), "spatial": ((16, 32, 3, 1), (64, 16, 1, 3)),
                  "decoupled": ((64 * 4, 32, 1, 1), (64, 4, 3, 3)),
                  "depthwise_decoupled": ((32 * 4, 1, 3, 3), (64, 32 * 4, 1, 1))}[kind]
        x = torch.randn(8, 32, 16, 16, generator=gen).to(device, dtype)
        w1, w2 = (torch.randn(*s, generator=gen).to(device, dtype) for s in shapes)
        fn = OPS.get(kind) or getattr(trp_kernels, f"factorized_conv_{kind}")
        fn(x, w1, w2, None, padding=1)
        print(f"conv {kind} {dtype}: {conv.backend_info()['last'][kind]}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    if args.device == "cpu":
        os.environ[selfcheck.ENV] = "all"  # the C++ CPU kernels check themselves only on request
    failed = None
    try:
        projections(args.device)
        tri = conv._triton()
        if args.device == "cuda" or (tri is not None and tri.interpreting()):
            convolutions(args.device)
    except selfcheck.SelfCheckError as exc:  # TRP_KERNELS_SELF_CHECK_FAILURE=error (the device suite)
        failed = str(exc)
    info = trp_kernels.backend_info()
    for v in info["self_check"]["verdicts"]:
        print(f"{'ok  ' if v['ok'] else 'FAIL'} {v['kernel']} {v['device']} {' '.join(v['signature'])}: "
              f"{v['detail']} ({v['seconds']} s)", flush=True)
    print(json.dumps(info), flush=True)
    bad = failed or info["self_check"]["unusable"]
    if bad:
        print(f"self-checks FAILED: {bad}", flush=True)
    return 1 if bad or not info["self_check"]["verdicts"] else 0


if __name__ == "__main__":
    sys.exit(main())
