"""The `trp` command line: configuration, the training run, checkpoints, data sets and the run lock."""
