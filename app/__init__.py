"""The HTTP face of datadiet: ``app.main.create_app`` builds the API.

Importing ``app`` imports nothing else: FastAPI, Redis and SQLAlchemy load with the modules that need
them (``uvicorn --factory app.main:create_app``), so ``app.cli`` and the demo start without them.
"""
