"""Tiny offline models for tests and benchmarks: seeded random weights and a locally trained tokenizer."""
