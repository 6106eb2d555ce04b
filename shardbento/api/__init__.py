"""The request path every front end shares: Serving, wire models, the error map, middlewares, images."""
