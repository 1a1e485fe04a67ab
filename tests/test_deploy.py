"""Deployment: drop-in behaviour of the factorized convs (unbatched input, nn.Conv2d attributes, string
padding), exact merge-back, rank rounding, the latency fit's decisions, and the `trp export` command."""
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
import trp_kernels
from cli_helpers import TINY, run_cli
from trp.deploy import latency as deploy
from trp.nn.modules import FACTORIZED

CONV_SCHEMES = ("channel", "spatial", "nd_pointwise", "nd_depthwise")


def _close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
@pytest.mark.parametrize("padding", [1, (2, 0), "same", "valid"])
def test_drop_in_for_nn_conv2d(scheme, padding):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (3, 2) if padding == "same" else 3, padding=padding, dilation=(1, 2))
    m = FACTORIZED[scheme].from_conv(conv, energy=1.0)  # full rank: equals the conv
    for attr in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                 "padding_mode"):
        assert getattr(m, attr) == getattr(conv, attr), attr
    x = torch.randn(2, 4, 9, 10)
    with torch.no_grad():
        assert _close(m(x), conv(x))
        single = m(x[0])  # unbatched (C, H, W), as nn.Conv2d takes it
        assert single.shape == conv(x[0]).shape and _close(single, m(x)[0])
    with pytest.raises(ValueError, match="3-D .* or 4-D"):
        m(x[None])
    assert set(m.state_dict()) == {f"{n}" for n in m._names} | {"bias"}


@pytest.mark.parametrize("kind", ["channel", "spatial", "decoupled", "depthwise_decoupled"])
def test_ops_take_string_padding(kind):
    torch.manual_seed(0)
    c, n, r, (kh, kw), dil = 3, 5, 2, (2, 3), (2, 1)
    x = torch.randn(2, c, 7, 8)
    if kind == "channel":
        w1, w2 = torch.randn(r, c, kh, kw), torch.randn(n, r, 1, 1)
        op = trp_kernels.factorized_conv_channel
    elif kind == "spatial":
        w1, w2 = torch.randn(r, c, kh, 1), torch.randn(n, r, 1, kw)
        op = trp_kernels.factorized_conv_spatial
    elif kind == "decoupled":
        w1, w2 = torch.randn(n * r, c, 1, 1), torch.randn(n, r, kh, kw)
        op = trp_kernels.decoupled_conv
    else:
        w1, w2 = torch.randn(c * r, 1, kh, kw), torch.randn(n, c * r, 1, 1)
        op = trp_kernels.depthwise_decoupled_conv
    scheme = {"decoupled": "nd_pointwise", "depthwise_decoupled": "nd_depthwise"}.get(kind, kind)
    dense = FACTORIZED[scheme](c, n, (kh, kw), r, dilation=dil, bias=False)
    with torch.no_grad():
        dense.load_state_dict(dict(zip(dense._names, (w1, w2))), strict=False)
        w = dense.dense_weight()
    for mode in ("same", "valid"):
        assert _close(op(x, w1, w2, None, 1, mode, dil), F.conv2d(x, w, None, 1, mode, dil), 1e-4)
    with pytest.raises(ValueError, match="'same' or 'valid'"):
        op(x, w1, w2, None, 1, "full", dil)
    with pytest.raises(ValueError, match="stride 1"):
        op(x, w1, w2, None, 2, "same", dil)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding="same")
        self.c = nn.Conv2d(16, 24, (2, 3), stride=2, padding=(1, 0))
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.c(F.relu(self.b(F.relu(self.a(x))))))
        return self.fc(x.mean((2, 3)))


def _compact(scheme="channel", rank=3):
    torch.manual_seed(0)
    dense = _Net().eval()
    return dense, trp.decompose(dense, scheme, rank=rank, exclude=["fc"]).eval()


