"""trp.decompose(calibration=): activation-aware factors (trp.deploy.calibration) are exact at full rank, beat
the plain SVD on the output error where the inputs make it matter, refuse bad input, and leave the model as
it was."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import trp
from trp.core import rank as rank_rules
from trp.deploy import calibration as calib
from trp.nn.modules import ChannelFactorizedConv2d, FactorizedLinear, conv_padding4

METHODS = ["whiten", "scale"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def low_rank(shape, r, g):
    """A float64 matrix (or a batch of them) of rank r."""
    *lead, p, q = shape
    return torch.randn(*lead, p, r, generator=g, dtype=torch.float64) @ torch.randn(*lead, r, q, generator=g,
                                                                                    dtype=torch.float64)


def set_low_rank_(module, r, g):
    """Sets a Linear's / Conv1D's / conv's weight (each group's channel-scheme matrix) to rank r, in place."""
    with torch.no_grad():
        if isinstance(module, nn.Conv2d):
            w = module.weight
            n, groups = w.shape[0], module.groups
            w.copy_(low_rank((groups, n // groups, w[0].numel()), r, g).reshape(w.shape))
        elif isinstance(module, nn.Linear):
            module.weight.copy_(low_rank(module.weight.shape, r, g))
        else:  # transformers' Conv1D: [in, out]
            module.weight.copy_(low_rank(module.weight.shape[::-1], r, g).T)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def outputs(model, x):
    with torch.no_grad():
        return model(x)


# --- the statistics are those of the layer's inputs ---------------------------------------------------------

CONVS = [dict(in_channels=4, out_channels=12, kernel_size=3, stride=2, padding=(1, 2), dilation=2),
         dict(in_channels=4, out_channels=8, kernel_size=(4, 2), padding="same", bias=False),
         dict(in_channels=6, out_channels=9, kernel_size=3, stride=(2, 1), padding=1, groups=3)]


def _targets(model, layers):
    return trp.select_targets(model, "channel", layers, warn=False)


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_second_moment_matches_the_conv_outputs(cfg):
    """W E[x x^T] W^T equals the second moment of the conv's output channels (bias removed), per group: the
    im2col columns are those the conv computes with (padding, stride, dilation, groups)."""
    g = gen(13)
    conv = nn.Conv2d(**cfg).double()
    model = nn.Sequential(conv)
    data = [torch.randn(2, cfg["in_channels"], 9, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    G = calib.collect_statistics(model, _targets(model, [nn.Conv2d]), data, "whiten")["0"]
    with torch.no_grad():
        y = torch.cat([F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
                       for x in data])
    groups = conv.groups
    y = y.transpose(0, 1).reshape(groups, conv.out_channels // groups, -1)  # [g, n/g, samples * pixels]
    want = y @ y.transpose(1, 2) / y.shape[-1]
    W = conv.weight.detach().reshape(groups, conv.out_channels // groups, -1)
    assert G.shape == (groups, W.shape[-1], W.shape[-1])
    assert torch.allclose(W @ G @ W.transpose(1, 2), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONVS)
def test_conv_mean_magnitude_matches_naive_patches(cfg):
    g = gen(14)
    conv = nn.Conv2d(**cfg).double()
    model = nn.Sequential(conv)
    x = torch.randn(2, cfg["in_channels"], 9, 8, generator=g, dtype=torch.float64)
    got = calib.collect_statistics(model, _targets(model, [nn.Conv2d]), [x], "scale")["0"]
    top, bottom, left, right = conv_padding4(conv)
    xp = F.pad(x, (left, right, top, bottom))
    (kh, kw), (sh, sw), (dh, dw) = conv.kernel_size, conv.stride, conv.dilation
    patches = [xp[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw].reshape(2, -1)
               for i in range((xp.shape[2] - dh * (kh - 1) - 1) // sh + 1)
               for j in range((xp.shape[3] - dw * (kw - 1) - 1) // sw + 1)]
    want = torch.cat(patches).abs().mean(0).reshape(conv.groups, -1)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_linear_statistics_over_all_leading_dimensions():
    g = gen(15)
    model = nn.Sequential(nn.Linear(6, 5)).double()
    data = [torch.randn(2, 3, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g,
                                                                                 dtype=torch.float64)]
    x = torch.cat([data[0].reshape(-1, 6), data[1]])
    G = calib.collect_statistics(model, _targets(model, [nn.Linear]), data, "whiten")["0"]
    m = calib.collect_statistics(model, _targets(model, [nn.Linear]), data, "scale")["0"]
    assert torch.allclose(G[0], x.T @ x / 10) and torch.allclose(m[0], x.abs().mean(0))


# --- exact at full rank ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("groups,samples", [(1, 200), (1, 5), (3, 40)])  # 5 < 12 features: the ridge
def test_factors_are_exact_at_full_rank(method, groups, samples):
    g = gen(1)
    M = torch.randn(groups, 10, 12, generator=g, dtype=torch.float64)
    x = torch.randn(samples, groups, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g,
                                                                                       dtype=torch.float64)
    x = x * torch.logspace(0, -3, 12, dtype=torch.float64)
    per_group = x.transpose(0, 1)
    stats = (per_group.transpose(1, 2) @ per_group / samples if method == "whiten"
             else per_group.abs().mean(1))
    S = calib.input_scaling(stats, method)
    A, B, r, sigma = calib.calibrated_factors(M if groups > 1 else M[0], S, "rank", 12)
    assert r == 10 and sigma.shape[-1] == 10
    assert rel_err(A @ B, M if groups > 1 else M[0]) < 1e-9
    assert A.shape[-2:] == (10, 10) and B.shape[-2:] == (10, 12)
    assert torch.allclose(A.norm(dim=-2), B.norm(dim=-1))  # balanced components


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("samples", [64, 3])  # 3 tokens < 16 features: the ridge path
def test_linear_exact_on_low_rank_weights(method, samples):
    g = gen(2)
    model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 20)).double().eval()
    for m in (model[0], model[2]):
        set_low_rank_(m, 3, g)
    data = [torch.randn(samples, 16, generator=g, dtype=torch.float64)]
    compact = trp.decompose(model, "channel", rank=3, layers=[nn.Linear], calibration=data,
                            calibration_method=method)
    assert isinstance(compact[0], FactorizedLinear) and isinstance(compact[2], FactorizedLinear)
    assert compact[0].rank == 3 and compact[2].rank == 3
    x = torch.randn(50, 16, generator=g, dtype=torch.float64)
    assert rel_err(outputs(compact, x), outputs(model, x)) < 1e-9


@pytest.mark.parametrize("method", METHODS)
def test_conv_exact_on_low_rank_weights(method):
    g = gen(3)
    model = nn.Sequential(
        nn.Conv2d(4, 12, 3, stride=2, padding=(1, 2), dilation=2, bias=True), nn.ReLU(),
        nn.Conv2d(12, 12, 4, padding="same", bias=False), nn.ReLU(),  # asymmetric padding
        nn.Conv2d(12, 9, 3, padding=1, groups=3)).double().eval()
    for m in model:
        if isinstance(m, nn.Conv2d):
            set_low_rank_(m, 2, g)
    data = [torch.randn(3, 4, 13, 11, generator=g, dtype=torch.float64) for _ in range(2)]
    compact = trp.decompose(model, "channel", rank=2, layers=[nn.Conv2d], calibration=data,
                            calibration_method=method)
    assert all(isinstance(compact[i], ChannelFactorizedConv2d) for i in (0, 2, 4)), compact
    x = torch.randn(2, 4, 13, 11, generator=g, dtype=torch.float64)
    assert rel_err(outputs(compact, x), outputs(model, x)) < 1e-9
    assert rel_err(outputs(compact, x[0]), outputs(model, x[0])) < 1e-9  # unbatched input, too


@pytest.mark.parametrize("method", METHODS)
def test_float32_model_close_at_full_rank(method):
    g = gen(4)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 16)).eval()
    for m in (model[0], model[2]):
        set_low_rank_(m, 4, g)
    data = [torch.randn(32, 16, generator=g)]
    compact = trp.decompose(model, "channel", rank=4, layers=[nn.Linear], calibration=data,
                            calibration_method=method)
    assert compact[0].first.weight.dtype == torch.float32
    x = torch.randn(8, 16, generator=g)
    assert rel_err(outputs(compact, x), outputs(model, x)) < 1e-4


@pytest.mark.parametrize("method", METHODS)
def test_hf_gpt2_conv1d_exact_on_low_rank_weights(method):
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D
    torch.manual_seed(0)
    model = transformers.GPT2Model(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0))
    model = model.double().eval()
    g = gen(5)
    layers = [m for m in model.modules() if isinstance(m, Conv1D)]
    for m in layers:
        set_low_rank_(m, 2, g)
    ids = [{"input_ids": torch.randint(0, 50, (2, 9), generator=g)} for _ in range(2)]
    compact = trp.decompose(model, "channel", rank=2, layers=[Conv1D], calibration=ids, calibration_method=method)
    assert sum(isinstance(m, FactorizedLinear) for m in compact.modules()) == len(layers) == 4
    x = torch.randint(0, 50, (2, 9), generator=g)
    with torch.no_grad():
        assert rel_err(compact(input_ids=x).last_hidden_state, model(input_ids=x).last_hidden_state) < 1e-9


def test_attention_projections_calibrated_through_converted_hosts():
    """nn.MultiheadAttention reads out_proj.weight and the packed q/k/v rows instead of calling modules:
    their inputs are recorded in a converted copy, and the model keeps its own attention."""
    g = gen(6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)).double().eval()
    layer = model[0]
    with torch.no_grad():
        layer.self_attn.in_proj_weight.copy_(low_rank((3, 16, 16), 3, g).reshape(48, 16))
    for m in (layer.self_attn.out_proj, layer.linear1, layer.linear2):
        set_low_rank_(m, 3, g)
    data = [torch.randn(2, 5, 16, generator=g, dtype=torch.float64)]
    compact = trp.decompose(model, "channel", rank=3, calibration=data)
    assert isinstance(model[0].self_attn, nn.MultiheadAttention)
    assert sum(isinstance(m, FactorizedLinear) for m in compact.modules()) == 6
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    assert rel_err(outputs(compact, x), outputs(model, x)) < 1e-8


# --- better than the plain SVD where the inputs matter ------------------------------------------------------

def _held_out_errors(model, sample, rank, method):
    calibration = [sample(256) for _ in range(4)]
    x = sample(4000)
    plain = trp.decompose(model, "channel", rank=rank, layers=[nn.Linear])
    calibrated = trp.decompose(model, "channel", rank=rank, layers=[nn.Linear], calibration=calibration,
                               calibration_method=method)
    ref = outputs(model, x)
    return rel_err(outputs(calibrated, x), ref), rel_err(outputs(plain, x), ref)


def test_whitening_beats_plain_svd_on_correlated_inputs():
    g = gen(7)
    torch.manual_seed(0)
    mix = torch.randn(32, 32, generator=g) * torch.logspace(0, -2, 32)[:, None]  # strongly anisotropic

    def sample(n):
        return torch.randn(n, 32, generator=g) @ mix

    model = nn.Sequential(nn.Linear(32, 32)).eval()
    whitened, plain = _held_out_errors(model, sample, 6, "whiten")
    assert whitened < 0.7 * plain, (whitened, plain)


def test_scaling_not_worse_than_plain_svd_with_a_few_large_channels():
    g = gen(8)
    torch.manual_seed(0)
    scale = torch.ones(32)
    scale[[3, 11, 20]] = 30.0  # a few input features of large magnitude (outlier channels)

    def sample(n):
        return torch.randn(n, 32, generator=g) * scale

    model = nn.Sequential(nn.Linear(32, 32)).eval()
    scaled, plain = _held_out_errors(model, sample, 6, "scale")
    assert scaled < 0.5 * plain, (scaled, plain)
    whitened, _ = _held_out_errors(model, sample, 6, "whiten")  # the optimum for the mean squared error
    assert whitened <= 1.02 * scaled, (whitened, scaled)


# --- the criteria read W S -------------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_energy_and_threshold_read_the_scaled_singular_values(method):
    g = gen(9)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24)).eval()
    data = [torch.randn(100, 24, generator=g) * torch.logspace(0, -2, 24)]
    S = calib.calibrate(model, "channel", _targets(model, [nn.Linear]), data,
                        method)["0"]
    sigma = calib.scaled_spectrum(model[0], S)
    plain_rank = int(rank_rules.energy_rank(torch.linalg.svdvals(model[0].weight.double()), 0.9))
    want = int(rank_rules.energy_rank(sigma, 0.9))
    assert want != plain_rank  # the test tells the two spectra apart
    compact = trp.decompose(model, "channel", energy=0.9, layers=[nn.Linear], calibration=data,
                            calibration_method=method)
    assert compact[0].rank == want
    cut = float(sigma[3] + sigma[4]) / 2
    compact = trp.decompose(model, "channel", threshold=cut, layers=[nn.Linear], calibration=data,
                            calibration_method=method)
    assert compact[0].rank == 4


def test_target_speedup_with_calibration():
    g = gen(10)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1)).eval()
    data = [torch.randn(2, 3, 12, 12, generator=g)]
    compact = trp.decompose(model, "channel", target_speedup=2.0, input_size=(3, 12, 12), calibration=data)
    assert compact.trp_budget["speedup"] >= 2.0
    assert any(isinstance(m, ChannelFactorizedConv2d) for m in compact.modules())


# --- bad input, and the model is left as it was -------------------------------------------------------------

class Branchy(nn.Module):
    """Runs `head` only when asked: calibration inputs without the flag never reach it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, use_head=False):
        x = self.drop(self.body(x))
        return self.head(x) if use_head else x


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before, modes):
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == modes
    for m in model.modules():
        assert not m._forward_pre_hooks and not m._forward_hooks


