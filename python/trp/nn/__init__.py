"""Factorized modules: the low-rank layers that replace dense convolutions and linear layers."""
