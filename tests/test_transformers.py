"""TRP on transformers: Linear-like targets (nn.Linear, attention q/k/v rows of in_proj_weight), transformer
default selection, decomposition that keeps the host modules working, MACs, save/load."""
import re

import pytest
import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import trp
from trp.core.targets import attention_targets


def energy_rule(M, energy):
    """Reference: float64 SVD, smallest k keeping `energy` of sum s^2, truncated matrix, U_k V_k^T."""
    U, S, Vh = torch.linalg.svd(M.detach().to(torch.float64), full_matrices=False)
    s2 = S.square()
    k = int((torch.cumsum(s2, 0) < energy * s2.sum()).sum()) + 1
    return k, (U[:, :k] * S[:k]) @ Vh[:k], U[:, :k] @ Vh[:k]


class TinyViT(nn.Module):
    """Embedding, two encoder layers, a head: the default selection takes the blocks' matrices only."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.embed = nn.Linear(12, d)
        layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.gate = nn.Linear(d, 4)  # tiny and outside the blocks
        self.head = nn.Linear(d, 5)

    def forward(self, x):
        return self.head(self.encoder(self.embed(x)).mean(1))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_in_proj_weight_is_projected_per_q_k_v_with_the_energy_rule_rank():
    torch.manual_seed(0)
    model = TinyViT()
    mha = model.encoder.layers[0].self_attn
    E = mha.embed_dim
    with torch.no_grad():  # q, k, v of clearly different ranks: a joint projection could not give these
        for i, r in enumerate((3, 9, 20)):
            mha.in_proj_weight[i * E:(i + 1) * E] = torch.randn(E, r) @ torch.randn(r, E) / r
            mha.in_proj_weight[i * E:(i + 1) * E] += 1e-3 * torch.randn(E, E)
    before = mha.in_proj_weight.detach().clone()
    energy = 0.95
    pruner = trp.RankPruner(model, energy=energy, nuclear=0.5)
    pruner.step()
    after = mha.in_proj_weight.detach()
    name = "encoder.layers.0.self_attn"
    for i, p in enumerate("qkv"):
        k, low, uv = energy_rule(before[i * E:(i + 1) * E], energy)
        assert pruner.ranks[f"{name}.{p}_proj"] == k
        torch.testing.assert_close(after[i * E:(i + 1) * E].double(), low, rtol=1e-5, atol=1e-5)
    assert len({pruner.ranks[f"{name}.{p}_proj"] for p in "qkv"}) == 3
    # the subgradient lands in each block of in_proj_weight.grad
    model.zero_grad(set_to_none=True)
    pruner.regularize()
    for i in range(3):
        _, _, uv = energy_rule(before[i * E:(i + 1) * E], energy)
        torch.testing.assert_close(mha.in_proj_weight.grad[i * E:(i + 1) * E].double(), 0.5 * uv,
                                   rtol=1e-4, atol=1e-5)
    # the rest of the model is untouched by the pruner's writes
    assert model.embed.weight.grad is None and model.head.weight.grad is None


def test_default_selection_of_a_transformer_skips_embedding_head_and_tiny_layers():
    model = TinyViT()
    names = trp.RankPruner(model, nuclear=0).layer_names
    expected = [f"encoder.layers.{i}.{n}" for i in range(2)
                for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                          "linear1", "linear2")]
    assert names == expected
    # selection by type, name and regex; nn.Linear covers the q/k/v projections
    assert [n for n, _ in trp.select_layers(model, layers=[nn.MultiheadAttention])] == \
        [n for n in expected if re.search(r"[qkv]_proj$", n)]
    assert len(trp.select_layers(model, layers=[nn.Linear])) == len(expected) + 3
    assert [n for n, _ in trp.select_layers(model, layers=[r".*\.v_proj"])] == \
        ["encoder.layers.0.self_attn.v_proj", "encoder.layers.1.self_attn.v_proj"]
    assert [n for n, _ in trp.select_layers(model, layers=["head", "encoder.layers.1.self_attn.k_proj"])] == \
        ["encoder.layers.1.self_attn.k_proj", "head"]
    with pytest.raises(ValueError, match="channel"):
        trp.select_layers(model, "spatial", layers=[r".*q_proj"])
    # a CNN's default is unchanged: no Linear
    assert all(isinstance(m, nn.Conv2d) for _, m in trp.select_layers(trp.models.build("resnet20")))


def test_pruner_state_names_q_k_v_targets_and_round_trips():
    torch.manual_seed(1)
    model = TinyViT()
    pruner = trp.RankPruner(model, energy=0.8, nuclear=1e-3, nuclear_every="step")
    pruner.step()
    state = pruner.state_dict()
    assert "encoder.layers.1.self_attn.v_proj" in state["ranks"]
    assert state["subgradients"]["encoder.layers.1.self_attn.v_proj"].shape == (32, 32)
    other = trp.RankPruner(model, energy=0.8, nuclear=1e-3, nuclear_every="step")
    other.load_state_dict(state)
    assert other.ranks == pruner.ranks
    model.zero_grad(set_to_none=True)
    other.regularize()
    g1 = model.encoder.layers[1].self_attn.in_proj_weight.grad.clone()
    model.zero_grad(set_to_none=True)
    pruner.regularize()
    assert torch.equal(g1, model.encoder.layers[1].self_attn.in_proj_weight.grad)


def test_separate_q_k_v_weights_are_targets_too():
    mha = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    targets = attention_targets("a", mha)
    assert [t.name for t in targets] == ["a.q_proj", "a.k_proj", "a.v_proj"]
    assert [t.shape for t in targets] == [(16, 16), (16, 8), (16, 12)]
    assert torch.equal(targets[2].bias(), mha.in_proj_bias.detach()[32:])


def _prune_and_decompose(model, energy=0.7, **kw):
    """One projection (weights now have the pruner's ranks), then decomposition at exactly those ranks."""
    pruner = trp.RankPruner(model, energy=energy, nuclear=0, **kw)
    pruner.step()
    compact = trp.decompose(model, "channel", rank=pruner.ranks, **kw)
    assert {n: m.rank for n, m in trp.factorized_layers(compact).items()} == pruner.ranks
    return pruner, compact


def _assert_close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.detach().abs().max()))