def _mixed_mode_model():
    model = Branchy().train()
    model.head.eval()  # a mixed training state, restored as it was
    return model


@pytest.mark.parametrize("inputs,message", [
    ([], "no inputs"),
    (iter(()), "no inputs"),
    (torch.randn(4, 8), "wrap it in a list"),
    (3, "iterable of model inputs"),
    ([torch.randn(4, 8)], r"never reached these selected layers: \['head'\]"),
    ([(torch.full((4, 8), float("nan")), True)], "NaN or infinite statistics"),
    ([(torch.zeros(4, 8), True)], "only zero inputs"),
    ([{"x": torch.randn(4, 8), "use_head": 1, "bad": 0}], "unexpected keyword"),
])
def test_bad_calibration_inputs_are_refused_and_the_model_is_untouched(inputs, message):
    model = _mixed_mode_model()
    before, modes = _state(model), [m.training for m in model.modules()]
    with pytest.raises((ValueError, TypeError), match=message):
        trp.decompose(model, "channel", rank=2, layers=["body", "head"], calibration=inputs)
    _assert_untouched(model, before, modes)


def test_inputs_as_tuples_and_dicts_and_the_model_untouched():
    model = _mixed_mode_model()
    before, modes = _state(model), [m.training for m in model.modules()]
    g = gen(11)
    data = [(torch.randn(4, 8, generator=g), True), {"x": torch.randn(4, 8, generator=g), "use_head": True}]
    compact = trp.decompose(model, "channel", rank=2, layers=["body", "head"], calibration=data)
    assert isinstance(compact.body, FactorizedLinear) and isinstance(compact.head, FactorizedLinear)
    _assert_untouched(model, before, modes)
    # the statistics come from the eval-mode model: dropout off (else body's inputs would look the same but
    # head's would be scaled by 2 and half zero)
    S_eval = calib.calibrate(model.eval(), "channel", _targets(model, ["head"]),
                             data)["head"]
    model.train()
    S_train_flag = calib.calibrate(model, "channel", _targets(model, ["head"]),
                                   data)["head"]
    assert torch.equal(S_eval, S_train_flag) and model.training


