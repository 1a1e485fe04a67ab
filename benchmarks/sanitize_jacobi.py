"""A small, deterministic workload for compute-sanitizer: the Jacobi eigensolver kernel (jacobi_eigh) and the
whole projection on sizes around the kernel's limits (n = 7, 33, 54/55 around the 48 KB default shared
memory, 64 the largest), each checked against torch.linalg.eigvalsh / the float64 reference.

    compute-sanitizer --tool racecheck python benchmarks/sanitize_jacobi.py --device cuda
    python benchmarks/sanitize_jacobi.py --device cpu        # the same checks on the C++ CPU kernel

Exits 1 (and says which size) when a result is wrong; the sanitizer reports hazards itself."""
import argparse
import sys

import torch

import harness  # noqa: F401  (first: puts the checkout on sys.path)
import trp_kernels  # noqa: E402
from trp_kernels import _extension, reference  # noqa: E402

SIZES = (7, 33, 54, 55, 64)


def check(device):
    ok = True
    gen = torch.Generator().manual_seed(0)
    for n in SIZES:
        X = torch.randn(3, n, n, generator=gen, dtype=torch.float64)
        A = X + X.mT
        ev, V = torch.ops.trp_kernels_C.jacobi_eigh(A.to(device))
        ev, V = ev.cpu(), V.cpu()
        scale = float(A.abs().max()) * n
        ev_err = float((ev - torch.linalg.eigvalsh(A).flip(-1)).abs().max()) / scale
        vec_err = float((A @ V - V * ev.unsqueeze(1)).abs().max()) / scale
        W = torch.randn(4, n, n + 5, generator=gen)
        W_low, rank, _ = trp_kernels.lowrank_project(W.to(device), 0.9)
        ref_low, ref_rank, _ = reference.lowrank_project(W, 0.9)
        low_err = float((W_low.cpu() - ref_low).norm() / ref_low.norm())
        good = ev_err < 1e-12 and vec_err < 1e-12 and low_err < 1e-5 and bool((rank.cpu() == ref_rank).all())
        ok &= good
        print(f"n={n}: eigenvalues {ev_err:.1e}, eigenvectors {vec_err:.1e}, projection {low_err:.1e}, "
              f"ranks {rank.tolist()} -> {'ok' if good else 'WRONG'}", flush=True)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    args = ap.parse_args(argv)
    key = "CUDA" if args.device == "cuda" else "CPU"
    if not _extension.has_kernel("jacobi_eigh", key):
        print(f"trp_kernels._C has no {key} jacobi_eigh kernel: {trp_kernels.backend_info()}")
        return 2
    return 0 if check(args.device) else 1


if __name__ == "__main__":
    sys.exit(main())
