"""Alembic environment: runs on the connection that ``store.meta.migrate`` hands over."""

from alembic import context
from sqlalchemy import text

from store.meta import Base

connection = context.config.attributes["connection"]
if connection.dialect.name == "postgresql":
    # Several processes may start at once (API workers, trainer): one migrates, the others wait.
    connection.execute(text("SELECT pg_advisory_xact_lock(726340001)"))
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
