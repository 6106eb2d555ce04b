"""Continuous batching: scheduler decisions and loop, the model runner, KV slots, the sampler."""
