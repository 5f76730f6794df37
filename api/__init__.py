"""The FastAPI application: ``app.py`` builds it, ``deps.py`` holds its dependencies,
``routes/`` one module per resource."""
