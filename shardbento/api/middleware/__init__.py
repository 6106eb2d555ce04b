"""ASGI middlewares that run before a request reaches an API: ids, auth, limits, docs, fault injection."""