def test_transformer_encoder_decomposed_equals_dense_in_train_and_eval_fast_path(tmp_path):
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    dense = nn.TransformerEncoder(layer, 2)  # nested-tensor and fused-layer fast paths on
    assert dense.use_nested_tensor and torch.backends.mha.get_fastpath_enabled()
    _, compact = _prune_and_decompose(dense)
    x = torch.randn(3, 7, 32)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[1, 5:] = True
    dense.train(), compact.train()
    _assert_close(compact(x), dense(x))
    compact(x).sum().backward()  # trains: every factor gets a gradient
    assert all(p.grad is not None for p in compact.parameters())
    dense.eval(), compact.eval()
    with torch.no_grad():  # the dense model runs torch's fused kernels here
        _assert_close(compact(x), dense(x))
        _assert_close(compact(x, src_key_padding_mask=pad)[~pad], dense(x, src_key_padding_mask=pad)[~pad])
        mask = nn.Transformer.generate_square_subsequent_mask(7)
        _assert_close(compact(x, mask=mask, is_causal=True), dense(x, mask=mask, is_causal=True))
    # MACs of tokens x [N, L, E]: the projections (dense E*E each, or rank*(in+out)), the MLP, and
    # Q K^T + A V (2 N L^2 E) per layer
    N, L, E = x.shape
    ranks = {n: m.rank for n, m in trp.factorized_layers(compact).items()}
    sizes = {"self_attn.q_proj": (E, E), "self_attn.k_proj": (E, E), "self_attn.v_proj": (E, E),
             "self_attn.out_proj": (E, E), "linear1": (E, 64), "linear2": (64, E)}
    attention = 2 * N * L * L * E
    assert trp.count_macs(dense, x, linear=True, attention=True) == 2 * (
        attention + sum(N * L * i * o for i, o in sizes.values()))
    assert trp.count_macs(compact, x, linear=True, attention=True) == sum(
        attention + sum(N * L * ranks[f"layers.{j}.{n}"] * (i + o) for n, (i, o) in sizes.items()) for j in range(2))
    assert trp.count_macs(dense, x) == 0  # the default counts convs only, as the paper
    trp.save(compact, tmp_path / "enc.pt")
    loaded = trp.load(tmp_path / "enc.pt", base=dense)
    with torch.no_grad():
        _assert_close(loaded(x), dense(x))


