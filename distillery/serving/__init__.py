"""The HTTP server: settings, schemas, routes, the batching engine, metrics."""
