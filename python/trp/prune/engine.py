# Over 300 lines with its docstrings: the three projection paths share the groups and the write-back.
"""The projection engine of RankPruner: the selected targets grouped by matrix shape, dtype and device, and the
three ways a projection runs, with the same results:

- "in place": on the CPU, when every matrix is a contiguous view of its weight, one trp_kernels.inplace call
  for all groups projects the weights themselves;
- "staged": the same in-place op on stacked copies (spatial's matrices are copies), then the write-back;
- "stacked": one trp_kernels.lowrank_project_many call over every group's stack (GPUs, sharding, nd), each
  group warm-started from its previous projection, then the write-back.

Under torch.distributed the groups are sharded (trp.prune.distributed): each process projects its own and the
results are exchanged, so that every process ends bit-identical. Weights sharded by FSDP2 (DTensors) take the
stacked path: each group's whole matrices are gathered in turn and kept by the process that projects them, and the
results are written into every process's shards (trp.prune.fsdp)."""
import contextlib

import torch

import trp_kernels
from trp._utils import checks
from trp.core.schemes import from_matrix, matrix_shape, to_matrix
from trp.prune import distributed, fsdp
from trp.prune.warm_state import warm_bases
from trp_kernels import inplace
from trp_kernels.project import finite_flag, finite_rows


class Group:
    """Targets sharing one matrix shape, dtype and device: projected by one batched call.

    Args:
        targets: the group's trp.core.targets.Target objects, a non-empty list of the same shape.
        scheme: the reshape of the group's matrices, one of trp.core.schemes.LAYER_SCHEMES (the same for every
            target: "nd" resolved per layer).
    """

    def __init__(self, targets, scheme):
        self.targets, self.scheme = targets, scheme
        self.names = [t.name for t in targets]
        self.shape = targets[0].shape
        self.groups = targets[0].groups  # a grouped conv: `groups` matrices per layer
        self.rank = None  # int64 [B] (nd: [B, n], per filter) on the device, from the last projection
        self.G = None     # [B, p, q] nuclear subgradient from the last projection, or None
        self.warm = trp_kernels.WarmStart()  # kept bases carried to the next projection (warm start)