def _check_decomposed_model(dense, x, input_size, tmp_path, energy=0.7):
    """Pruned to the energy rule's ranks, decomposed at them: same outputs, MACs counted (and equal to
    torch's flop counter on the decomposed model), trp.save / trp.load round trip."""
    dense.eval()
    pruner, compact = _prune_and_decompose(dense, energy)
    assert len(trp.factorized_layers(compact)) == len(pruner.layer_names) > 0
    with torch.no_grad():
        y = dense(x)
        _assert_close(compact(x), y)
    macs_dense = trp.count_macs(dense, input_size, linear=True, attention=True)
    macs_compact = trp.count_macs(compact, input_size, linear=True, attention=True)
    assert 0 < macs_compact < macs_dense
    with sdpa_kernel(SDPBackend.MATH):  # torch's counter skips the fused CPU attention kernels
        assert macs_compact == trp.count_flops(compact, input_size) // 2  # every matmul counted, no other
    rep = trp.report(dense, compact, input_size, latency=False)
    assert rep.totals["speedup"] == pytest.approx(macs_dense / macs_compact)
    assert {r["layer"]: r["rank"] for r in rep.rows if r["rank"] is not None} == pruner.ranks
    trp.save(compact, tmp_path / "model.pt")
    loaded = trp.load(tmp_path / "model.pt", base=dense)
    with torch.no_grad():
        _assert_close(loaded(x), y)
    return pruner, compact


def test_torchvision_vision_transformer(tmp_path):
    from torchvision.models.vision_transformer import VisionTransformer

    # vit_b_16's class and blocks (nn.MultiheadAttention, MLPBlock) at a CPU-test size
    torch.manual_seed(3)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
                              num_classes=10)
    pruner, compact = _check_decomposed_model(model, torch.randn(2, 3, 32, 32), (3, 32, 32), tmp_path)
    assert "encoder.layers.encoder_layer_0.self_attention.k_proj" in pruner.ranks
    assert "heads.head" not in pruner.ranks  # the classifier head is not a default target
    assert isinstance(compact.encoder.layers[0].self_attention, trp.SplitMultiheadAttention)


def test_torchvision_swin(tmp_path):
    from torchvision.models.swin_transformer import SwinTransformer

    # swin_t's class and blocks (ShiftedWindowAttention reads qkv.weight / proj.weight) at a CPU-test size;
    # a 24x24 input pads to whole windows and shifts them
    torch.manual_seed(4)
    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4],
                            num_classes=10)
    pruner, _ = _check_decomposed_model(model, torch.randn(2, 3, 24, 24), (3, 24, 24), tmp_path)
    assert {"features.1.1.attn.qkv", "features.1.1.attn.proj", "features.3.0.mlp.3"} <= set(pruner.ranks)
    assert not any("reduction" in n or n == "head" for n in pruner.ranks)  # patch merging, head


