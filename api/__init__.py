"""The FastAPI application (a later issue)."""
