"""LoRA adapters on the transformers engine: their weights, the layers that apply them, each rank's manager."""
