"""The OpenAI-compatible /v1 API: wire models, the serving class, formatting, routes."""
