"""trp.report(dense, compact, input_size): what decomposition bought, per layer and in total."""
import torch
import torch.nn as nn

from trp.core import eligibility
from trp.core.attention import block_names
from trp.core.rank import energy_kept
from trp.core.schemes import matrix_shape, to_matrix
from trp.core.targets import candidates, survey
from trp.cost.flops import count_params, macs_by_layer, measure_latency
from trp.nn.modules import FACTORIZED_TYPES, FactorizedLinear


class Report:
    """Per-layer rows, totals and the layers left dense with their reasons.

    str() is a markdown table; to_dict() plain data (JSON-ready).

    Args:
        rows: the per-layer rows, a list of dicts (report() writes the keys "layer", "type", "matrix", "rank",
            "energy_kept", "macs_dense" and "macs_factorized").
        totals: the totals, a dict (MACs, speed-up, parameters, latency: see report()).
        skipped: {layer name: reason} of the candidate layers left dense. Default None: none.
    """

    def __init__(self, rows, totals, skipped=None):
        self.rows, self.totals, self.skipped = rows, totals, dict(skipped or {})

    def to_dict(self):
        """The report as plain data.

        Returns:
            {"layers": [row dicts], "totals": dict, "skipped": {name: reason}}, copies that json.dumps takes.
        """
        return {"layers": [dict(r) for r in self.rows], "totals": dict(self.totals), "skipped": dict(self.skipped)}

    def __str__(self):
        head = "| layer | matrix | rank | energy kept | MACs dense | MACs factorized |"
        lines = [head, "|---|---|---|---|---|---|"]
        for r in self.rows:
            matrix = _shape(r["matrix"])
            rank = "dense" if r["rank"] is None else str(r["rank"])
            energy = "-" if r["energy_kept"] is None else f"{r['energy_kept']:.4f}"
            lines.append(f"| {r['layer']} | {matrix} | {rank} | {energy} | {_m(r['macs_dense'])} | "
                         f"{_m(r['macs_factorized'])} |")
        t = self.totals
        lines.append("")
        lines.append(f"{t.get('macs_counted', 'conv')} MACs: {_m(t['macs_dense'])} -> {_m(t['macs_compact'])} "
                     f"(speed-up {t['speedup']:.2f}x, as the paper counts)")
        lines.append(f"params: {t['params_dense'] / 1e6:.3f}M -> {t['params_compact'] / 1e6:.3f}M "
                     f"({t['params_ratio']:.2f}x fewer)")
        if t.get("latency_dense_s") is not None:
            lines.append(f"latency ({t['latency_device']}, median): {t['latency_dense_s'] * 1e3:.2f} ms -> "
                         f"{t['latency_compact_s'] * 1e3:.2f} ms ({t['latency_ratio']:.2f}x)")
        if self.skipped:
            by_reason = {}
            for name, why in self.skipped.items():
                by_reason.setdefault(why, []).append(name)
            lines.append(f"left dense: {len(self.skipped)} layers")
            lines += [f"- {len(names)} x {why}: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                      for why, names in by_reason.items()]
        return "\n".join(lines)

    __repr__ = __str__


def _shape(matrix):
    """"16x144", or "16 x 8x9" for nd's per-filter matrices [n, c, kh*kw]."""
    if not matrix:
        return "-"
    text = "x".join(map(str, matrix[-2:]))
    return f"{matrix[0]} x {text}" if len(matrix) == 3 else text


def _m(macs):
    return f"{macs / 1e6:.2f}M"


def _layer_row(name, dense_weight, compact_layer, macs_dense, macs_compact):
    row = {"layer": name, "type": "dense", "matrix": None, "rank": None, "energy_kept": None,
           "macs_dense": macs_dense, "macs_factorized": macs_compact}
    if isinstance(compact_layer, FACTORIZED_TYPES):
        scheme = "channel" if isinstance(compact_layer, FactorizedLinear) else compact_layer.scheme
        w, groups = dense_weight, getattr(compact_layer, "groups", 1)
        sigma = torch.linalg.svdvals(to_matrix(w, scheme, groups).to(torch.float64))
        row.update(type=compact_layer.scheme, matrix=list(matrix_shape(tuple(w.shape), scheme, groups)),
                   rank=compact_layer.rank, energy_kept=energy_kept(sigma, compact_layer.rank))
    return row


def _is_linear(module):
    return isinstance(module, (nn.Linear, FactorizedLinear)) or eligibility.kind_of(module) == "linear"


def _skipped(dense, compact):
    """{name: reason} of the dense model's candidate layers that `compact` keeps dense: decompose's record
    (trp_skipped), else "not factorized" for each."""
    recorded = getattr(compact, "trp_skipped", None)
    if isinstance(recorded, dict):
        return dict(recorded)
    factorized = {n for n, m in compact.named_modules() if isinstance(m, FACTORIZED_TYPES)}
    return {n: "not factorized (the compact model has no decomposition record)"
            for n, _, _, _ in survey(dense) if n not in factorized}


def report(dense, compact, input_size, latency=True, warmup=3, repeats=10, device=None):
    """Compares a dense model with its decomposition at `input_size`.

    Rows: every conv layer (and factorized Linear) - matrix shape, rank, energy kept (fraction of the dense
    weight's squared singular values that the rank keeps; nd: of all its filters'), MACs dense / factorized.
    Totals: conv MACs and the paper's speed-up (their ratio), parameters, and with latency=True the median
    forward latency ratio.
    For a transformer (a model with attention modules) the totals count convs, Linear layers and attention
    matmuls (totals["macs_counted"]), since its Linear layers are what TRP factorizes; for another model
    with factorized Linear-like layers, convs and Linear-like layers. `skipped` (and totals["layers_skipped"])
    lists every candidate layer left dense with its reason (decompose records them).

    Args:
        dense: the dense nn.Module that was decomposed.
        compact: its decomposition (the result of trp.decompose, or a model with factorized layers of the
            same names).
        input_size: (C, H, W) for one input, or (N, C, H, W).
        latency: also time both models' forward passes (measure_latency) and report the median latency
            ratio. Default True.
        warmup: unmeasured calls before timing, an int >= 0. Default 3.
        repeats: timed calls per model, an int >= 1. Default 10.
        device: where to time, a torch.device or str. Default None: the models' device.

    Returns:
        A Report: its rows, totals (keys "macs_dense", "macs_compact", "speedup", "params_dense",
        "params_compact", "params_ratio", "layers_factorized", "layers_skipped", "macs_counted",
        "latency_dense_s", "latency_compact_s", "latency_ratio", "latency_device"; the latency ones None
        with latency=False) and skipped layers.

    Raises:
        ValueError: when input_size is malformed or does not run through a model, or the timing arguments
            are out of range.
    """
    transformer = bool(block_names(dense))
    wide = transformer or any(isinstance(m, FactorizedLinear) for m in compact.modules())
    md = macs_by_layer(dense, input_size, linear=True, attention=transformer)
    mc = macs_by_layer(compact, input_size, linear=True, attention=transformer)
    dense_mods, compact_mods = dict(dense.named_modules()), dict(compact.named_modules())
    weights = {t.name: t.effective() for t in candidates(dense)}  # q/k/v rows too
    rows = []
    for name, macs in md.items():
        c_layer = compact_mods.get(name)
        d_layer = dense_mods.get(name)
        if name not in weights or (not isinstance(d_layer, nn.Conv2d)
                                   and not isinstance(c_layer, FACTORIZED_TYPES)):
            continue  # dense FC / attention matmuls: no rank to show, not worth a row
        rows.append(_layer_row(name, weights[name], c_layer, macs, mc.get(name, 0)))
    if wide:
        conv_dense, conv_compact = sum(md.values()), sum(mc.values())
    else:
        conv_dense = sum(v for n, v in md.items() if not _is_linear(dense_mods[n]))
        conv_compact = sum(v for n, v in mc.items() if not _is_linear(compact_mods[n]))
    skipped = _skipped(dense, compact)
    p_dense, p_compact = count_params(dense), count_params(compact)
    totals = {"macs_dense": conv_dense, "macs_compact": conv_compact,
              "speedup": conv_dense / conv_compact if conv_compact else float("inf"),
              "params_dense": p_dense, "params_compact": p_compact,
              "params_ratio": p_dense / p_compact if p_compact else float("inf"),
              "layers_factorized": sum(r["rank"] is not None for r in rows), "layers_skipped": len(skipped),
              "macs_counted": "conv + linear + attention" if transformer else "conv + linear" if wide else "conv",
              "latency_dense_s": None, "latency_compact_s": None, "latency_ratio": None,
              "latency_device": None}
    if latency:
        ld = measure_latency(dense, input_size, warmup, repeats, device)
        lc = measure_latency(compact, input_size, warmup, repeats, device)
        param = next(compact.parameters(), None)
        totals.update(latency_dense_s=ld, latency_compact_s=lc, latency_ratio=ld / lc,
                      latency_device=str(device or (param.device if param is not None else "cpu")))
    return Report(rows, totals, skipped)


__all__ = ["report", "Report"]
