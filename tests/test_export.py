"""ONNX export of decomposed networks (both exporters, dynamic batch), checked in onnxruntime against eager."""
import functools

import pytest
import torch
import torch.nn as nn

import trp
import trp_kernels
from trp import export

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _exporter(name):
    if name == "dynamo":
        pytest.importorskip("onnxscript")
    return name


@functools.lru_cache(maxsize=None)  # shared by the tests (nothing here modifies a model)
def _decomposed_resnet20(scheme):
    torch.manual_seed(0)
    dense = trp.models.build("resnet20").eval()
    rank = {"channel": 6, "spatial": 6, "nd": 2}[scheme]
    compact = trp.decompose(dense, scheme, rank=rank).eval()
    assert len(trp.factorized_layers(compact)) >= 17  # nd keeps a strided conv dense (no saving)
    return compact


def _op_types(data):
    model = onnx.load_from_string(data)
    return {(n.domain, n.op_type) for n in model.graph.node}


def _check(model, data, input_size, batches):
    errors = export.verify(model, data, input_size, batches, rtol=1e-4)
    assert set(errors) == set(batches) and max(errors.values()) <= 1e-4
    ops = _op_types(data)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops), ops  # standard ONNX only
    assert ("", "Conv") in ops


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("scheme", ["channel", "spatial", "nd"])
def test_decomposed_resnet20_exports_as_standard_convs(scheme, exporter):
    compact = _decomposed_resnet20(scheme)
    data = export.onnx_bytes(compact, (2, 3, 32, 32), dynamic_batch=True, exporter=_exporter(exporter))
    _check(compact, data, (2, 3, 32, 32), (2, 5))  # another batch size than the example's: dynamic axis
    n_convs = sum(n.op_type == "Conv" for n in onnx.load_from_string(data).graph.node)
    n_dense = sum(isinstance(m, nn.Conv2d) for m in compact.modules())
    assert n_convs == 2 * len(trp.factorized_layers(compact)) + n_dense  # two convs per factorized layer


@functools.lru_cache(maxsize=None)
def _decomposed_resnet18():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    # layer4's 512-channel convs stay dense: their float64 SVDs would be most of this test's time
    return trp.decompose(tv.models.resnet18(num_classes=10).eval(), "channel", energy=0.5, layers="paper",
                         exclude=[r"layer4\..*"]).eval()


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_torchvision_resnet18_exports(exporter, tmp_path):
    compact = _decomposed_resnet18()
    assert len(trp.factorized_layers(compact)) == 12  # the 3x3 convs of layer1-3 (the stem is not selected)
    path = tmp_path / "r18.onnx"
    info = trp.export_onnx(compact, path, (3, 64, 64), exporter=_exporter(exporter))
    assert path.read_bytes()[:4] and info["bytes"] == path.stat().st_size
    assert set(info["errors"]) == {1, 3} and max(info["errors"].values()) <= 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] not in (1, 3)  # symbolic batch axis
    # the file's own run at batch 4 equals eager
    x = torch.randn(4, 3, 64, 64)
    out = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        ref = compact(x)
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()


class _Odd(nn.Module):
    """Geometry the ResNets do not have: even kernels with asymmetric "same" padding, dilation, strides,
    rectangular kernels, each scheme."""

    def __init__(self):
        super().__init__()
        self.a = trp.ChannelFactorizedConv2d(3, 6, (2, 3), rank=2, padding="same", dilation=(1, 2))
        self.b = trp.SpatialFactorizedConv2d(6, 5, (3, 2), rank=3, stride=(2, 1), padding=(1, 0, 2, 1))
        self.c = trp.DecoupledConv2d(5, 4, 3, rank=2, stride=2, padding=1, dilation=(2, 1))

    def forward(self, x):
        return self.c(self.b(self.a(x)))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_odd_geometry_exports(exporter):
    torch.manual_seed(0)
    model = _Odd().eval()
    data = export.onnx_bytes(model, (1, 3, 11, 13), exporter=_exporter(exporter))
    _check(model, data, (1, 3, 11, 13), (1, 2))


def test_exported_program_lowers_with_the_translation_table():
    """A graph that already holds the trp_kernels ops (torch.export first) exports through
    trp_kernels.onnx.custom_translation_table()."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    model = _Odd().eval()
    x = torch.randn(2, 3, 11, 13)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    targets = {n.target for n in ep.graph.nodes if n.op == "call_function"}
    assert torch.ops.trp_kernels.decoupled_conv.default in targets
    program = torch.onnx.export(ep, dynamo=True, input_names=["input"], output_names=["output"],
                                custom_translation_table=trp_kernels.onnx.custom_translation_table(),
                                verbose=False)
    _check(model, program.model_proto.SerializeToString(), (2, 3, 11, 13), (2, 3))


def test_export_checks_arguments(tmp_path):
    compact = _Odd()
    with pytest.raises(ValueError, match="exporter"):
        export.onnx_bytes(compact, (3, 13, 13), exporter="tflite")
    with pytest.raises(ValueError, match="dynamic_batch"):
        export.onnx_bytes(compact, (3, 13, 13), dynamic_batch="yes", exporter="torchscript")
    with pytest.raises(ValueError, match="input_size"):
        trp.export_onnx(compact, tmp_path / "m.onnx", (13, 13))
    with pytest.raises(IsADirectoryError):
        trp.export_onnx(compact, tmp_path, (3, 13, 13))
    assert not list(tmp_path.iterdir())


def test_verify_catches_a_wrong_file():
    """verify compares with eager: a file of other weights fails with the measured error."""
    a, b = _decomposed_resnet20("channel"), _decomposed_resnet20("spatial")
    data = export.onnx_bytes(b, (1, 3, 32, 32), exporter="torchscript")
    with pytest.raises(ValueError, match="differs from eager"):
        export.verify(a, data, (1, 3, 32, 32))
