# Over 300 lines with its docstrings: the input statistics and the factors computed from them belong together.
"""Activation-aware decomposition: what the layers to factorize see on sample inputs, and factors that keep
their outputs on such inputs rather than their weights.

A plain SVD keeps the components of W that hold the most weight energy, whatever the inputs. When the inputs
are correlated or a few input features are much larger than the others, the output error ||(W - W') x|| is
what matters: both methods here factorize W S instead, S a scaling of the input space taken from sample
inputs, and map the factors back (S^-1). With W S = U diag(s) V^T, the factors are A = U_k diag(s_k)^1/2 and
B = diag(s_k)^1/2 V_k^T S^-1, so A B = U_k U_k^T W: the rank-k projection of W onto the output directions
that carry most of W x on the sample inputs (plain SVD: most of W). The rank criteria read the singular
values s of W S.

- "whiten": S is the lower Cholesky factor of the inputs' second moment E[x x^T] (S S^T = E[x x^T]), so
  ||(W - W') S||_F^2 = E||(W - W') x||^2 and the truncation is the best rank-k one for the mean squared output
  error on the sample inputs.
- "scale": S = diag(E|x_j|)^alpha, a diagonal per-feature scaling (alpha 0.5 by default): cheaper, no
  Gram matrix, and it favours the input features of large magnitude.

A conv (under the channel scheme) is a matrix [n, c*kh*kw] applied to its im2col patches: its "inputs" are
the c*kh*kw columns that F.unfold gives with the conv's padding, stride and dilation; a grouped conv has one
such matrix, and statistics, per group."""
import copy
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from trp._utils import checks
from trp.core import attention as transformer
from trp.core import rank as rank_rules
from trp.core.schemes import to_matrix
from trp.nn.modules import ChannelFactorizedConv2d, FactorizedLinear, conv_padding4

METHODS = ("whiten", "scale")
DEFAULT_ALPHA = 0.5
# A Gram matrix whose Cholesky factorization fails, or has a pivot^2 below RIDGE x its mean diagonal, gets
# that ridge first: a numerically singular S would make S^-1 blow up the rounding errors.
RIDGE = 1e-6
# "scale": features never seen non-zero get this fraction of the largest scale, so that S is invertible.
SCALE_FLOOR = 1e-6
# Rows (patch vectors or tokens) per float64 chunk of the accumulation, to bound its temporary memory.
_CHUNK_ELEMENTS = 1 << 22


def check_method(method, alpha=DEFAULT_ALPHA):
    """Validates a calibration method and its exponent.

    Args:
        method: "whiten" or "scale".
        alpha: the exponent of the "scale" method, a finite float > 0; default DEFAULT_ALPHA.

    Returns:
        (method, alpha as a float).

    Raises:
        ValueError: when method is unknown or alpha is not a finite number > 0.
    """
    checks.choice(method, METHODS, "calibration_method")
    return method, checks.real(alpha, "calibration_alpha", 0.0, low_open=True)