@pytest.mark.parametrize("scheme", CONV_SCHEMES)
def test_merge_back_is_exact(scheme):
    _, compact = _compact(scheme, 1 if scheme.startswith("nd") else 2)
    x = torch.randn(2, 3, 12, 12)
    names = list(trp.factorized_layers(compact))
    assert names == ["b", "c"]  # the first conv is not selected by default
    merged = trp.merge_back(compact)
    assert not trp.factorized_layers(merged) and isinstance(merged.b, nn.Conv2d) and merged.b.padding == "same"
    part = trp.merge_back(compact, names[:1])
    assert set(trp.factorized_layers(part)) == set(names[1:])
    with torch.no_grad():
        assert _close(merged(x), compact(x)) and _close(part(x), compact(x))
    with pytest.raises(ValueError, match="not factorized"):
        trp.merge_back(compact, ["fc"])


def test_merge_back_asymmetric_padding():
    torch.manual_seed(0)
    m = trp.SpatialFactorizedConv2d(3, 4, 3, rank=2, padding=(1, 0, 2, 1))
    assert m.padding == (1, 0, 2, 1)
    x = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        assert _close(deploy.dense_layer(m)(x), m(x))


def test_round_ranks():
    dense, compact = _compact("channel", 3)
    x = torch.randn(2, 3, 12, 12)
    exact = trp.round_ranks(compact, 4)
    refit = trp.round_ranks(compact, 4, dense=dense)
    for name, m in trp.factorized_layers(refit).items():
        assert m.rank == 4 and compact.get_submodule(name).rank == 3
        w = dense.get_submodule(name).weight
        err_old = (compact.get_submodule(name).dense_weight() - w).norm()
        assert (m.dense_weight() - w).norm() < err_old  # one more singular component of the dense weight
    assert all(m.rank == 4 for m in trp.factorized_layers(exact).values())
    with torch.no_grad():
        assert _close(exact(x), compact(x), 1e-4)  # from the factors themselves: the same function
    big = trp.round_ranks(compact, 64, dense=dense)  # would cost more MACs than dense: ranks unchanged
    assert all(m.rank == 3 for m in trp.factorized_layers(big).values())
    with pytest.raises(ValueError, match="multiple"):
        trp.round_ranks(compact, 0)


def test_fit_latency_keeps_only_faster_layers(monkeypatch):
    """The decisions, with the measurement replaced: layer b is timed faster than its dense layer, the
    others not; then the whole fitted network faster than dense, then slower."""
    _, compact = _compact()
    names = {"b"}

    def compare(self, modules, x):  # fit_latency works on a copy: layer b is recognised by its weights
        if len(modules) == 2 and isinstance(modules[1], trp.modules.FACTORIZED_TYPES):
            return [1.0, 0.5 if modules[1].c_weight.shape == compact.b.c_weight.shape and
                    torch.equal(modules[1].c_weight, compact.b.c_weight) else 1.0]
        return [1.0, 1.2, 0.9][:len(modules)]
    monkeypatch.setattr(deploy.RuntimeTimer, "compare", compare)
    fitted, fit = trp.fit_latency(compact, (3, 12, 12), "eager", repeats=2)
    assert set(trp.factorized_layers(fitted)) == names
    assert [r["factorized"] for r in fit.rows] == [r["layer"] in names for r in fit.rows]
    assert fit.totals["speedup_fitted"] == pytest.approx(1 / 0.9) and not fit.totals["all_dense"]
    assert fit.totals["macs_dense"] > fit.totals["macs_fitted"] > fit.totals["macs_decomposed"]
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert _close(fitted(x), compact(x))
    assert "| b | 3 |" in str(fit) and "1 of 2 factorized layers kept" in str(fit)

    # the fitted network measured slower than dense as a whole: the dense network is returned
    monkeypatch.setattr(deploy.RuntimeTimer, "compare", lambda self, modules, x: (
        compare(self, modules, x) if len(modules) == 2 else [1.0, 1.2, 1.05]))
    fitted, fit = trp.fit_latency(compact, (3, 12, 12), "eager", repeats=2)
    assert not trp.factorized_layers(fitted) and fit.totals["all_dense"]
    assert fit.totals["speedup_fitted"] == 1.0 and not any(r["factorized"] for r in fit.rows)


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_fit_latency_measures(runtime):
    """A real (short) measurement: whatever it decides, the fitted network computes the decomposed one's
    function and its factorized layers are exactly the rows marked kept."""
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime")
    _, compact = _compact("spatial")
    fitted, fit = trp.fit_latency(compact, (3, 12, 12), runtime, batch_size=2, threads=1, repeats=3,
                                  multiple=4)
    assert fit.totals["input_shape"] == [2, 3, 12, 12] and fit.totals["rank_multiple"] == 4
    assert {r["layer"] for r in fit.rows if r["factorized"]} == set(trp.factorized_layers(fitted))
    for r in fit.rows:
        assert r["rank"] == 4 and r["ms_dense"] > 0 and r["ms_factorized"] > 0
        assert r["factorized"] == (not fit.totals["all_dense"] and r["ms_factorized"] < 0.98 * r["ms_dense"])
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        assert _close(fitted(x), trp.round_ranks(compact, 4)(x), 1e-4)


