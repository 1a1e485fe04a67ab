"""TRP on architectures nobody here wrote: torchvision, timm and Hugging Face transformers models with random
weights, small inputs and tiny configurations (nothing is downloaded).

For each model: the default selection finds layers wherever the model has eligible ones (and says why it
skips the others); one projection by RankPruner, then trp.decompose at the pruner's ranks, reproduces the
projected model in eval mode; trp.save / trp.load(base=) round-trips the decomposed model. Matrices with
both sides above CAP are excluded from the projection: their float64 SVDs in decompose would be most of this
file's time on a 2-core CPU, and the smaller layers of the same kinds exercise the same code."""
import re
import warnings

import pytest
import torch

import trp

tv = pytest.importorskip("torchvision")

CAP = 200


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _first(output):
    """The main tensor of a model's output: a tensor, torchvision's {"out": ...} or a transformers
    ModelOutput (logits, else last_hidden_state)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) and "out" in output:
        return output["out"]
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if value is not None:
            return value
    raise TypeError(f"no main tensor in {type(output).__name__}")


def check(model, x, tmp_path, scheme="channel", expect=(), prune=None, roundtrip=True):
    """The checks of the module doc on `model` with input `x`; `expect`: layer names the default must
    select; `prune`: the default's layers to project (a regex; default: those with a side <= CAP);
    roundtrip: whether to check trp.save / trp.load too. Returns the Selection."""
    torch.manual_seed(0)
    model = model.eval()
    selection = _quiet(trp.plan_layers, model, scheme)
    assert selection.targets, selection.summary()
    assert set(expect) <= set(selection.names), (set(expect) - set(selection.names))
    if prune is None:
        heavy = [t.name for t in selection.targets if min(t.matrix(scheme).shape[-2:]) > CAP]
    else:
        heavy = [n for n in selection.names if not re.fullmatch(prune, n)]
    assert len(heavy) < len(selection.targets)
    pruner = _quiet(trp.RankPruner, model, scheme, energy=0.5, nuclear=0, exclude=heavy or None)
    pruner.step()
    with torch.no_grad():
        y = _first(model(x))
        compact = _quiet(trp.decompose, model, scheme, rank=pruner.ranks).eval()
        z = _first(compact(x))
    assert trp.factorized_layers(compact), compact.trp_skipped
    assert rel(z, y) <= 1e-4
    if not roundtrip:
        return selection
    trp.save(compact, tmp_path / "compact.pt")
    loaded = trp.load(tmp_path / "compact.pt", base=model).eval()
    with torch.no_grad():
        torch.testing.assert_close(_first(loaded(x)), z, rtol=1e-6, atol=1e-6)
    return selection


def image(size=32, batch=1):
    return torch.randn(batch, 3, size, size)


# --- torchvision -------------------------------------------------------------------------------------------

def _tv(name, **kwargs):
    torch.manual_seed(0)
    return tv.models.get_model(name, weights=None, **kwargs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                                  "regnet_y_400mf", "shufflenet_v2_x0_5"])
def test_torchvision_cnns(name, tmp_path):
    selection = check(_tv(name, num_classes=10), image(), tmp_path)
    if name == "regnet_y_400mf":  # group width 8: grouped convs, each group its own matrix
        assert any(t.groups > 1 for t in selection.targets)
    elif name != "resnet18":  # the mobile networks: depthwise convs stay dense, pointwise ones are selected
        assert any("depthwise" in why for why in selection.skipped.values())
        assert any(t.shape[-2:] == (1, 1) for t in selection.targets)


def test_torchvision_resnext_grouped_convs(tmp_path):
    # 32 groups of 4 (then 8, 16, 32) channels: every group its own matrix
    model = _tv("resnext50_32x4d", num_classes=10)
    selection = check(model, image(), tmp_path, expect=["layer1.0.conv2", "layer2.0.conv2"])
    grouped = [t for t in selection.targets if t.groups == 32]
    assert grouped and all(tuple(t.matrix("channel").shape[:1]) == (32,) for t in grouped)


def test_torchvision_convnext_tiny(tmp_path):
    selection = check(_tv("convnext_tiny", num_classes=10), image(), tmp_path,
                      expect=["features.1.0.block.3", "features.1.0.block.5"])  # the MLP Linear layers
    assert "depthwise" in selection.skipped["features.1.0.block.0"]


def test_torchvision_vit_b_16(tmp_path):
    model = _tv("vit_b_16", image_size=32, num_classes=10)
    torch.nn.init.normal_(model.heads.head.weight)  # torchvision starts it at zero: a zero output
    # hidden size 768 everywhere: the projection check runs on two matrices of the packed in_proj_weight
    selection = check(model, image(), tmp_path,
                      expect=["encoder.layers.encoder_layer_0.self_attention.q_proj",
                              "encoder.layers.encoder_layer_0.mlp.0"],
                      prune=r"encoder\.layers\.encoder_layer_0\.self_attention\.[qv]_proj",
                      roundtrip=False)  # 86M parameters: a 344 MB file; the other models check it
    assert "stem" in selection.skipped["conv_proj"] and "head" in selection.skipped["heads.head"]


def test_torchvision_swin_t(tmp_path):
    selection = check(_tv("swin_t", num_classes=10), image(), tmp_path,
                      expect=["features.1.0.attn.qkv", "features.1.0.mlp.0"])
    assert "outside the repeated blocks" in selection.skipped["features.2.reduction"]


def test_torchvision_fcn_resnet50(tmp_path):
    selection = check(_tv("fcn_resnet50", num_classes=5, weights_backbone=None), image(), tmp_path)
    assert "classifier head" in selection.skipped["classifier.4"]


# --- timm --------------------------------------------------------------------------------------------------

def _timm(name, **kwargs):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **kwargs)


@pytest.mark.parametrize("name", ["resnet26d", "tf_efficientnet_b0", "convnext_atto"])
def test_timm_cnns(name, tmp_path):
    check(_timm(name), image(), tmp_path)


def test_timm_vit_tiny(tmp_path):
    check(_timm("vit_tiny_patch16_224", img_size=32, depth=2), image(), tmp_path,
          expect=["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"])


def test_timm_std_conv_model_is_never_silently_wrong():
    """resnetv2 (BiT): every conv is a StdConv2d (weight standardization in its forward): TRP cannot
    reproduce them, so nothing is selected, one warning names them, and the pruner says why."""
    model = _timm("resnetv2_50x1_bit").eval()
    with pytest.warns(UserWarning, match="StdConv2d overrides forward") as record:
        selection = trp.plan_layers(model)
    assert len(record) == 1 and not selection.targets
    assert "classifier head" in selection.skipped["head.fc"]
    with pytest.raises(ValueError, match="no layer selected.*StdConv2d overrides forward"):
        _quiet(trp.RankPruner, model)
    with pytest.warns(UserWarning, match="factorized no layer"):
        compact = _quiet_except_nothing(trp.decompose, model, "channel", energy=0.5)
    x = image()
    with torch.no_grad():
        assert torch.equal(compact(x), model(x))


def _quiet_except_nothing(fn, *args, **kwargs):
    """fn with the selection's warning silenced and decompose's "factorized no layer" let through."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="TRP skips layers")
        return fn(*args, **kwargs)


