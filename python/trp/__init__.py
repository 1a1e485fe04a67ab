"""Trained Rank Pruning for PyTorch (Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks").

    pruner = trp.RankPruner(model, scheme="channel", energy=0.9, period=1, nuclear=3e-4)
    ...  pruner.step() before each forward, pruner.regularize() after backward ...
    compact = trp.decompose(model, scheme="channel", threshold=0.05)

The package is layered (docs/design/layout.md): _utils < core < nn < cost < prune < deploy < app, integrations.
"""
from trp import integrations, models
from trp.core import adapters, eligibility, rank, schemes
from trp.core.adapters import LayerAdapter
from trp.core.attention import SplitMultiheadAttention
from trp.core.eligibility import register_layer_adapter, register_weight_parametrization
from trp.core.schemes import SCHEMES
from trp.core.selection import Selection, plan_layers, select_layers, select_targets
from trp.cost.flops import count_flops, count_macs, count_params, macs_by_layer, measure_latency
from trp.deploy.decompose import decompose, factorized_layers
from trp.deploy.export import export_onnx
from trp.deploy.io import load, save
from trp.deploy.latency import fit_latency, merge_back, round_ranks
from trp.deploy.latency_budget import Runtime
from trp.deploy.report import Report, report
from trp.nn import modules
from trp.nn.modules import (
                            ChannelFactorizedConv2d,
                            DecoupledConv2d,
                            DepthwiseDecoupledConv2d,
                            FactorizedLinear,
                            SpatialFactorizedConv2d,
)
from trp.prune.pruner import RankPruner

__all__ = ["adapters", "eligibility", "integrations", "models", "modules", "rank", "schemes", "SCHEMES", "RankPruner",
           "decompose", "factorized_layers", "select_layers", "select_targets", "plan_layers", "Selection",
           "LayerAdapter", "register_layer_adapter", "register_weight_parametrization", "SplitMultiheadAttention",
           "ChannelFactorizedConv2d", "SpatialFactorizedConv2d", "DecoupledConv2d", "DepthwiseDecoupledConv2d",
           "FactorizedLinear",
           "save", "load", "count_macs", "count_flops", "count_params", "macs_by_layer", "measure_latency",
           "report", "Report", "export_onnx", "fit_latency", "merge_back", "round_ranks",
           "Runtime"]