def test_fit_latency_checks_arguments():
    _, compact = _compact()
    for kwargs, match in (({"runtime": "tvm"}, "runtime"), ({"threads": 0}, "threads"),
                          ({"margin": 1.0}, "margin"), ({"batch_size": 0}, "batch_size"),
                          ({"repeats": 0}, "repeats")):
        with pytest.raises(ValueError, match=match):
            trp.fit_latency(compact, (3, 12, 12), **kwargs)
    with pytest.raises(ValueError, match="batch size"):
        trp.fit_latency(compact, (2, 3, 12, 12), batch_size=2)
    with pytest.raises(ValueError, match="no factorized layer"):
        trp.fit_latency(_Net(), (3, 12, 12))


@pytest.mark.slow
def test_cli_export_and_latency_fit(tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", *TINY, "--epochs", "1", "--no-report", "--out", run)
    assert code == 0, err
    ckpt = run / "checkpoint.pt"

    fitted_file = tmp_path / "fitted.pt"
    code, out, err = run_cli(capsys, "decompose", ckpt, "-o", fitted_file, "--energy", "0.8",
                             "--fit-latency", "eager", "--fit-threads", "1", "--rank-multiple", "4")
    assert code == 0, err
    assert "latency fit: eager" in out and "factorized layers kept" in out and fitted_file.exists()
    trp.load(fitted_file)

    onnx_file = tmp_path / "model.onnx"
    code, out, err = run_cli(capsys, "export", ckpt, "-o", onnx_file, "--exporter", "torchscript",
                             "--threads", "1")
    assert code == 0, err
    assert "onnxruntime matches eager" in out and "dense" in out and onnx_file.exists()

    compact = trp.decompose(trp.models.build("resnet20", num_classes=10, in_channels=1), "channel", rank=4)
    model_file = tmp_path / "compact.pt"
    trp.save(compact, model_file)
    code, out, err = run_cli(capsys, "export", model_file, "-o", onnx_file, "--exporter", "torchscript",
                             "--image-size", "8", "--batch-size", "2", "--threads", "1")
    assert code == 0, err
    assert "input 2x1x8x8" in out and "dynamic batch" in out

    for args, match in (((model_file, "-o", onnx_file, "--energy", "0.5"), "already a model file"),
                        ((tmp_path, "-o", onnx_file), ""),
                        ((model_file, "-o", onnx_file, "--exporter", "tflite"), "exporter")):
        code, out, err = run_cli(capsys, "export", *args)
        assert code == 2 and err.startswith("trp: error:") and match in err
    code, _, err = run_cli(capsys, "report", ckpt, "--rank-multiple", "8")
    assert code == 2 and "--fit-latency" in err
    code, out, err = run_cli(capsys, "report", ckpt, "--out", tmp_path / "rep", "--fit-latency", "eager",
                             "--fit-threads", "1")
    assert code == 0, err
    fit = json.loads((tmp_path / "rep" / "latency_fit.json").read_text())
    assert "latency fit: eager" in out and fit["totals"]["runtime"] == "eager" and fit["layers"]
    assert all(r["ms_dense"] > 0 and r["ms_factorized"] > 0 for r in fit["layers"])
