"""Fused factorized convolutions vs two cuDNN convolutions vs the dense conv, per layer and end to end.

    python benchmarks/conv_table.py                      # everything this machine can run
    python benchmarks/conv_table.py --part e2e --nets resnet20 resnet56 --batches 1 32   # CPU run
    python benchmarks/conv_table.py --out results --budget-s 150                          # GPU suite

Writes <out>/conv_layers_<device>.json and <out>/conv_e2e_<device>.json and prints markdown tables.

Ranks. The benchmark has no TRP-trained checkpoints, so each 3x3 layer gets the rank that gives it the
paper's network-level MAC speed-up (TRP+Nu, energy 0.9 / value cutoff): ResNet-20 channel 2.17x, spatial
2.84x; ResNet-56 channel 2.31x (spatial: the ResNet-20 figure, 2.84x, as the paper has none); ResNet-50
channel 1.80x. rank = round(dense MACs per output pixel / (speed-up * MACs per output pixel per unit of
rank)), at least 1 (see `layer_rank`). ResNet-50 spatial is left out: its ranks at 1.8x (about 0.8 c)
exceed what a fused kernel keeps on chip, and the paper reports channel only.

Timing: CUDA events around back-to-back calls, best of two rounds ("eager": includes each framework's
launch overhead, which dominates at batch 1), and the same calls replayed from one CUDA graph ("graph":
GPU time only). float32 runs with cuDNN TF32 off, so that every contender computes in IEEE fp32 like the
fused kernels do. On a CPU only the end-to-end part runs (two oneDNN convolutions vs dense)."""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import harness  # first: puts the checkout on sys.path
import trp_kernels  # noqa: E402
from trp._utils import timing  # noqa: E402
from trp_kernels import conv, reference  # noqa: E402

SPEEDUP = {("resnet20", "channel"): 2.17, ("resnet20", "spatial"): 2.84,
           ("resnet56", "channel"): 2.31, ("resnet56", "spatial"): 2.84,
           ("resnet50", "channel"): 1.80}

# distinct 3x3 layers: (name, in channels, out channels, input size, stride); padding 1
CIFAR_LAYERS = [("st1 16->16 @32", 16, 16, 32, 1), ("st2.0 16->32 @32 s2", 16, 32, 32, 2),
                ("st2 32->32 @16", 32, 32, 16, 1), ("st3.0 32->64 @16 s2", 32, 64, 16, 2),
                ("st3 64->64 @8", 64, 64, 8, 1)]
RESNET50_LAYERS = [("l1 64 @56", 64, 64, 56, 1), ("l2.0 128 @56 s2", 128, 128, 56, 2),
                   ("l2 128 @28", 128, 128, 28, 1), ("l3.0 256 @28 s2", 256, 256, 28, 2),
                   ("l3 256 @14", 256, 256, 14, 1), ("l4.0 512 @14 s2", 512, 512, 14, 2),
                   ("l4 512 @7", 512, 512, 7, 1)]
NET_LAYERS = {"resnet20": CIFAR_LAYERS, "resnet56": CIFAR_LAYERS, "resnet50": RESNET50_LAYERS}


def per_rank_macs(scheme, c, n, k, stride):
    """MACs per output pixel per unit of rank (as trp.flops counts them)."""
    return c * k * k + n if scheme == "channel" else c * k * stride + n * k


def layer_rank(scheme, c, n, k, stride, speedup):
    return max(1, round(n * c * k * k / (speedup * per_rank_macs(scheme, c, n, k, stride))))


# ------------------------------------------------------------------------------------- per layer
def layer_weights(scheme, c, n, k, r, dtype, device):
    g = dict(dtype=dtype, device=device)
    # scaled so that fp16 activations stay in range
    if scheme == "channel":
        w1 = torch.randn(r, c, k, k, **g) / (c * k * k) ** 0.5
        w2 = torch.randn(n, r, 1, 1, **g) / r ** 0.5
        dense = torch.einsum("nr,rcij->ncij", w2.flatten(1).float(), w1.float()).to(dtype)
    else:
        w1 = torch.randn(r, c, k, 1, **g) / (c * k) ** 0.5
        w2 = torch.randn(n, r, 1, k, **g) / (r * k) ** 0.5
        dense = torch.einsum("rci,nrj->ncij", w1[..., 0].float(), w2[:, :, 0].float()).to(dtype)
    return w1, w2, dense


