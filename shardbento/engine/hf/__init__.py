"""The transformers engine: loading and placement, CPU kernels, the in-process engine."""
