"""ONNX export of decomposed networks (both exporters, dynamic batch), checked in onnxruntime against eager."""
import collections
import dataclasses
import functools
import io
import typing
import warnings

import pytest
import torch
import torch.nn as nn

import trp
import trp_kernels
from trp.deploy import export

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
    rank = {"channel": 6, "spatial": 6, "nd": 2, "nd_depthwise": 2}[scheme]
    compact = trp.decompose(dense, scheme, rank=rank).eval()
    assert len(trp.factorized_layers(compact)) >= 17  # nd_pointwise would keep a strided conv dense (no saving)
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
@pytest.mark.parametrize("scheme", ["channel", "spatial", "nd", "nd_depthwise"])
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


class _DictNet(nn.Module):
    """torchvision segmentation's output: {"out": ..., "aux": ...}; two outputs of the same shape, keys not in
    sorted order, so that a swapped mapping would fail."""

    def __init__(self):
        super().__init__()
        self.a = trp.ChannelFactorizedConv2d(3, 6, 3, rank=2, padding=1)
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return {"out": self.b(y), "aux": self.b(y.flip(-1)) * 2}


class _TupleNet(nn.Module):
    """Nested tuple / list with a None, a repeated tensor, a leaf without batch axis and a constant one."""

    def __init__(self):
        super().__init__()
        self.a = trp.SpatialFactorizedConv2d(3, 4, 3, rank=2, padding=1)
        self.scale = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = self.a(x)
        return y, [y.mean((2, 3)), None, (y,)], self.scale * x.mean(), self.scale * 3


@dataclasses.dataclass
class _ModelOutput(collections.OrderedDict):
    """What a Hugging Face ModelOutput is: a dataclass and an OrderedDict of its fields that are not None."""
    logits: torch.Tensor = None
    hidden_states: torch.Tensor = None
    pooled: torch.Tensor = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if getattr(self, field.name) is not None:
                self[field.name] = getattr(self, field.name)


class _ModelOutputNet(nn.Module):
    def __init__(self, output_class=_ModelOutput):
        super().__init__()
        self.output_class = output_class
        self.a = trp.ChannelFactorizedConv2d(3, 5, 3, rank=3)
        self.fc = trp.FactorizedLinear(5, 7, rank=2)

    def forward(self, x):
        pooled = self.a(x).mean((2, 3))
        return self.output_class(logits=self.fc(pooled), hidden_states=None, pooled=pooled)


def _hf_model_output_net():
    """The same with a real transformers.utils.ModelOutput subclass."""
    transformers = pytest.importorskip("transformers")

    @dataclasses.dataclass
    class Output(transformers.utils.ModelOutput):
        logits: torch.Tensor = None
        hidden_states: typing.Optional[torch.Tensor] = None
        pooled: torch.Tensor = None

    return _ModelOutputNet(Output)


PYTREE_MODELS = {
    "dict": (_DictNet, ["output.out", "output.aux"]),
    "tuple": (_TupleNet, ["output.0", "output.1.0", "output.1.2.0", "output.2", "output.3"]),
    "model_output": (_ModelOutputNet, ["output.logits", "output.pooled"]),
    "transformers_model_output": (_hf_model_output_net, ["output.logits", "output.pooled"]),
}


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("kind", sorted(PYTREE_MODELS))
def test_pytree_outputs_are_verified_leaf_by_leaf(kind, exporter, tmp_path):
    build, names = PYTREE_MODELS[kind]
    torch.manual_seed(0)
    model = build().eval()
    path = tmp_path / "m.onnx"
    info = trp.export_onnx(model, path, (2, 3, 9, 8), exporter=_exporter(exporter))
    assert set(info["errors"]) == {2, 4} and max(info["errors"].values()) <= 1e-4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == info["outputs"]
    # each output is named by its leaf's path (the TorchScript exporter names a constant output, folded into
    # an initializer, itself)
    constant = ["output.3"] if kind == "tuple" else []
    assert len(info["outputs"]) == len(names)
    assert [o for n, o in zip(names, info["outputs"]) if n not in constant] == [n for n in names if n not in constant]
    # the file's outputs, by name, equal eager's leaves at a third batch size (the batch axis is dynamic)
    x = torch.randn(3, 3, 9, 8)
    with torch.no_grad():
        ref = dict(export.output_leaves(model(x)))
    for name, out in zip(names, sess.run(None, {"input": x.numpy()})):
        torch.testing.assert_close(torch.from_numpy(out), ref[name], rtol=1e-4, atol=1e-5)


