"""Alembic's environment of the state store: online only, on the connection that `migrations.config`
carries (the store's own, inside its write transaction, which Alembic then leaves to the caller)."""

from alembic import context

from b2b_onboarding.store import migrations
from b2b_onboarding.store.state import metadata

context.configure(
    connection=context.config.attributes["connection"],
    target_metadata=metadata,
    version_table=migrations.VERSION_TABLE,
    include_name=migrations.store_objects,
    # Drafted revisions alter tables in batches: SQLite alters a table only by copying it.
    render_as_batch=True,
)
with context.begin_transaction():
    context.run_migrations()
