"""Benchmarking: an OpenAI streaming load generator, its report, and the `bench` subcommand."""
