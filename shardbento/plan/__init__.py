"""Planning before a byte loads: memory arithmetic, the layer split, the mode, preflight, the plan CLI."""