def bench_layers(results, nets, batches, dtypes, iters, budget):
    """Adds a row per (layer, dtype, batch) to `results`; False when the budget cut the table short."""
    from trp_kernels import triton as tri
    for net in nets:
        for scheme in ("channel", "spatial"):
            if (net, scheme) not in SPEEDUP:
                continue
            for name, c, n, size, stride in NET_LAYERS[net]:
                r = layer_rank(scheme, c, n, 3, stride, SPEEDUP[(net, scheme)])
                for dtype in dtypes:
                    for nb in batches:
                        if budget.over():
                            return False
                        row = results.add(_bench_one(tri, net, scheme, name, c, n, size, stride, r, nb, dtype,
                                                     iters))
                        print(json.dumps(row), flush=True)
    return True


def _bench_one(tri, net, scheme, name, c, n, size, stride, r, nb, dtype, iters):
    dev = "cuda"
    x = torch.randn(nb, c, size, size, device=dev, dtype=dtype)
    w1, w2, dense = layer_weights(scheme, c, n, 3, r, dtype, dev)
    st, pad, dil = [stride, stride], [1, 1, 1, 1], [1, 1]
    fused = getattr(tri, f"factorized_conv_{scheme}")
    two = getattr(reference, f"factorized_conv_{scheme}")
    rec = {"net": net, "scheme": scheme, "layer": name, "c": c, "n": n, "size": size, "stride": stride,
           "rank": r, "batch": nb, "dtype": str(dtype).replace("torch.", ""),
           "mac_ratio": round(n * c * 9 / per_rank_macs(scheme, c, n, 3, stride) / r, 3)}
    why = tri.supported(scheme, x, w1, w2, None, (0, 0))
    calls = {"two_conv": lambda: two(x, w1, w2, None, st, pad, dil),
             "dense": lambda: F.conv2d(x, dense, None, stride, 1)}
    if why is None:
        calls["fused"] = lambda: fused(x, w1, w2, None, st, pad, dil)
    else:
        rec["fused_unsupported"] = why
    try:
        if "fused" in calls:  # correctness guard: a fast wrong kernel must not make the table
            exact = two(x.double(), w1.double(), w2.double(), None, st, pad, dil)
            err_f = (calls["fused"]().double() - exact).abs().max().item()
            err_t = (calls["two_conv"]().double() - exact).abs().max().item()
            rec["max_err_fused"], rec["max_err_two_conv"] = err_f, err_t
        for key, fn in calls.items():
            rec[f"{key}_ms"] = round(harness.cuda_time_ms(fn, iters), 5)
            g = harness.cuda_time_ms(fn, iters, graph=True)
            rec[f"{key}_graph_ms"] = round(g, 5) if g is not None else None
    except Exception as exc:  # one bad layer must not lose the rest of the table
        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
    if rec.get("fused_ms") and rec.get("two_conv_ms"):
        rec["fused_speedup_vs_two_conv"] = round(rec["two_conv_ms"] / rec["fused_ms"], 3)
        rec["fused_speedup_vs_dense"] = round(rec["dense_ms"] / rec["fused_ms"], 3)
    return rec


# ----------------------------------------------------------------------------------- end to end
def build_net(net, device):
    import trp
    if net == "resnet50":
        model = trp.models.build("torchvision:resnet50", num_classes=1000)
        size = (3, 224, 224)
    else:
        model = trp.models.build(net)
        size = (3, 32, 32)
    return model.to(device).eval(), size


def decompose_at_paper_ranks(model, net, scheme):
    """trp.decompose with the per-layer ranks of `layer_rank` (random weights have flat spectra, so an
    energy rule would keep nearly full rank)."""
    import trp
    ranks = {}
    for name, _ in trp.select_layers(model, scheme, layers="paper"):
        m = model.get_submodule(name)
        if not isinstance(m, torch.nn.Conv2d):
            continue
        ranks[name] = layer_rank(scheme, m.in_channels, m.out_channels, m.kernel_size[0], m.stride[1],
                                 SPEEDUP[(net, scheme)])
    return trp.decompose(model, scheme, rank=ranks)


