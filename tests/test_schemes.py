"""Scheme reshapes (channel, spatial) and the rank criteria."""
import pytest
import torch

from trp.core import rank as rank_rules
from trp.core.schemes import LAYER_SCHEMES, check_scheme, from_matrix, matrix_shape, to_matrix
from trp_kernels.reference import energy_rank as kernel_energy_rank


def test_channel_and_spatial_layouts_match_the_paper():
    W = torch.randn(5, 3, 2, 4)
    n, c, kh, kw = W.shape
    ch = to_matrix(W, "channel")
    assert ch.shape == (n, c * kh * kw) and torch.equal(ch, W.reshape(n, -1))
    sp = to_matrix(W, "spatial")
    assert sp.shape == (c * kh, n * kw)
    for ni, ci, i, j in [(0, 0, 0, 0), (4, 2, 1, 3), (2, 1, 0, 2)]:
        assert sp[ci * kh + i, ni * kw + j] == W[ni, ci, i, j]
    assert matrix_shape(W.shape, "channel") == (5, 24) and matrix_shape(W.shape, "spatial") == (6, 20)


@pytest.mark.parametrize("scheme", LAYER_SCHEMES)
def test_round_trip_single_and_batched(scheme):
    W = torch.randn(7, 5, 3, 1, 4)  # a batch of 7 conv weights [5, 3, 1, 4]
    M = to_matrix(W, scheme)
    assert M.shape == (7, *matrix_shape((5, 3, 1, 4), scheme))
    assert torch.equal(from_matrix(M, scheme, (5, 3, 1, 4)), W)
    for b in range(7):
        assert torch.equal(M[b], to_matrix(W[b], scheme))
        assert torch.equal(from_matrix(M[b], scheme, (5, 3, 1, 4)), W[b])


def test_linear_weights_are_their_own_matrix_channel_only():
    W = torch.randn(4, 9)
    assert to_matrix(W, "channel") is W and torch.equal(from_matrix(W, "channel", (4, 9)), W)
    with pytest.raises(ValueError, match="channel"):
        to_matrix(W, "spatial")
    with pytest.raises(ValueError, match="channel"):
        matrix_shape((4, 9), "spatial")


def test_unknown_scheme_names_valid_choices():
    with pytest.raises(ValueError, match="valid choices: 'channel', 'spatial'"):
        check_scheme("VH")
    with pytest.raises(ValueError, match="valid choices"):
        to_matrix(torch.randn(2, 2, 3, 3), "ND")


def test_energy_rank_rule():
    sigma = torch.tensor([[3.0, 2.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # squared: 9, 4, 1 of 14 -> 9/14 = 0.643, 13/14 = 0.929, 1.0
    assert rank_rules.energy_rank(sigma[0], 0.6).item() == 1
    assert rank_rules.energy_rank(sigma[0], 0.9).item() == 2
    assert rank_rules.energy_rank(sigma[0], 0.95).item() == 3
    assert rank_rules.energy_rank(sigma, 0.5).tolist() == [1, 2, 0]  # all-zero matrix: rank 0
    assert rank_rules.energy_rank(sigma[1], 1.0).item() == 4
    torch.manual_seed(0)
    s = torch.rand(6, 10).sort(dim=1, descending=True).values
    for e in (0.3, 0.77, 0.99):
        assert torch.equal(rank_rules.energy_rank(s, e), kernel_energy_rank(s, e))  # same rule as the op


def test_threshold_and_fixed_rank_rules():
    sigma = torch.tensor([2.0, 0.5, 0.05, 0.01])
    assert rank_rules.threshold_rank(sigma, 0.05).item() == 2  # strictly above the cutoff
    assert rank_rules.threshold_rank(sigma, 0.0).item() == 4
    assert rank_rules.threshold_rank(sigma, 10.0).item() == 1  # at least one component
    assert rank_rules.fixed_rank(sigma, 3).item() == 3 and rank_rules.fixed_rank(sigma, 9).item() == 4
    assert rank_rules.select_rank(torch.zeros(4), "energy", 0.9).item() == 1
    assert rank_rules.energy_kept(sigma, 1) == pytest.approx(4 / (4 + 0.25 + 0.0025 + 0.0001))
    assert rank_rules.energy_kept(torch.zeros(3), 1) == 1.0


def test_criterion_validation():
    assert rank_rules.check_criterion(energy=0.9) == ("energy", 0.9)
    assert rank_rules.check_criterion(threshold=0.05) == ("threshold", 0.05)
    assert rank_rules.check_criterion(rank={"a": 2}) == ("rank", {"a": 2})
    for kwargs in ({}, {"energy": 0.9, "rank": 3}):
        with pytest.raises(ValueError, match="exactly one"):
            rank_rules.check_criterion(**kwargs)
    for bad in ({"energy": 0.0}, {"energy": 1.2}, {"threshold": -0.1}, {"threshold": float("inf")},
                {"rank": 0}, {"rank": 2.0}, {"rank": {"a": -1}}):
        with pytest.raises(ValueError):
            rank_rules.check_criterion(**bad)
    with pytest.raises(ValueError, match="valid choices"):
        rank_rules.select_rank(torch.ones(3), "svd", 1)