def test_verify_maps_outputs_by_position_and_catches_a_swap():
    """A file written without output_leaves' names (the exporter's own) is compared by position, which is the
    exporters' order; a file whose outputs are swapped fails, naming the output."""
    torch.manual_seed(0)
    model = _DictNet().eval()
    x = torch.randn(1, 3, 9, 8)
    plain = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), plain, dynamo=False, input_names=["input"])
    assert export.verify(model, plain.getvalue(), (1, 3, 9, 8))[1] <= 1e-4

    class Swapped(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            out = self.net(x)
            return {"out": out["aux"], "aux": out["out"]}

    swapped = export.module_bytes(Swapped(model), x, exporter="torchscript")
    with pytest.raises(ValueError, match=r"differs from eager .*output\.(out|aux) at batch 1"):
        export.verify(model, swapped, (1, 3, 9, 8))
    with pytest.raises(ValueError, match="gives 1 outputs .* has 2 tensors"):
        export.verify(model, export.module_bytes(nn.Conv2d(3, 4, 1), x, exporter="torchscript"), (1, 3, 9, 8))


class _TwoInputs(nn.Module):
    def forward(self, input_ids, attention_mask):
        return input_ids * attention_mask


class _TokenIds(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x):
        return self.emb(x)


class _Counts(nn.Module):
    def forward(self, x):
        return x.relu(), {"n": int(x.shape[0])}


def test_what_fails_fails_before_the_export(tmp_path, monkeypatch):
    """Bad destinations, inputs and outputs are found by the checks and one eager forward, never after the
    (long) export: the exporters are not called and nothing is written."""
    def no_export(*args, **kwargs):
        raise AssertionError("the export ran")

    monkeypatch.setattr(torch.onnx, "export", no_export)
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        trp.export_onnx(_DictNet(), tmp_path / "file" / "m.onnx", (3, 9, 8))
    with pytest.raises(ValueError, match=r"one input tensor; _TwoInputs.forward takes \(input_ids, attention_mask\)"):
        trp.export_onnx(_TwoInputs(), tmp_path / "m.onnx", (3, 9, 8))
    with pytest.raises(ValueError, match="fails on one float32 input of shape .* token ids"):
        trp.export_onnx(_TokenIds(), tmp_path / "m.onnx", (3, 9, 8))
    with pytest.raises(ValueError, match=r"output output\.1\.n is a int; ONNX outputs are tensors"):
        trp.export_onnx(_Counts(), tmp_path / "m.onnx", (3, 9, 8))
    with pytest.raises(ValueError, match="holds no tensor"):
        export.output_leaves((None, [None]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_torchvision_segmentation_exports(exporter, tmp_path):
    """torchvision's fcn_resnet50 ({"out": ...}) decomposed, at a tiny input."""
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    dense = tv.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=3,
                                                aux_loss=False).eval()
    compact = trp.decompose(dense, "channel", rank=8, layers=[r"backbone\.layer1\..*conv2"]).eval()
    assert len(trp.factorized_layers(compact)) == 3
    info = trp.export_onnx(compact, tmp_path / "fcn.onnx", (1, 3, 32, 32), exporter=_exporter(exporter))
    assert info["outputs"] == ["output.out"] and max(info["errors"].values()) <= 1e-4
