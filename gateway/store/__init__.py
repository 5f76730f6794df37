"""PostgreSQL store: migrations, batch writer, registry, series queries, maintenance."""