def test_vit_tiny_trains_with_trp_and_round_trips_without_base(tmp_path):
    torch.manual_seed(5)
    model = trp.models.build("vit_tiny", num_classes=10, in_channels=1)
    x, y = torch.randn(8, 1, 16, 16), torch.randint(0, 10, (8,))
    pruner = trp.RankPruner(model, energy=0.8, nuclear=1e-3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(2):
        pruner.step()
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        pruner.regularize()
        opt.step()
    pruner.project()
    compact = trp.decompose(model, "channel", rank=pruner.ranks)
    model.eval(), compact.eval()
    with torch.no_grad():
        _assert_close(compact(x), model(x))
        x24 = torch.randn(2, 1, 24, 24)  # another input size: resized position embeddings
        _assert_close(compact(x24), model(x24))
    trp.save(compact, tmp_path / "vit.pt")
    loaded = trp.load(tmp_path / "vit.pt")  # rebuilt from its architecture record
    with torch.no_grad():
        _assert_close(loaded(x), model(x))


def test_attention_that_cannot_be_split_keeps_its_projections_dense_with_one_warning():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(32, 4, add_bias_kv=True, batch_first=True)
            self.mlp = nn.Linear(32, 32)

        def forward(self, x):
            return self.mlp(self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(6)
    model = Block().eval()
    assert trp.RankPruner(model, nuclear=0).layer_names == ["mlp"]  # default: what can be factorized
    pruner = trp.RankPruner(model, energy=0.6, nuclear=0, layers=[nn.Linear])
    pruner.step()
    with pytest.warns(UserWarning, match="add_bias_kv") as record:
        compact = trp.decompose(model, "channel", rank=pruner.ranks, layers=[nn.Linear])
    assert len(record) == 1
    assert isinstance(compact.attn, nn.MultiheadAttention)  # untouched host
    assert set(trp.factorized_layers(compact)) == {"mlp"}
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        _assert_close(compact(x), model(x))
    with pytest.raises(ValueError, match="add_bias_kv"):
        trp.SplitMultiheadAttention.from_mha(model.attn)


def test_trp_train_vit_end_to_end(tmp_path, capsys):
    from cli_helpers import TINY, run_cli

    out = tmp_path / "run"
    code, text, err = run_cli(capsys, "train", "--model", "vit_tiny", "--epochs", "1", "--out", out,
                              *[a if a != "8" else "16" for a in TINY])
    assert code == 0, err
    assert "on 24 layers" in text and "conv + linear + attention MACs" in text
    loaded = trp.load(out / "decomposed.pt")
    assert isinstance(loaded.encoder.layers[0].self_attn, trp.SplitMultiheadAttention)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 24])
def test_split_attention_equals_multihead_attention(batch_first, kdim):
    torch.manual_seed(7)
    mha = nn.MultiheadAttention(32, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    split = trp.SplitMultiheadAttention.from_mha(mha)
    q, k = torch.randn(3, 5, 32), torch.randn(3, 7, kdim or 32)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    pad = torch.rand(3, 7) < 0.3
    pad[:, 0] = False
    mask = torch.rand(5, 7) < 0.2
    mask[:, 0] = False
    cases = [{}, dict(need_weights=False), dict(key_padding_mask=pad), dict(attn_mask=mask, need_weights=False),
             dict(attn_mask=mask, key_padding_mask=pad, average_attn_weights=False),
             dict(attn_mask=mask.float() * -3.0)]
    with torch.no_grad():
        for kw in cases:
            (a, wa), (b, wb) = mha(q, k, k, **kw), split(q, k, k, **kw)
            _assert_close(b, a)
            assert (wa is None) == (wb is None)
            if wa is not None:
                _assert_close(wb, wa)
        one = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])  # unbatched (L, E)
        (a, wa), (b, wb) = mha(one(q), one(k), one(k)), split(one(q), one(k), one(k))
        _assert_close(b, a)
        _assert_close(wb, wa)


def test_factorized_linear_weight_stand_in():
    torch.manual_seed(8)
    layer = trp.FactorizedLinear.from_linear(nn.Linear(12, 10), rank=4)
    x = torch.randn(3, 12)
    w = layer.weight
    assert w.shape == (10, 12) and w.dtype == torch.float32
    _assert_close(nn.functional.linear(x, w, layer.bias), layer(x))  # through the factors, host's bias
    _assert_close(nn.functional.linear(x, w), layer(x) - layer.bias)
    torch.testing.assert_close(torch.add(w, 0), layer.dense_weight())  # anything else: the dense product
