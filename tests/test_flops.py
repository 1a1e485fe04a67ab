"""count_macs (the paper's conv MACs), count_flops (vs torch.utils.flop_counter), count_params, latency,
and the per-layer report."""
import json

import pytest
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import trp
from trp.nn.modules import ChannelFactorizedConv2d, SpatialFactorizedConv2d


def resnet20_conv_macs(shortcuts=True):
    """By hand: conv1 3->16 at 32x32; 3 stages of 6 3x3 convs (16/32/64 channels at 32/16/8 pixels), the
    first conv of stages 2 and 3 at stride 2; 1x1 projection shortcuts at the stage changes."""
    macs = 16 * 3 * 9 * 32 * 32
    macs += 6 * 16 * 16 * 9 * 32 * 32
    macs += 32 * 16 * 9 * 16 * 16 + 5 * 32 * 32 * 9 * 16 * 16
    macs += 64 * 32 * 9 * 8 * 8 + 5 * 64 * 64 * 9 * 8 * 8
    if shortcuts:
        macs += 32 * 16 * 16 * 16 + 64 * 32 * 8 * 8
    return macs


def test_resnet20_conv_macs_and_params_by_hand():
    model = trp.models.build("resnet20")
    assert resnet20_conv_macs(shortcuts=False) == 40_550_400  # the paper's ~40.55M
    assert trp.count_macs(model, (3, 32, 32)) == resnet20_conv_macs()
    assert trp.count_macs(model, (4, 3, 32, 32)) == 4 * resnet20_conv_macs()
    assert trp.count_macs(model, (3, 32, 32), linear=True) == resnet20_conv_macs() + 64 * 10
    assert trp.count_params(model) == 272_474  # the paper's 0.27M
    frozen = sum(p.numel() for p in model.fc.parameters())
    model.fc.requires_grad_(False)
    assert trp.count_params(model, trainable_only=True) == 272_474 - frozen


def test_factorized_macs_by_hand():
    ch = ChannelFactorizedConv2d(8, 12, (3, 5), rank=4, stride=(2, 1), padding=(1, 1, 2, 2))
    out_h, out_w = (10 + 2 - 3) // 2 + 1, 10 + 4 - 5 + 1
    assert trp.count_macs(ch, (8, 10, 10)) == out_h * out_w * 4 * (8 * 15 + 12)
    sp = SpatialFactorizedConv2d(8, 12, (3, 5), rank=4, stride=(1, 2), padding=(1, 1, 2, 2))
    out_h, out_w = 10, (10 + 4 - 5) // 2 + 1
    # the 3x1 conv covers the full 10-pixel width (stride 1 horizontally), the 1x5 conv the output
    assert trp.count_macs(sp, (8, 10, 10)) == out_h * 10 * 4 * 8 * 3 + out_h * out_w * 12 * 4 * 5


def _flop_counter(model, shape):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(shape))
    return counter.get_total_flops()


def test_count_flops_agrees_with_flop_counter():
    model = trp.models.build("resnet20").eval()
    assert trp.count_flops(model, (3, 32, 32)) == _flop_counter(model, (1, 3, 32, 32))
    assert trp.count_flops(model, (3, 32, 32)) == 2 * trp.count_macs(model, (3, 32, 32), linear=True)
    compact = trp.decompose(model, "spatial", rank=4, layers=[r"layer2\.0\.conv1", r"layer1\.1\.conv2"])
    compact = trp.decompose(compact, "channel", rank=3, layers=[r"layer3\.0\.conv2", "fc"])
    assert trp.count_flops(compact, (3, 32, 32)) == 2 * trp.count_macs(compact, (3, 32, 32), linear=True)


@pytest.mark.parametrize("cls", [ChannelFactorizedConv2d, SpatialFactorizedConv2d])
def test_factorized_flops_equal_two_plain_convs(cls):
    conv = nn.Conv2d(6, 10, (3, 4), stride=(2, 3), padding="valid", dilation=(1, 2))
    fact = cls.from_conv(conv, rank=3)
    if cls is ChannelFactorizedConv2d:
        plain = nn.Sequential(nn.Conv2d(6, 3, (3, 4), (2, 3), 0, (1, 2), bias=False), nn.Conv2d(3, 10, 1))
    else:
        plain = nn.Sequential(nn.Conv2d(6, 3, (3, 1), (2, 1), 0, (1, 1), bias=False),
                              nn.Conv2d(3, 10, (1, 4), (1, 3), 0, (1, 2)))
    assert trp.count_flops(fact, (6, 13, 17)) == _flop_counter(plain, (1, 6, 13, 17))
    assert trp.count_flops(fact, (6, 13, 17)) == 2 * trp.count_macs(fact, (6, 13, 17))


def test_counting_leaves_model_state_alone():
    model = trp.models.build("resnet20").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trp.count_macs(model, (3, 32, 32))
    trp.count_flops(model, (3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BN stats untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_measure_latency_and_bad_arguments():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    t = trp.measure_latency(model, (3, 16, 16), warmup=1, repeats=3)
    assert isinstance(t, float) and t > 0
    for kwargs in ({"warmup": -1}, {"repeats": 0}, {"repeats": 2.5}):
        with pytest.raises(ValueError):
            trp.measure_latency(model, (3, 16, 16), **kwargs)
    with pytest.raises(ValueError, match="input_size"):
        trp.count_macs(model, (16, 16))


def test_report_table_and_dict():
    dense = trp.models.build("resnet20").eval()
    compact = trp.decompose(dense, "channel", energy=0.5, layers=r"layer1\..*")
    rep = trp.report(dense, compact, (3, 32, 32), repeats=2, warmup=1)
    d = rep.to_dict()
    json.dumps(d)
    rows = {r["layer"]: r for r in d["layers"]}
    assert len(rows) == 21  # every conv of ResNet-20 (19 3x3 + 2 shortcuts); the dense fc has no row
    row = rows["layer1.0.conv1"]
    assert row["matrix"] == [16, 144] and row["rank"] == compact.layer1[0].conv1.rank
    assert 0.5 <= row["energy_kept"] <= 1.0
    assert row["macs_factorized"] == 32 * 32 * row["rank"] * (144 + 16) and row["macs_dense"] == 2_359_296
    assert rows["layer2.0.conv1"]["rank"] is None
    t = d["totals"]
    assert t["macs_dense"] == resnet20_conv_macs()
    assert t["macs_compact"] == trp.count_macs(compact, (3, 32, 32))
    assert t["speedup"] == pytest.approx(t["macs_dense"] / t["macs_compact"])
    assert t["params_compact"] == trp.count_params(compact) and t["latency_ratio"] > 0
    text = str(rep)
    assert "| layer | matrix | rank | energy kept | MACs dense | MACs factorized |" in text
    assert "| layer1.0.conv1 | 16x144 |" in text and "speed-up" in text
    no_latency = trp.report(dense, compact, (3, 32, 32), latency=False).to_dict()["totals"]
    assert no_latency["latency_ratio"] is None