def interleaved_latency(contenders, x, warmup, repeats):
    """{name: median seconds of one forward} for contenders {name: (model, TRP_CONV_BACKEND or None)}.
    Rounds alternate between the contenders (rotating the order), so that load from other processes and
    clock drift hit all of them alike; the ratio of medians is what the tables report."""
    names = list(contenders)
    times = {k: [] for k in names}
    cuda = x.is_cuda

    def once(name):
        model, be = contenders[name]
        if be is None:
            os.environ.pop(conv.BACKEND_ENV, None)
        else:
            os.environ[conv.BACKEND_ENV] = be
        return timing.call_seconds(lambda: model(x), cuda)

    try:
        with torch.no_grad():
            for name in names:
                for _ in range(warmup):  # also where auto mode measures and Triton autotunes each shape
                    once(name)
            if cuda:
                torch.cuda.synchronize()
            for i in range(repeats):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    times[name].append(once(name))
    finally:
        os.environ.pop(conv.BACKEND_ENV, None)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def bench_e2e(results, nets, batches, device, dtypes, backends, budget, warmup, repeats, channels_last=False):
    """Adds a row per (net, scheme, dtype, batch) to `results`; False when the budget cut it short."""
    import trp
    for net in nets:
        try:
            dense, size = build_net(net, device)
        except Exception as exc:
            results.add({"net": net, "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        for scheme in ("channel", "spatial"):
            if (net, scheme) not in SPEEDUP:
                continue
            small = decompose_at_paper_ranks(dense, net, scheme).eval()
            mac_ratio = trp.count_macs(dense, size) / trp.count_macs(small, size)
            for dtype in dtypes:
                fmt_ = torch.channels_last if channels_last else torch.contiguous_format
                d_m, s_m = dense.to(dtype, memory_format=fmt_), small.to(dtype, memory_format=fmt_)
                for nb in batches:
                    if budget.over():
                        return False
                    rec = {"net": net, "scheme": scheme, "batch": nb, "dtype": str(dtype).replace("torch.", ""),
                           "device": device, "channels_last": channels_last, "mac_ratio": round(mac_ratio, 3)}
                    x = torch.randn((nb,) + size, device=device, dtype=dtype).to(memory_format=fmt_)
                    contenders = {"dense": (d_m, "torch")}
                    contenders.update({be: (s_m, be) for be in backends})
                    try:
                        med = interleaved_latency(contenders, x, warmup, repeats)
                        rec["dense_ms"] = round(1e3 * med["dense"], 4)
                        for be in backends:
                            rec[f"decomposed_{be}_ms"] = round(1e3 * med[be], 4)
                            rec[f"latency_ratio_{be}"] = round(med["dense"] / med[be], 3)
                            rec[f"latency_over_mac_ratio_{be}"] = round(med["dense"] / med[be] / mac_ratio, 3)
                    except Exception as exc:
                        rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
                    results.add(rec)
                    print(json.dumps(rec), flush=True)
    return True


# ------------------------------------------------------------------------------------------ output
def fmt(v, digits=3):
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def layer_markdown(rows):
    out = ["| net | scheme | layer | rank | batch | dtype | MAC ratio | fused ms | two convs ms | dense ms | "
           "fused vs two convs | fused vs dense | graph: fused / two convs / dense ms |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        graph = " / ".join(fmt(r.get(k), 4) for k in ("fused_graph_ms", "two_conv_graph_ms", "dense_graph_ms"))
        fused = fmt(r.get("fused_ms"), 4) if "fused_unsupported" not in r else "unsupported"
        out.append(f"| {r['net']} | {r['scheme']} | {r['layer']} | {r['rank']} | {r['batch']} | {r['dtype']} | "
                   f"{r['mac_ratio']:.2f} | {fused} | {fmt(r.get('two_conv_ms'), 4)} | "
                   f"{fmt(r.get('dense_ms'), 4)} | {fmt(r.get('fused_speedup_vs_two_conv'), 2)} | "
                   f"{fmt(r.get('fused_speedup_vs_dense'), 2)} | {graph} |")
    return "\n".join(out)


def e2e_markdown(rows, backends):
    head = "| net | scheme | device | layout | dtype | batch | MAC speed-up | dense ms | " + \
        " | ".join(f"decomposed ({b}) ms | latency speed-up ({b}) | latency / MAC speed-up ({b})"
                   for b in backends) + " |"
    out = [head, "|" + "---|" * (8 + 3 * len(backends))]
    for r in rows:
        if "error" in r or "dense_ms" not in r:
            out.append(f"| {r['net']} | {r.get('scheme', '-')} | error: {r.get('error')} |")
            continue
        cells = " | ".join(f"{fmt(r.get(f'decomposed_{b}_ms'), 2)} | {fmt(r.get(f'latency_ratio_{b}'), 2)} | "
                           f"{fmt(r.get(f'latency_over_mac_ratio_{b}'), 2)}" for b in backends)
        layout = "NHWC" if r.get("channels_last") else "NCHW"
        out.append(f"| {r['net']} | {r['scheme']} | {r['device']} | {layout} | {r['dtype']} | {r['batch']} | "
                   f"{r['mac_ratio']:.2f} | {r['dense_ms']:.2f} | {cells} |")
    return "\n".join(out)


def render(doc):
    """The tables of one results file of this script as markdown (benchmarks/pages.py): per layer, end to end
    with one column group per backend found in the rows."""
    rows = doc["rows"]
    layers = [r for r in rows if "layer" in r]
    e2e = [r for r in rows if "layer" not in r]
    backends = sorted({k[len("decomposed_"):-len("_ms")] for r in e2e for k in r
                       if k.startswith("decomposed_") and k.endswith("_ms")})
    tables = [layer_markdown(layers)] if layers else []
    if e2e:
        tables.append(e2e_markdown(e2e, backends))
    return "\n\n".join(tables)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["all", "layers", "e2e"], default="all")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--nets", nargs="+", default=None)
    p.add_argument("--batches", nargs="+", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--iters", type=int, default=20, help="calls per timing round (per layer)")
    p.add_argument("--repeats", type=int, default=None, help="timed forwards per end-to-end point")
    p.add_argument("--channels-last", action="store_true", help="end to end: models and input in NHWC")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--budget-s", type=float, default=0, help="stop starting new points after this long")
    p.add_argument("--smoke", action="store_true",
                   help="end to end only, ResNet-20, batch 1, 2 repeats (fp32 on a CPU): checks that the script works")
    p.add_argument("--out", default=str(harness.ROOT / "results"), help="directory of the JSON files")
    args = p.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is available")
    if args.smoke:
        args.part, args.nets, args.batches, args.repeats = "e2e", ["resnet20"], [1], 2
        args.dtypes = args.dtypes if device == "cuda" else ["float32"]
    budget = harness.Budget(args.budget_s)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    on_gpu = device == "cuda"
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float16", "float32"] if on_gpu else ["float32"]))]
    torch.backends.cudnn.allow_tf32 = False  # IEEE fp32 for every contender (see module doc)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True    # cuDNN picks its fastest algorithm per shape, as in deployment
    settings = {"args": vars(args), "autotune": os.environ.get("TRP_TRITON_AUTOTUNE", "full"),
                "speedup_targets": {f"{k[0]}/{k[1]}": v for k, v in SPEEDUP.items()}}

    if args.part in ("all", "layers"):
        if not on_gpu:
            print("per-layer table: needs CUDA (fused Triton vs cuDNN); skipped on this CPU")
        else:
            results = harness.Results(out / f"conv_layers_{device}.json", "conv_layers", device, **settings)
            done = bench_layers(results, args.nets or ["resnet20", "resnet56", "resnet50"],
                                args.batches or [1, 32, 128], dtypes, args.iters, budget)
            results.finish(truncated_by_budget=not done, backend_info=trp_kernels.backend_info())
            print("\n" + layer_markdown(results.rows))
    if args.part in ("all", "e2e"):
        nets = args.nets or (["resnet20", "resnet56", "resnet50"] if on_gpu else ["resnet20", "resnet56"])
        backends = ["torch", "auto", "triton"] if on_gpu else ["torch"]
        batches = args.batches or ([1, 32, 128] if on_gpu else [1, 32])
        repeats = args.repeats or (30 if on_gpu else 15)
        tag = "_channels_last" if args.channels_last else ""
        results = harness.Results(out / f"conv_e2e_{device}{tag}.json", "conv_e2e", device, **settings)
        done = bench_e2e(results, nets, batches, device, dtypes, backends, budget, warmup=3 if on_gpu else 2,
                         repeats=repeats, channels_last=args.channels_last)
        # which backend `auto` chose per shape, with its measurements (and Triton's tuned configs)
        results.finish(truncated_by_budget=not done, backend_info=trp_kernels.backend_info())
        print("\n" + e2e_markdown(results.rows, backends))


if __name__ == "__main__":
    main()