class Engine:
    """Projects the groups of `targets` under `scheme`.

    Attributes: groups ([Group]), sharding (distributed.Sharding or None), sharded (whether some weight is a
    DTensor, FSDP2: trp.prune.fsdp), inplace (False: always the stacked path, e.g. to compare), path (how the
    latest projection ran).

    Args:
        targets: the selected trp.core.targets.Target objects.
        scheme: a scheme of trp.core.schemes.SCHEMES ("nd": each layer in its own order, Target.scheme_for).
        pg: the process group to shard the groups over, or None (no sharding). Default None.

    Raises:
        ValueError: when, under sharding, the processes selected different layers.
    """

    def __init__(self, targets, scheme, pg=None):
        self.targets, self.scheme = targets, scheme
        groups = {}
        for t in targets:
            own = t.scheme_for(scheme)
            key = (own, matrix_shape(t.shape, own, t.groups), t.shape, t.groups, t.param.dtype, t.param.device)
            groups.setdefault(key, []).append(t)
        self.sharding = None
        if pg is not None:  # heavy groups split, and all shared out by cost: fixed for the whole run
            costs = [distributed.projection_cost(key[1]) for key in groups]
            pieces, self.sharding = distributed.make_sharding(pg, list(groups.values()), costs)
            groups = {i: piece for i, piece in enumerate(pieces)}  # pieces of a group share its scheme
        self.groups = [Group(ts, ts[0].scheme_for(scheme)) for ts in groups.values()]
        self.sharded = fsdp.any_sharded(targets)
        self.inplace_cache = None  # (parameter addresses, _find_inplace_groups() for them)
        self.inplace = True
        self.path = None  # "in place", "staged" or "stacked"

    # --- what the groups hold ------------------------------------------------------------------------------
    def owned_groups(self):
        """The groups this process projects (all of them without sharding)."""
        return [g for i, g in enumerate(self.groups) if self.sharding is None or self.sharding.owns(i)]

    def matrices(self, group):
        """The stacked matrices of a group's layers under the scheme. With FSDP2 (sharded) the whole matrices,
        gathered: a collective that every process calls for the same group.

        Args:
            group: one of the engine's Groups.

        Returns:
            A tensor [B, ...matrix] (a copy, or views where the scheme allows).
        """
        read = fsdp.gathered if self.sharded else (lambda t: t.read())
        return to_matrix(torch.stack([read(t) for t in group.targets]), group.scheme, group.groups)

    def ranks(self, per_filter=False):
        """{layer name: rank} of the groups projected so far.

        Args:
            per_filter: give nd's and grouped convs' per-filter (per-group) ranks as lists instead of the
                largest. Default False.

        Returns:
            {layer name: int, or list of ints with per_filter}.
        """
        out = {}
        for g in self.groups:
            if g.rank is not None:
                out.update(zip(g.names, g.rank.tolist() if per_filter else self.ranks_of(g)))
        return out

    def nuclear_norm(self):
        """sum over the layers of ||W_l||_* (float)."""
        total = 0.0
        for g in self.groups:
            W = self.matrices(g).to(torch.float64)
            total += float(torch.linalg.matrix_norm(W, ord="nuc").sum())
        return total

    def subgradients(self):
        """{layer name: a copy of its subgradient U_k V_k^T} (the next projection may write them in place)."""
        return {n: G.clone() for g in self.groups if g.G is not None for n, G in zip(g.names, g.G.unbind(0))}

    def warm_bases(self):
        """{layer name: warm-start basis} of the groups this process projects (warm_state.warm_bases)."""
        return warm_bases(self.owned_groups())

    # --- projection ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def project(self, energy, max_rank, nuclear):
        """Projects every group (all checked for NaN/Inf before any weight is written); sets path.

        Args:
            energy: the fraction of squared singular values to keep, in (0, 1].
            max_rank: a cap on every rank, or None.
            nuclear: the nuclear-norm weight (> 0: the subgradients are computed too).

        Raises:
            ValueError: when a layer holds NaN or Inf values (no weight is modified).
        """
        groups = self.inplace_groups()
        if groups is not None:
            self._project_inplace(groups, energy, max_rank, nuclear)
            self.path = "in place"
            return
        if self.sharded:
            stacks, bad = self._gathered_stacks()
            self._project_stacked(stacks, energy, max_rank, nuclear, bad)
            self.path = "stacked"
            return
        stacks = [self.matrices(g) for g in self.groups]
        if self._staged_inplace(stacks, energy, max_rank, nuclear):
            self.path = "staged"
        else:
            self._project_stacked(stacks, energy, max_rank, nuclear)
            self.path = "stacked"

    def _inplace_allowed(self):
        """Whether the in-place op may project at all: switched on, no sharding (each process projects only
        its own groups, then exchanges them) and no FSDP2 shards (the op projects the weights' own storage)."""
        return self.inplace and self.sharding is None and not self.sharded

    def inplace_groups(self):
        """Each group's matrices as views of the layers' weights when the in-place CPU op takes them all
        (trp_kernels.inplace: CPU, no sharding, every matrix a contiguous view of its weight, n small enough),
        else None. One call for all groups instead of stacking each group and copying the results back."""
        if not self._inplace_allowed():
            return None
        # The views stay valid while every parameter keeps its storage (a cached view keeps its storage alive,
        # so a new one, after .to() or .data =, never has the same address)
        key = [t.param.data_ptr() for t in self.targets]
        if self.inplace_cache is not None and self.inplace_cache[0] == key:
            return self.inplace_cache[1]
        self.inplace_cache = (key, self._find_inplace_groups())
        return self.inplace_cache[1]

    def _find_inplace_groups(self):
        groups = []
        for g in self.groups:
            mats = []
            for t in g.targets:
                w = t.read()
                m = to_matrix(w, g.scheme, t.groups)
                if m.dim() != 2 or m.untyped_storage().data_ptr() != w.untyped_storage().data_ptr():
                    return None  # a copy (spatial), or nd's batch of filter matrices
                mats.append(m)
            groups.append(mats)
        return groups if inplace.supports(groups) else None

    def _project_inplace(self, groups, energy, max_rank, nuclear):
        want_g = nuclear > 0
        G = None
        if want_g:
            G = [g.G if g.G is not None and g.G.shape == (len(mats), *mats[0].shape) and g.G.dtype == mats[0].dtype
                 and g.G.device == mats[0].device and g.G.is_contiguous()
                 else mats[0].new_empty(len(mats), *mats[0].shape) for g, mats in zip(self.groups, groups)]
        try:
            ranks = inplace.lowrank_project_(groups, energy, [g.warm for g in self.groups], max_rank=max_rank, G=G)
        except inplace.NonFiniteError as exc:
            bad = [self.groups[i].names[j] for i, j in exc.bad]
            raise ValueError(f"RankPruner: non-finite weights (NaN or Inf) in layer(s) {', '.join(bad)}; "
                             "no layer was modified") from None
        for i, (g, rank) in enumerate(zip(self.groups, ranks)):
            g.rank, g.G = rank, (G[i] if want_g else None)

    def write_back(self, group, W_low):
        """Copies a group's projected stack [B, ...matrix] into its layers' weights.

        Args:
            group: one of the engine's Groups.
            W_low: its projected matrices, [B, ...matrix].
        """
        values = list(from_matrix(W_low, group.scheme, group.shape, group.groups).unbind(0))
        if self.sharded:
            fsdp.write_(group.targets, values)
        else:
            torch._foreach_copy_([t.read() for t in group.targets], values)

    def _staged_inplace(self, stacks, energy, max_rank, nuclear):
        """The in-place op on the groups' stacked matrices, for layers whose matrix is a copy (spatial) on the
        CPU: one call for all groups (matrices shared out over the threads by cost, the fallback on the spot)
        instead of one per group, then the copy back. Returns whether it projected (False: the op does not
        take these matrices, e.g. nd's filter batches, a GPU, n > inplace.max_n())."""
        if not self._inplace_allowed():
            return False
        groups = [list(W.unbind(0)) for W in stacks]
        if not inplace.supports(groups):
            return False
        self._project_inplace(groups, energy, max_rank, nuclear)  # raises before any weight is written
        for g, W in zip(self.groups, stacks):
            self.write_back(g, W)
        return True

    def _gathered_stacks(self):
        """FSDP2: every group's whole matrices gathered in turn (collectives, in the same order on every process);
        a process keeps those of the groups it projects (None for the others'), and checks every group as it
        passes by, so that every process names the same non-finite layers without another collective.

        Returns:
            (stacks, names of the layers holding NaN or Inf).
        """
        stacks, rows = [], []
        for i, g in enumerate(self.groups):
            W = self.matrices(g)
            rows.append(finite_rows(W))
            stacks.append(W if self.sharding is None or self.sharding.owns(i) else None)
        by_device = {}  # one host sync per device
        for i, r in enumerate(rows):
            by_device.setdefault(r.device, []).append(i)
        ok = {}
        for items in by_device.values():
            flags = iter(torch.cat([rows[i] for i in items]).tolist())
            ok.update({i: [next(flags) for _ in self.groups[i].names] for i in items})
        return stacks, [n for i, g in enumerate(self.groups) for n, good in zip(g.names, ok[i]) if not good]

    def _non_finite_layers(self, stacks):
        """The names of the layers holding NaN or Inf in the stacks."""
        # The op's cheap per-group flag, but one host sync per device for all groups; only a suspect device
        # pays for the exact test. The op is then told not to check (and sync) again.
        flags = {}
        for i, W in enumerate(stacks):
            flags.setdefault(W.device, []).append((i, finite_flag(W)))
        suspects = [i for items in flags.values() if not bool(torch.stack([f for _, f in items]).all())
                    for i, _ in items]
        bad = []
        for i in suspects:
            bad += [n for n, ok in zip(self.groups[i].names, finite_rows(stacks[i]).tolist()) if not ok]
        return bad

    def _stack_spec(self, i, W):
        """(shape, dtype, device) of group i's stack W, or, where this process does not hold it (None), of the
        stack its owner gathered."""
        if W is not None:
            return W.shape, W.dtype, W.device
        g = self.groups[i]
        param = g.targets[0].param
        return torch.Size((len(g.targets), *matrix_shape(g.shape, g.scheme, g.groups))), param.dtype, param.device

    def _project_stacked(self, stacks, energy, max_rank, nuclear, bad=None):
        """One lowrank_project call per group on its stacked matrices (sharded when a process group is set),
        all groups checked for NaN/Inf first, then the copy back. `bad`: the non-finite layers when the caller
        checked already (FSDP2, whose stacks are None for the groups other processes project)."""
        if bad is None:
            bad = self._non_finite_layers(stacks)
        if bad:
            raise ValueError(f"RankPruner: non-finite weights (NaN or Inf) in layer(s) {', '.join(bad)}; "
                             "no layer was modified")
        want_g = nuclear > 0
        owned = [i for i in range(len(stacks)) if self.sharding is None or self.sharding.owns(i)]
        results = [None] * len(stacks)  # another rank's groups: received below
        # One call for all groups: one host synchronisation per device, not two per group. The projection keeps
        # the weights' dtype whatever autocast region step() is called from.
        with contextlib.ExitStack() as no_autocast:
            for device_type in {stacks[i].device.type for i in owned}:
                no_autocast.enter_context(torch.autocast(device_type, enabled=False))
            # nd's [B, n, c, kh*kw]: one batch for every filter of the group, as [B*n, c, kh*kw]
            out = trp_kernels.lowrank_project_many([stacks[i].reshape(-1, *stacks[i].shape[-2:]) for i in owned],
                                                   energy, max_rank=max_rank, subgradient=want_g,
                                                   warms=[self.groups[i].warm for i in owned], check_finite=False)
        for i, (W_low, rank, G) in zip(owned, out):
            W = stacks[i]
            results[i] = (W_low.view(W.shape), rank.view(W.shape[:-2]), G.view(W.shape) if G is not None else None)
        self._finish(stacks, results, range(len(stacks)), want_g)

    def _finish(self, stacks, results, changed, want_g):
        """Every process's results of the groups `changed` (exchanged under sharding), written back; each a
        (W_low, rank, G) tuple for the groups this process owns, None for the others'."""
        changed = list(changed)
        if self.sharding is not None:
            specs = [self._stack_spec(i, W) for i, W in enumerate(stacks)]
            results = self.sharding.exchange(results, [
                ((shape, dtype, device), (shape[:-2], torch.int64, device), (shape, dtype, device) if want_g else None)
                if i in changed else () for i, (shape, dtype, device) in enumerate(specs)])
        for i in changed:
            W_low, rank, G = results[i]
            self.write_back(self.groups[i], W_low)
            self.groups[i].rank, self.groups[i].G = rank, G

    @torch.no_grad()
    def cut(self, decide):
        """Truncates layers below the ranks of the latest projection, as `decide` says from their spectra: the
        budget's step of one rank in the layers where a component is worth least (trp.prune.budget.cut_to),
        which a uniform energy cannot make. Under sharding each group's owner computes its SVD, the spectra
        are exchanged so that every process decides the same, and the truncated groups are exchanged as a
        projection's are.

        Args:
            decide: a function of {layer name: singular values in float64, descending ([K]; [n, K] per filter
                or group)} returning {layer name: its new rank}, at most its rank (a layer it lacks keeps its
                own). Every matrix of a layer keeps at most that many components.

        Returns:
            What decide returned.
        """
        if self.sharded:
            stacks, _ = self._gathered_stacks()
        else:
            stacks = [self.matrices(g) for g in self.groups]
        owned = [i for i in range(len(stacks)) if self.sharding is None or self.sharding.owns(i)]
        results = [None] * len(stacks)
        with contextlib.ExitStack() as no_autocast:
            for device_type in {stacks[i].device.type for i in owned}:
                no_autocast.enter_context(torch.autocast(device_type, enabled=False))
            sigmas = [(torch.linalg.svdvals(W.to(torch.float64)),) if i in owned else None
                      for i, W in enumerate(stacks)]
            if self.sharding is not None:
                sigmas = self.sharding.exchange(sigmas, [
                    ((shape[:-2] + (min(shape[-2:]),), torch.float64, device),)
                    for shape, dtype, device in (self._stack_spec(i, W) for i, W in enumerate(stacks))])
            caps = decide({n: S for g, (S,) in zip(self.groups, sigmas) for n, S in zip(g.names, S.unbind(0))})
            changed = [i for i, g in enumerate(self.groups)
                       if any(caps.get(n, r) < r for n, r in zip(g.names, self.ranks_of(g)))]
            for i in changed:
                if i in owned:  # the vectors, of the groups cut only
                    results[i] = self._truncated(self.groups[i], stacks[i], caps)
        self._finish(stacks, results, changed, any(g.G is not None for g in self.groups))
        return caps

    @staticmethod
    def ranks_of(group):
        """The layer ranks of a projected group: nd and grouped convs need the largest rank of their filters
        (groups)."""
        return group.rank.reshape(len(group.names), -1).amax(1).tolist()

    @staticmethod
    def _truncated(group, W, caps):
        """(W_low, rank, G) of a group whose layers keep at most caps[name] components per matrix: the float64
        SVD truncated where a matrix is above its cap, the other matrices as they are, bit for bit."""
        U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
        cap = torch.tensor([caps.get(n, min(W.shape[-2:])) for n in group.names], device=group.rank.device)
        rank = torch.minimum(group.rank, cap.view(-1, *[1] * (group.rank.dim() - 1)))
        keep = (torch.arange(S.shape[-1], device=S.device) < rank.to(S.device).unsqueeze(-1)).to(S.dtype)
        cut = (rank < group.rank).to(W.device)[..., None, None]
        W_low = torch.where(cut, ((U * (S * keep).unsqueeze(-2)) @ Vh).to(W.dtype), W)
        G = None if group.G is None else torch.where(cut, ((U * keep.unsqueeze(-2)) @ Vh).to(group.G.dtype), group.G)
        return W_low, rank, G

    # --- the nuclear-norm term and restored states ---------------------------------------------------------
    @torch.no_grad()
    def add_subgradients(self, nuclear):
        """Adds nuclear * U_k V_k^T of the latest projection to the weights' .grad (frozen weights skipped).

        Args:
            nuclear: the nuclear-norm weight, a float.
        """
        for g in self.groups:
            if g.G is None:
                continue
            sub = from_matrix(g.G, g.scheme, g.shape, g.groups).unbind(0)
            if self.sharded:
                fsdp.add_to_grad_(g.targets, sub, nuclear)
                continue
            grads, updates = [], []
            for t, s in zip(g.targets, sub):
                grad = t.grad_view()  # None for a frozen weight
                if grad is not None:
                    grads.append(grad)
                    updates.append(s.to(grad.dtype))
            if grads:
                torch._foreach_add_(grads, updates, alpha=nuclear)

    def restored(self, g, ranks, subs):
        """(rank, G) of group g from a saved state's per-layer ranks and subgradients (checked).

        Args:
            g: one of the engine's Groups.
            ranks: {layer name: rank} of the state.
            subs: {layer name: subgradient tensor} of the state (empty or None: none).

        Returns:
            (rank, G): an int64 tensor [B] (None unless every layer of g has a rank) and a stacked
            subgradient (None unless every layer has one).

        Raises:
            ValueError: when a rank is not an int >= 0 or a subgradient has the wrong shape.
        """
        param = g.targets[0].param  # not its matrix: a sharded one (FSDP2) would be gathered
        rank = G = None
        if all(ranks.get(n) is not None for n in g.names):
            rank = torch.tensor([checks.integer(ranks[n], f"ranks[{n!r}]", 0) for n in g.names],
                                dtype=torch.int64, device=param.device)
        if subs and all(n in subs for n in g.names):
            G = torch.stack([subs[n] for n in g.names]).to(device=param.device, dtype=param.dtype)
            expected = (len(g.names), *matrix_shape(g.shape, g.scheme, g.groups))
            if tuple(G.shape) != expected:
                raise ValueError(f"subgradients of {', '.join(g.names)} have shape {tuple(G.shape)}, "
                                 f"expected {expected}")
        return rank, G

    def __getstate__(self):
        # pickles and copies do not carry the cached views of this model's weights (a copy's model is another)
        return {**self.__dict__, "inplace_cache": None}


__all__ = ["Engine", "Group"]
