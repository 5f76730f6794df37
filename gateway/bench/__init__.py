"""Benchmarks that print figures: ``eldercare bench ingest`` and ``eldercare bench memory``."""
