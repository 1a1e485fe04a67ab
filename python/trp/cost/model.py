"""A network's conv MACs as a function of the ranks of its selected layers (the cost model of budgeted TRP).

From one forward pass: a layer's dense MACs, and the MACs per unit of rank of its factorized form (the
factorized module is counted at rank 1: factorized MACs are linear in the rank). A layer is factorized only
below the rank at which factorizing stops paying (trp.cost.macs.pay_rank); at or above it, and before any
projection, it counts as dense."""
import torch
import torch.nn as nn

from trp._utils import checks
from trp.core import eligibility
from trp.core.schemes import layer_matrix_shape, layer_scheme
from trp.cost.flops import count_macs, io_shapes
from trp.cost.macs import conv_macs, dense_macs_per_output_pixel, input_shape, pay_rank
from trp.nn.modules import FACTORIZED, FactorizedLinear, conv_padding4


def check_target_speedup(target, name="target_speedup"):
    """Checks a target speed-up (dense conv MACs / compact conv MACs).

    Args:
        target: the value to check, a finite number > 1.
        name: the argument's name in the error message. Default "target_speedup".

    Returns:
        The target, as a float.

    Raises:
        ValueError: when target is not a finite number > 1.
    """
    return checks.real(target, name, 1.0, low_open=True, what=" (dense conv MACs / compact conv MACs)")


def _meta(shape):
    return torch.empty(shape, device="meta")


class CostModel:
    """Conv MACs of `model` at `input_size` as a function of the ranks of `layers` under `scheme`.

    Attributes per layer name: dense (MACs), per_rank (MACs of the factorized layer per unit of rank),
    pay_rank (the largest rank at which the factorized layer costs less than the dense one; 0: never) and
    full_rank.

    Args:
        model: the nn.Module (run once at input_size).
        scheme: "channel", "spatial", "nd", "nd_pointwise" or "nd_depthwise".
        layers: the selected layers, a list of (name, module) pairs, as select_layers gives.
        input_size: (C, H, W) or (N, C, H, W).

    Raises:
        ValueError: when a layer is not Conv2d- or Linear-like, or did not run at this input size.
    """

    def __init__(self, model, scheme, layers, input_size):
        shape = input_shape(input_size)
        self.scheme, self.names = scheme, [n for n, _ in layers]
        self.linear = any(eligibility.kind_of(m) == "linear" for _, m in layers)  # then Linear MACs count too
        self.total_dense = count_macs(model, shape, linear=self.linear)
        seen = io_shapes(model, layers, shape)
        self.dense, self.per_rank, self.pay_rank, self.full_rank = {}, {}, {}, {}
        for name, layer in layers:
            adapter, _, why = eligibility.resolve(layer)
            if adapter is None:
                raise ValueError(f"target_speedup counts the MACs of Conv2d- and Linear-like layers; {name!r} is "
                                 f"not one ({why}): exclude it")
            module = eligibility.dense_equivalent(layer, adapter)  # the geometry of what the layer computes
            if name not in seen:
                raise ValueError(f"layer {name!r} did not run in a forward pass of input_size {shape}: its "
                                 "cost is unknown; exclude it")
            x, y = seen[name]
            if isinstance(module, nn.Linear):
                one = FactorizedLinear(module.in_features, module.out_features, 1, bias=False, device="meta")
                tokens = x.numel() // module.in_features
                dense, per_rank = tokens * dense_macs_per_output_pixel(module), tokens * one.macs_per_output_pixel()
            else:
                one = FACTORIZED[layer_scheme(scheme, module)](
                    module.in_channels, module.out_channels, module.kernel_size, 1, module.stride,
                    conv_padding4(module), module.dilation, bias=False, device="meta", groups=module.groups)
                dense, per_rank = conv_macs(module, _meta(x), _meta(y)), conv_macs(one, _meta(x), _meta(y))
            dims = layer_matrix_shape(module, scheme)
            self.full_rank[name] = min(dims[-2:])
            self.pay_rank[name] = min(self.full_rank[name], pay_rank(one, module))  # decompose's rule
            self.dense[name], self.per_rank[name] = dense, per_rank
        self.fixed = self.total_dense - sum(self.dense.values())  # layers that are not selected

    def layer_macs(self, name, rank, capped=True):
        """MACs of one layer at `rank` (None: dense). capped=False: the factorized cost even above the
        paying rank (what the controller steers: it moves with every rank, where the real cost is flat).

        Args:
            name: the layer's name.
            rank: its rank, an int, or None (dense).
            capped: count the dense cost at ranks above the paying rank. Default True.

        Returns:
            The layer's MACs, an int.
        """
        if rank is None or (capped and rank > self.pay_rank[name]):
            return self.dense[name]
        return max(int(rank), 1) * self.per_rank[name]

    def macs(self, ranks, capped=True):
        """Conv MACs of the network with the selected layers at `ranks`.

        Args:
            ranks: {layer name: rank or None (dense)}; a layer it lacks counts as dense.
            capped: as for layer_macs. Default True.

        Returns:
            The network's MACs, an int.
        """
        return self.fixed + sum(self.layer_macs(n, ranks.get(n), capped) for n in self.names)

    def speedup(self, ranks, capped=True):
        """The conv-MAC speed-up (dense MACs / MACs at `ranks`) of the network.

        Args:
            ranks: {layer name: rank or None (dense)}, as for macs().
            capped: as for layer_macs. Default True.

        Returns:
            The speed-up, a float.
        """
        return self.total_dense / self.macs(ranks, capped)

    def max_speedup(self):
        """The speed-up of rank 1 in every layer where factorizing pays."""
        return self.speedup({n: 1 for n in self.names})

    def check_target(self, target, name="target_speedup"):
        """Checks that a target speed-up is > 1 and reachable (<= max_speedup()).

        Args:
            target: the target speed-up, a finite number.
            name: the argument's name in the error message. Default "target_speedup".

        Returns:
            The target, as a float.

        Raises:
            ValueError: when target is not > 1 or is above max_speedup().
        """
        target = check_target_speedup(target, name)
        top = self.max_speedup()
        if target > top * (1 + 1e-12):
            raise ValueError(f"{name}={target:g} is above what rank 1 in every selected layer gives "
                             f"({top:.3f}x for these {len(self.names)} layers at this input size)")
        return target


__all__ = ["CostModel", "check_target_speedup"]
