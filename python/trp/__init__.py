"""Trained Rank Pruning for PyTorch (Xu et al., "Trained Rank Pruning for Efficient Deep Neural Networks").

    pruner = trp.RankPruner(model, scheme="channel", energy=0.9, period=1, nuclear=3e-4)
    ...  pruner.step() before each forward, pruner.regularize() after backward ...
    compact = trp.decompose(model, scheme="channel", threshold=0.05)
"""
from . import adapters, eligibility, integrations, models, modules, rank, schemes
from .adapters import LayerAdapter
from .decompose import decompose, factorized_layers
from .eligibility import register_layer_adapter, register_weight_parametrization
from .deploy import fit_latency, merge_back, round_ranks
from .export import export_onnx
from .flops import count_flops, count_macs, count_params, macs_by_layer, measure_latency
from .io import load, save
from .modules import ChannelFactorizedConv2d, DecoupledConv2d, FactorizedLinear, SpatialFactorizedConv2d
from .pruner import RankPruner
from .report import Report, report
from .schemes import SCHEMES
from .selection import Selection, plan_layers, select_layers, select_targets
from .transformer import SplitMultiheadAttention

__all__ = ["adapters", "eligibility", "integrations", "models", "modules", "rank", "schemes", "SCHEMES", "RankPruner", "decompose",
           "factorized_layers", "select_layers", "select_targets", "plan_layers", "Selection", "LayerAdapter",
           "register_layer_adapter", "register_weight_parametrization", "SplitMultiheadAttention", "ChannelFactorizedConv2d", "SpatialFactorizedConv2d", "DecoupledConv2d", "FactorizedLinear",
           "save", "load", "count_macs", "count_flops", "count_params", "macs_by_layer", "measure_latency",
           "report", "Report", "export_onnx", "fit_latency", "merge_back", "round_ranks"]
