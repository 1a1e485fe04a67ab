"""What a layer costs: MACs, FLOPs, attention MACs, the one rule for when factorizing pays, latency."""
