"""Decomposition and first projection of one large Linear (VGG-11's first classifier layer, 25088 -> 4096):
wall and CPU seconds, with TRP-like weights (rank 96 plus a small full-rank update) and random ones.

    python benchmarks/large_layer.py [--in-features 25088] [--out-features 4096]

docs/guides/large-layers.md explains the routes it times."""
import argparse
import os
import time

import torch
import torch.nn as nn

import trp


def timed(fn):
    """(result, wall seconds, CPU seconds of this process)."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def weights(kind, p, q, gen):
    if kind == "trp_like":
        return torch.randn(p, 96, generator=gen) @ torch.randn(96, q, generator=gen) / 96 ** 0.5 \
            + 1e-3 * torch.randn(p, q, generator=gen)
    return 0.01 * torch.randn(p, q, generator=gen)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--in-features", type=int, default=25088)
    parser.add_argument("--out-features", type=int, default=4096)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for kind, energy in (("trp_like", 0.9), ("random", 0.5)):
        linear = nn.Linear(args.in_features, args.out_features)
        with torch.no_grad():
            linear.weight.copy_(weights(kind, args.out_features, args.in_features, gen))
        load = os.getloadavg()[0]
        fact, wall, cpu = timed(lambda: trp.FactorizedLinear.from_linear(linear, energy=energy))
        print(f"{kind}: decomposition at energy {energy}: rank {fact.rank}, {wall:.1f} s wall, {cpu:.1f} s CPU "
              f"(load {load:.1f})", flush=True)
        pruner = trp.RankPruner(nn.Sequential(linear), "channel", energy=0.9, layers=[nn.Linear])
        load = os.getloadavg()[0]
        _, wall, cpu = timed(pruner.step)
        print(f"{kind}: first RankPruner step at energy 0.9: rank {pruner.ranks['0']}, {wall:.1f} s wall, "
              f"{cpu:.1f} s CPU (load {load:.1f})", flush=True)


if __name__ == "__main__":
    main()
