"""The vLLM engine: engine arguments from a catalog spec, and AsyncLLM behind the Engine protocol."""
