"""pytest-benchmark: fused factorized convs vs two cuDNN convs vs the dense conv (GPU), and end-to-end
decomposed vs dense ResNet-20 on the CPU.

    .venv/bin/python -m pytest benchmarks/bench_factorized_conv.py --benchmark-enable

Ranks and shapes come from conv_table.py (the paper's MAC speed-ups per layer). GPU cases time each call
followed by a synchronize, so the numbers include launch overhead (eager use)."""
import os

import pytest
import torch
import torch.nn.functional as F

import conv_table as ct
from trp_kernels import conv, reference

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs an NVIDIA GPU (fused kernels run on CUDA)")

LAYERS = [("resnet20", "channel", ct.CIFAR_LAYERS[0]), ("resnet20", "channel", ct.CIFAR_LAYERS[4]),
          ("resnet20", "spatial", ct.CIFAR_LAYERS[0]), ("resnet20", "spatial", ct.CIFAR_LAYERS[3]),
          ("resnet50", "channel", ct.RESNET50_LAYERS[0]), ("resnet50", "channel", ct.RESNET50_LAYERS[4])]


@needs_cuda
@pytest.mark.parametrize("impl", ["fused", "two_conv", "dense"])
@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("net,scheme,layer", LAYERS, ids=lambda v: v[0] if isinstance(v, tuple) else str(v))
def test_layer(benchmark, rounds, net, scheme, layer, dtype, batch, impl):
    from trp_kernels import triton as tri
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    name, c, n, size, stride = layer
    dt = getattr(torch, dtype)
    r = ct.layer_rank(scheme, c, n, 3, stride, ct.SPEEDUP[(net, scheme)])
    x = torch.randn(batch, c, size, size, device="cuda", dtype=dt)
    w1, w2, dense = ct.layer_weights(scheme, c, n, 3, r, dt, "cuda")
    args = (None, [stride, stride], [1, 1, 1, 1], [1, 1])
    fn = {"fused": lambda: getattr(tri, f"factorized_conv_{scheme}")(x, w1, w2, *args),
          "two_conv": lambda: getattr(reference, f"factorized_conv_{scheme}")(x, w1, w2, *args),
          "dense": lambda: F.conv2d(x, dense, None, stride, 1)}[impl]
    if impl == "fused":  # never time a wrong kernel
        exact = getattr(reference, f"factorized_conv_{scheme}")(x.double(), w1.double(), w2.double(), *args)
        lowp = getattr(reference, f"factorized_conv_{scheme}")(x, w1, w2, *args)
        assert (fn().double() - exact).abs().max() <= 2 * (lowp.double() - exact).abs().max() + 1e-5
    fn()
    torch.cuda.synchronize()
    benchmark.group = f"{net} {scheme} {name} b{batch} {dtype} r{r}"

    def call():
        fn()
        torch.cuda.synchronize()
    benchmark.pedantic(call, rounds=rounds(30), iterations=5, warmup_rounds=2)


@pytest.mark.parametrize("model", ["dense", "channel", "spatial"])
def test_e2e_cpu_resnet20(benchmark, rounds, model, monkeypatch):
    """ResNet-20, batch 1, CPU: dense vs decomposed at the paper's ranks (two oneDNN convs per layer)."""
    pytest.importorskip("trp")
    monkeypatch.setenv(conv.BACKEND_ENV, "torch")
    net, _ = ct.build_net("resnet20", "cpu")
    if model != "dense":
        net = ct.decompose_at_paper_ranks(net, "resnet20", model).eval()
    x = torch.randn(1, 3, 32, 32)
    benchmark.group = "e2e cpu resnet20 batch 1 (1 thread)"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: stable numbers on a shared CPU
    try:
        with torch.no_grad():
            out = benchmark.pedantic(lambda: net(x), rounds=rounds(10), iterations=1, warmup_rounds=2)
    finally:
        torch.set_num_threads(threads)
    assert out.shape == (1, 10) and torch.isfinite(out).all()


def teardown_module():
    os.environ.pop(conv.BACKEND_ENV, None)
