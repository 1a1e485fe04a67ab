"""One PNG that shows what TRP did: the rank kept in every layer and every layer's singular-value spectrum."""
import torch

from trp._utils.storage import atomic_write
from trp.core.selection import select_targets


def layer_spectra(dense, compact, scheme):
    """[(name, singular values (float64, descending), full rank, kept rank)] for the layers that
    decomposition works on; kept rank is the full rank where the layer stayed dense. nd has one spectrum
    per filter: the layer's is their root mean square, sqrt(mean_i s_ij^2).

    Args:
        dense: the dense nn.Module that was decomposed.
        compact: its decomposition (a layer's kept rank is the `rank` of the module of the same name).
        scheme: the scheme of the decomposition (trp.core.schemes.SCHEMES).

    Returns:
        A list of (name, singular values, full rank, kept rank) tuples.
    """
    compact_mods = dict(compact.named_modules())
    rows = []
    for target in select_targets(dense, scheme, warn=False):
        name = target.name
        sigma = torch.linalg.svdvals(target.matrix(scheme).cpu().to(torch.float64))
        if sigma.dim() > 1:
            sigma = sigma.square().mean(0).sqrt()
        kept = getattr(compact_mods.get(name), "rank", None)
        rows.append((name, sigma, len(sigma), int(kept) if kept is not None else len(sigma)))
    return rows


def rank_spectrum(dense, compact, scheme, path, energy=None, threshold=None, target_speedup=None,
                  target_latency=None):
    """Writes a PNG of the ranks kept and the singular-value spectra to `path` (atomically).

    Top: full vs kept rank per layer. Bottom: s_i / s_1 of every layer (log scale), a dot at the kept rank;
    with a threshold, s_i itself and the cutoff. Needs matplotlib (the `plot` extra).

    Args:
        dense: the dense nn.Module that was decomposed.
        compact: its decomposition.
        scheme: the scheme of the decomposition (trp.core.schemes.SCHEMES).
        path: the PNG file to write.
        energy: the energy criterion of the decomposition, shown in the title. Default None.
        threshold: the singular-value cutoff of the decomposition; when given, the spectra are drawn
            unnormalized with the cutoff line. Default None.
        target_speedup: the target speed-up of the decomposition, shown in the title. Default None.
        target_latency: the target latency speed-up of the decomposition, shown in the title. Default None.

    Returns:
        `path`.
    """
    import matplotlib  # optional dependency (the plot extra): needed only to draw
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    rows = layer_spectra(dense, compact, scheme)
    fig, (ax_rank, ax_spec) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows) + 3), 9))
    names = [r[0] for r in rows]
    xs = range(len(rows))
    ax_rank.bar(xs, [r[2] for r in rows], color="#cccccc", label="full rank")
    ax_rank.bar(xs, [r[3] for r in rows], color="#1f77b4", label="kept rank")
    ax_rank.set_xticks(list(xs), names, rotation=70, ha="right", fontsize=7)
    ax_rank.set_ylabel("rank")
    crit = (f"threshold {threshold}" if threshold is not None else
            f"target speed-up {target_speedup}" if target_speedup is not None else
            f"target latency speed-up {target_latency}" if target_latency is not None else f"energy {energy}")
    ax_rank.set_title(f"rank per layer ({scheme} scheme, {crit})")
    ax_rank.legend()
    cmap = plt.get_cmap("viridis")
    for i, (_name, sigma, _full, kept) in enumerate(rows):
        s = sigma.numpy()
        y = s if threshold is not None else s / max(s[0], 1e-300)
        color = cmap(i / max(1, len(rows) - 1))
        ax_spec.semilogy(range(1, len(y) + 1), y.clip(min=1e-12), color=color, lw=1)
        ax_spec.plot([kept], [max(y[kept - 1], 1e-12)], "o", color=color, ms=3)
    if threshold is not None:
        ax_spec.axhline(threshold, color="red", ls="--", lw=1, label=f"cutoff {threshold}")
        ax_spec.legend()
    ax_spec.set_xlabel("singular value index i")
    ax_spec.set_ylabel("s_i" if threshold is not None else "s_i / s_1")
    ax_spec.set_title("singular-value spectrum of every layer (dot: kept rank; dark = early layers)")
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))  # never a half-written PNG
    finally:
        plt.close(fig)
    return path


__all__ = ["rank_spectrum", "layer_spectra"]