@pytest.mark.parametrize("kwargs,message", [
    ({"scheme": "spatial"}, "channel scheme only"),
    ({"scheme": "nd"}, "channel scheme only"),
    ({"calibration_method": "svd"}, "calibration_method must be one of whiten, scale"),
    ({"calibration_method": "scale", "calibration_alpha": 0}, "calibration_alpha must be a finite number > 0"),
    ({"calibration": None, "calibration_method": "scale"}, "apply only with calibration="),
    ({"calibration": None, "calibration_alpha": 0.3}, "apply only with calibration="),
])
def test_bad_calibration_options(kwargs, message):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Linear(8, 8))
    kwargs = {"scheme": "channel", "calibration": [torch.randn(1, 3, 8, 8)], **kwargs}
    with pytest.raises(ValueError, match=message):
        trp.decompose(model, kwargs.pop("scheme"), rank=2, **kwargs)


def test_forward_error_leaves_the_model_untouched():
    model = _mixed_mode_model()
    before, modes = _state(model), [m.training for m in model.modules()]
    with pytest.raises(RuntimeError):  # shapes do not match: the model's own error, hooks removed
        trp.decompose(model, "channel", rank=2, layers=["body"], calibration=[torch.randn(4, 8), torch.randn(4, 5)])
    _assert_untouched(model, before, modes)


def test_without_calibration_nothing_changes():
    g = gen(12)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12), nn.Linear(12, 12)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = trp.decompose(model, "channel", rank=3, layers=[nn.Linear])
        b = trp.decompose(model, "channel", rank=3, layers=[nn.Linear], calibration=None)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    reference = FactorizedLinear.from_linear(model[0], rank=3)
    assert torch.equal(a[0].first.weight, reference.first.weight)
    x = torch.randn(3, 12, generator=g)
    assert torch.equal(outputs(a, x), outputs(b, x))