# --- Hugging Face transformers -----------------------------------------------------------------------------

def _hf(model_cls, config_cls, **config):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))


def tokens(batch=2, length=7, vocab=100):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def test_hf_gpt2(tmp_path):
    model = _hf("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=16,
                bos_token_id=0, eos_token_id=0)
    selection = check(model, tokens(), tmp_path, expect=[f"transformer.h.{i}.{n}" for i in range(2) for n in (
        "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")])  # transformers' Conv1D
    assert "lm_head" not in selection.names


def test_hf_bert(tmp_path):
    model = _hf("BertForSequenceClassification", "BertConfig", hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64, vocab_size=100, num_labels=3)
    selection = check(model, tokens(), tmp_path, expect=[
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.output.dense",
        "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"])
    assert "classifier" not in selection.names and "bert.pooler.dense" not in selection.names


def test_hf_llama(tmp_path):
    model = _hf("LlamaForCausalLM", "LlamaConfig", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=16)
    selection = check(model, tokens(), tmp_path, expect=[
        f"model.layers.1.{n}" for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")])
    assert "lm_head" not in selection.names


def test_hf_vit(tmp_path):
    model = _hf("ViTForImageClassification", "ViTConfig", image_size=32, patch_size=8, hidden_size=32,
                num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=10)
    names = [n for n, _ in model.named_modules()]  # transformers 5 names them vit.layers.0.attention.q_proj
    block = "vit.layers.0" if "vit.layers.0" in names else "vit.encoder.layer.0"
    linears = [n for n, m in model.named_modules() if n.startswith(block + ".") and isinstance(m, torch.nn.Linear)]
    assert len(linears) == 6  # q, k, v, out, and the MLP's two
    selection = check(model, image(batch=2), tmp_path, expect=linears)
    assert "stem" in selection.skipped["vit.embeddings.patch_embeddings.projection"]
    assert "classifier head" in selection.skipped["classifier"]