class _Moments:
    """Running input statistics of one layer: the sum of x x^T ("whiten", [g, q, q]) or of |x| ("scale",
    [g, q]) over its input vectors x (a conv's: its im2col columns, per group), in float64."""

    def __init__(self, dense, method):
        self.method, self.count, self.total = method, 0, None
        if isinstance(dense, nn.Linear):
            self.conv, self.groups = None, 1
        else:
            self.conv, self.groups = dense, dense.groups
            top, bottom, left, right = conv_padding4(dense)
            self.pad = (left, right, top, bottom)

    def hook(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        self.add(x.detach())

    def _rows(self, x):
        """x as [rows, g, q] float64 chunks: a Linear's last dimension, or a conv's im2col columns."""
        if self.conv is None:
            x = x.reshape(-1, x.shape[-1])
            step = max(1, _CHUNK_ELEMENTS // max(1, x.shape[-1]))
            for i in range(0, x.shape[0], step):
                yield x[i:i + step].to(torch.float64)[:, None, :]
            return
        conv = self.conv
        x = x.unsqueeze(0) if x.dim() == 3 else x  # unbatched, as nn.Conv2d takes it
        per_sample = max(1, x[:1].numel() * conv.kernel_size[0] * conv.kernel_size[1])
        step = max(1, _CHUNK_ELEMENTS // per_sample)
        for i in range(0, x.shape[0], step):
            chunk = F.pad(x[i:i + step].to(torch.float64), self.pad)
            cols = F.unfold(chunk, conv.kernel_size, dilation=conv.dilation, stride=conv.stride)
            yield cols.transpose(1, 2).reshape(-1, self.groups, cols.shape[1] // self.groups)

    def add(self, x):
        for rows in self._rows(x):
            if self.method == "whiten":
                per_group = rows.transpose(0, 1)  # [g, rows, q]
                part = per_group.transpose(1, 2) @ per_group
            else:
                part = rows.abs().sum(0)
            self.total = part if self.total is None else self.total + part
            self.count += rows.shape[0]

    def mean(self):
        return self.total / self.count


def _bypassing_hosts(model, names):
    """Whether a target sits in a host that reads its weights instead of calling it (nn.MultiheadAttention,
    nn.TransformerEncoderLayer's fast path): hooks on the target would not run there."""
    for name in names:
        parts = name.split(".")
        for i in range(len(parts)):
            m = model.get_submodule(".".join(parts[:i]))
            if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer)):
                return True
    return False


def _run(model, item):
    if isinstance(item, Mapping):
        return model(**item)
    if isinstance(item, (tuple, list)):
        return model(*item)
    return model(item)


def collect_statistics(model, targets, inputs, method):
    """Runs sample inputs through the eval-mode model and returns the input statistics of the target layers.

    Forward pre-hooks on the targets record their inputs; the hooks are removed and every module's training
    mode is restored, also on error. Targets inside a host that reads their weights instead of calling them
    (nn.MultiheadAttention, nn.TransformerEncoderLayer) are recorded in a copy of the model whose hosts
    trp.core.attention.prepare_hosts converted; otherwise the model itself runs (under torch.no_grad).

    Args:
        model: the nn.Module.
        targets: the trp.core.targets.Target objects of the layers (Linear-like, or convs: the channel
            scheme), a list.
        inputs: an iterable of model inputs: a dict (any mapping) is passed as keyword arguments, a tuple or
            list as positional arguments, anything else (a tensor) as the one positional argument. A bare
            tensor is refused (iterating it would give its rows): wrap it in a list.
        method: "whiten" (the second moment E[x x^T], [g, q, q]) or "scale" (the mean magnitude E|x|, [g, q]).

    Returns:
        {target name: float64 tensor}, g the layer's groups (1 but for grouped convs), q its input features
            (a conv: c/g*kh*kw).

    Raises:
        ValueError: when inputs is a tensor, not iterable or empty, inputs never reach some targets (named),
            or a layer's statistics are not finite or all zero (named).
    """
    checks.choice(method, METHODS, "calibration_method")
    if isinstance(inputs, torch.Tensor):
        raise ValueError("calibration= is an iterable of model inputs, got a tensor: wrap it in a list "
                         "([x]) to use it as one batch")
    try:
        batches = iter(inputs)
    except TypeError:
        raise ValueError(f"calibration= must be an iterable of model inputs, got {type(inputs).__name__}") from None
    names = [t.name for t in targets]
    host = transformer.prepare_hosts(copy.deepcopy(model), names) if _bypassing_hosts(model, names) else model
    moments = {t.name: _Moments(t.dense(), method) for t in targets}
    modes = {m: m.training for m in host.modules()}
    handles, seen = [], 0
    try:
        for name, m in moments.items():
            handles.append(host.get_submodule(name).register_forward_pre_hook(m.hook, with_kwargs=True))
        host.eval()
        with torch.no_grad():
            for item in batches:
                _run(host, item)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    if seen == 0:
        raise ValueError("calibration= gave no inputs (an empty iterable, or an exhausted iterator)")
    missing = [n for n, m in moments.items() if m.count == 0]
    if missing:
        raise ValueError(f"the calibration inputs never reached these selected layers: {missing} (exclude them, "
                         "or give inputs whose forward runs them)")
    stats = {n: m.mean() for n, m in moments.items()}
    bad = [n for n, s in stats.items() if not bool(torch.isfinite(s).all())]
    if bad:
        raise ValueError(f"the calibration inputs give NaN or infinite statistics at layers {bad}")
    zero = [n for n, s in stats.items() if bool((s.flatten(1).abs().amax(1) == 0).any())]
    if zero:
        raise ValueError(f"layers {zero} received only zero inputs (in some group) during calibration: their "
                         "statistics cannot rank their components")
    return stats


def input_scaling(stats, method, alpha=DEFAULT_ALPHA):
    """The input scaling S of one layer from its statistics.

    Args:
        stats: the layer's statistics as collect_statistics gives them, float64 ([g, q, q] or [g, q]).
        method: "whiten": S [g, q, q], the lower Cholesky factor of the second moment (when that is
            numerically singular, of the second moment plus RIDGE x its mean diagonal on the diagonal);
            "scale": S [g, q], the diagonal (E|x|)^alpha, floored at SCALE_FLOOR x its largest entry.
        alpha: the exponent of "scale", a float > 0; default DEFAULT_ALPHA.

    Returns:
        The float64 tensor S (its per-group matrices are invertible).

    Raises:
        ValueError: when method or alpha is bad, or a second moment is not positive definite even with the
            ridge (it is not a second moment).
    """
    method, alpha = check_method(method, alpha)
    if method == "scale":
        s = stats.clamp(min=0) ** alpha
        return torch.maximum(s, s.amax(-1, keepdim=True) * SCALE_FLOOR)
    factors = []
    for gram in stats:
        base = float(gram.diagonal().mean())
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0 or float(L.diagonal().square().min()) < RIDGE * base:
            eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
            L, info = torch.linalg.cholesky_ex(gram + RIDGE * base * eye)
            if int(info) != 0:
                raise ValueError("the calibration second moment is not positive definite even with a ridge "
                                 f"of {RIDGE:g} x its mean diagonal")
        factors.append(L)
    return torch.stack(factors)


def _scaled(matrix, scaling):
    M = matrix.detach().to(torch.float64)
    M = M.reshape(scaling.shape[0], -1, M.shape[-1])  # [g, p, q]
    S = scaling.to(M.device)
    return M, S, (M @ S if S.dim() == 3 else M * S[:, None, :])


def _matrix(dense):
    """The channel-scheme matrix of a dense nn.Linear / nn.Conv2d (a grouped conv: [g, p, q])."""
    return dense.weight if isinstance(dense, nn.Linear) else to_matrix(dense.weight, "channel", dense.groups)


def scaled_spectrum(dense, scaling):
    """Singular values of W S, per group: the values the rank criteria read under calibration.

    Args:
        dense: the layer, an nn.Linear or an nn.Conv2d (its channel-scheme matrix W: [n, c/g*kh*kw] per
            group).
        scaling: its input_scaling S ([g, q, q] or [g, q]).

    Returns:
        Float64 singular values, descending: [K] for one group, [g, K] for several.
    """
    _, _, MS = _scaled(_matrix(dense), scaling)
    sigma = torch.linalg.svdvals(MS)
    return sigma[0] if sigma.shape[0] == 1 else sigma


def calibrated_factors(matrix, scaling, kind, value):
    """Factors A B ~= M from the truncated SVD of M S (module doc).

    The rank is chosen from the singular values of M S (a grouped conv: the largest any group needs); each
    kept component is rescaled so that its column of A and row of B have equal norms (the product is the
    same), as a plain SVD's factors have.

    Args:
        matrix: the layer's scheme matrix ([p, q], or a grouped conv's [g, p, q]).
        scaling: its input_scaling S ([g, q, q] or [g, q]).
        kind: the rank criterion, "energy", "threshold" or "rank" (trp.core.rank.check_criterion).
        value: the criterion's value.

    Returns:
        (A, B, r, singular values of M S): float64 A [p, r] and B [r, q] (several groups: [g, p, r] and
            [g, r, q]), the rank r (an int).
    """
    M, S, MS = _scaled(matrix, scaling)
    U, sigma, Vh = torch.linalg.svd(MS, full_matrices=False)
    r = int(rank_rules.select_rank(sigma, kind, value).max())
    root = sigma[..., :r].sqrt()
    A = U[..., :r] * root[..., None, :]
    B = root[..., None] * Vh[..., :r, :]
    B = torch.linalg.solve_triangular(S, B, upper=False, left=False) if S.dim() == 3 else B / S[:, None, :]
    na, nb = A.norm(dim=-2), B.norm(dim=-1)
    c = torch.where((na > 0) & (nb > 0), (nb / na.clamp(min=torch.finfo(na.dtype).tiny)).sqrt(),
                    torch.ones_like(na))
    A, B = A * c[..., None, :], B / c[..., None]
    if M.shape[0] == 1:
        return A[0], B[0], r, sigma[0]
    return A, B, r, sigma


def calibrated_layer(dense, scaling, kind, value):
    """The factorized module of a dense layer by calibrated_factors.

    Args:
        dense: an nn.Linear, or an nn.Conv2d (zero padding, any groups; factorized under the channel scheme).
        scaling: the layer's input_scaling S.
        kind: the rank criterion, "energy", "threshold" or "rank".
        value: the criterion's value.

    Returns:
        A FactorizedLinear or a ChannelFactorizedConv2d on the layer's device and dtype, with its bias.
    """
    w = dense.weight
    factory = {"device": w.device, "dtype": w.dtype}
    A, B, r, _ = calibrated_factors(_matrix(dense), scaling, kind, value)
    if isinstance(dense, nn.Linear):
        module = FactorizedLinear(dense.in_features, dense.out_features, r, dense.bias is not None, **factory)
    else:
        module = ChannelFactorizedConv2d(dense.in_channels, dense.out_channels, dense.kernel_size, r, dense.stride,
                                         dense.padding, dense.dilation, dense.bias is not None, groups=dense.groups,
                                         **factory)
    module.load_factors(A, B)
    if dense.bias is not None:
        with torch.no_grad():
            module.bias.copy_(dense.bias)
    return module


def calibrate(model, scheme, targets, inputs, method=None, alpha=None):
    """{name: input scaling S} of the target layers from sample inputs (collect_statistics, input_scaling):
    what trp.decompose(calibration=) factorizes with.

    Args:
        model: the nn.Module.
        scheme: the decomposition scheme; only "channel" is supported.
        targets: the trp.core.targets.Target objects of the layers to factorize, a list.
        inputs: the iterable of model inputs (collect_statistics).
        method: "whiten" or "scale"; default None ("whiten").
        alpha: the exponent of "scale", a float > 0; default None (DEFAULT_ALPHA).

    Returns:
        {target name: float64 S}.

    Raises:
        ValueError: for a scheme other than "channel", a bad method or alpha, and collect_statistics' errors.
    """
    if scheme != "channel":
        raise ValueError(f"calibration= supports the channel scheme only (Linear-like layers and convs), got "
                         f"scheme {scheme!r}")
    method, alpha = check_method("whiten" if method is None else method, DEFAULT_ALPHA if alpha is None else alpha)
    stats = collect_statistics(model, targets, inputs, method)
    return {name: input_scaling(s, method, alpha) for name, s in stats.items()}


__all__ = ["METHODS", "DEFAULT_ALPHA", "RIDGE", "SCALE_FLOOR", "check_method", "collect_statistics", "calibrate",
           "input_scaling", "scaled_spectrum", "calibrated_factors", "calibrated_layer"]
