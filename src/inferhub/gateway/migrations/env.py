"""Alembic environment: runs the gateway migrations on the connection `Database.migrate` hands in."""

from __future__ import annotations

from alembic import context

from inferhub.gateway.db import VERSION_TABLE
from inferhub.gateway.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the gateway migrations through inferhub.gateway.db.Database.migrate")
context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    render_as_batch=True,  # SQLite can only ALTER tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
