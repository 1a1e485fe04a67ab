"""After training: decomposition, latency fitting, ONNX export, save/load of model files, records, reports, plots."""
