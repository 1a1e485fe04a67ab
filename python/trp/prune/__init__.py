"""Pruning during training: RankPruner, its projection engine, warm state, sharding and the budget controller."""
