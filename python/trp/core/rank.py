"""Rank criteria: how many singular values a layer keeps.

- energy: the smallest k >= 1 whose leading k squared singular values keep at least `energy` of the total
  (the "keep energy" T of the method; the same rule as trp_kernels.lowrank_project).
- threshold: the number of singular values above an absolute cutoff (the released code's deployment rule
  for TRP-trained models, 0.05 there); at least 1.
- fixed: a given rank, capped by the matrix size.
All take singular values in descending order ([K] or [B, K]) and return int64 ranks of the leading shape."""
import torch

from trp._utils import checks
from trp_kernels.project import check_energy  # the op's rule: one home for it
from trp_kernels.reference import energy_rank as _energy_rank


def check_threshold(threshold, name="threshold"):
    """Validates an absolute singular-value cutoff.

    Args:
        threshold: the cutoff, a finite real number >= 0 (singular values strictly above it are kept).
        name: the parameter name that error messages use, str; default "threshold".

    Returns:
        The threshold as a float.

    Raises:
        ValueError: when threshold is not a finite real number >= 0.
    """
    return checks.real(threshold, name, 0.0, what=" (an absolute singular-value cutoff)")


def check_rank(rank, name="rank"):
    """Validates a fixed rank.

    Args:
        rank: the number of singular values to keep, an int >= 1 (a bool is refused).
        name: the parameter name that error messages use, str; default "rank".

    Returns:
        The rank as an int.

    Raises:
        ValueError: when rank is not an int >= 1.
    """
    return checks.integer(rank, name, 1)


def energy_rank(sigma, energy):
    """Smallest k >= 1 keeping `energy` of sum s_i^2; 0 for an all-zero matrix.

    Args:
        sigma: singular values in descending order, a tensor [K] or a batch [..., K].
        energy: the fraction of the total squared singular values to keep, a float in (0, 1].

    Returns:
        The rank(s), an int64 tensor of sigma's leading shape ([] for [K]).

    Raises:
        ValueError: when energy is not a number in (0, 1].
    """
    return _energy_rank(sigma, check_energy(energy))


def threshold_rank(sigma, threshold):
    """Number of singular values strictly above `threshold`, at least 1.

    Args:
        sigma: singular values in descending order, a tensor [K] or a batch [..., K].
        threshold: the absolute cutoff, a real number >= 0 in the units of sigma.

    Returns:
        The rank(s), an int64 tensor of sigma's leading shape, each at least 1.

    Raises:
        ValueError: when threshold is not a finite real number >= 0.
    """
    threshold = check_threshold(threshold)
    return (sigma.detach() > threshold).sum(dim=-1).clamp(min=1)


def fixed_rank(sigma, rank):
    """`rank`, capped by the number of singular values.

    Args:
        sigma: singular values in descending order, a tensor [K] or a batch [..., K] (only its shape and
            device are used).
        rank: the rank to keep, an int >= 1.

    Returns:
        An int64 tensor of sigma's leading shape, every entry min(rank, K).

    Raises:
        ValueError: when rank is not an int >= 1.
    """
    rank = check_rank(rank)
    return torch.full(sigma.shape[:-1], min(rank, sigma.shape[-1]), dtype=torch.int64, device=sigma.device)


def check_criterion(energy=None, threshold=None, rank=None):
    """Validates that exactly one criterion is given; returns (kind, value).

    Args:
        energy: the fraction of the squared singular values to keep, a float in (0, 1]; default None.
        threshold: an absolute singular-value cutoff, a real number >= 0; default None.
        rank: a fixed rank, an int >= 1, or a dict {module name: int >= 1} of per-layer ranks; default None.

    Returns:
        (kind, value): kind is "energy", "threshold" or "rank", value the validated criterion value.

    Raises:
        ValueError: when none or more than one criterion is given, or the given value is out of range.
    """
    given = [(k, v) for k, v in (("energy", energy), ("threshold", threshold), ("rank", rank))
             if v is not None]
    if len(given) != 1:
        raise ValueError("give exactly one rank criterion: energy= (fraction in (0, 1]), threshold= "
                         f"(absolute singular value) or rank= (int); got {[k for k, _ in given] or 'none'}")
    kind, value = given[0]
    checker = {"energy": check_energy, "threshold": check_threshold, "rank": _check_rank_or_map}[kind]
    return kind, checker(value)


def _check_rank_or_map(rank):
    if isinstance(rank, dict):  # per-layer ranks by module name
        return {name: check_rank(r) for name, r in rank.items()}
    return check_rank(rank)


def select_rank(sigma, kind, value):
    """Rank(s) for singular values sigma by the criterion (kind, value) from check_criterion.

    Args:
        sigma: singular values in descending order, a tensor [K] or a batch [..., K].
        kind: the criterion, "energy", "threshold" or "rank".
        value: the criterion's value as check_criterion returns it (a fraction in (0, 1], a cutoff >= 0 or an
            int rank >= 1).

    Returns:
        The rank(s), an int64 tensor of sigma's leading shape, each at least 1 (an all-zero layer keeps one
            zero component, an exact factorization).

    Raises:
        ValueError: when kind is not one of the three criteria, or value is out of its range.
    """
    if kind == "energy":
        r = energy_rank(sigma, value)
    elif kind == "threshold":
        r = threshold_rank(sigma, value)
    elif kind == "rank":
        r = fixed_rank(sigma, value)
    else:
        raise ValueError(f"unknown rank criterion {kind!r}; valid choices: 'energy', 'threshold', 'rank'")
    return r.clamp(min=1)  # an all-zero layer still gets one (zero) component: an exact factorization


def energy_kept(sigma, rank):
    """Fraction of sum s_i^2 held by the leading `rank` singular values (1.0 for an all-zero matrix).

    Args:
        sigma: singular values in descending order, a tensor [K] or a batch [..., K] (nd: one row per
            filter, every filter keeping `rank`); for a batch the fraction is of the whole batch's energy.
        rank: the number of leading singular values kept, an int >= 0.

    Returns:
        The kept fraction, a float in [0, 1].
    """
    s2 = sigma.detach().to(torch.float64).square()
    total = float(s2.sum())
    return 1.0 if total == 0 else float(s2[..., :int(rank)].sum()) / total


__all__ = ["energy_rank", "threshold_rank", "fixed_rank", "select_rank", "check_criterion",
           "check_energy", "check_threshold", "check_rank", "energy_kept"]
