"""Baseline: the state store exactly as the last release without migrations made it.

Frozen: the tables, columns, indexes and primary keys that release's StateStore created (its SQLAlchemy
metadata), written out here so that later changes of the model never change what this revision does.

Revision ID: 0001_baseline
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_baseline"
down_revision = None
branch_labels = None
depends_on = None


def _tables() -> dict[str, list[sa.SchemaItem]]:
    """Every table with its columns and primary key, in the order that release created them. New
    objects on each call: a column belongs to the one table it is added to."""
    return {
        "b2b_prospects": [
            sa.Column("legal_entity", sa.String(16), nullable=False),
            sa.Column("prospect_id", sa.String(255), nullable=False),
            sa.Column("stage", sa.String(32), nullable=False),
            sa.Column("prospect", sa.JSON),
            sa.Column("validation_error", sa.Text),
            sa.Column("lead_fields", sa.JSON),
            sa.Column("lead_id", sa.String(64)),
            sa.Column("lead_state", sa.String(64)),
            sa.Column("opportunity_id", sa.String(64)),
            sa.Column("opportunity_state", sa.String(64)),
            sa.Column("account_id", sa.String(64)),
            sa.Column("contact_id", sa.String(64)),
            sa.Column("org_customer_account", sa.String(64)),
            sa.Column("person_customer_account", sa.String(64)),
            sa.Column("org_party_number", sa.String(64)),
            sa.Column("person_party_number", sa.String(64)),
            sa.Column("hierarchy_id", sa.String(64)),
            sa.Column("decision", sa.String(64)),
            sa.Column("qualified_at", sa.String(64)),
            sa.Column("lead_outdated", sa.String(64)),
            sa.Column("email", sa.String(320)),
            sa.Column("last_error", sa.Text),
            sa.Column("last_run_id", sa.String(250)),
            sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("legal_entity", "prospect_id"),
        ],
        "b2b_transitions": [
            sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
            sa.Column("legal_entity", sa.String(16), nullable=False),
            sa.Column("prospect_id", sa.String(255), nullable=False),
            sa.Column("from_stage", sa.String(32)),
            sa.Column("to_stage", sa.String(32), nullable=False),
            sa.Column("run_id", sa.String(250)),
            sa.Column("error", sa.Text),
            sa.Column("at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("detail", sa.Text),
            sa.Column("dag_id", sa.String(250)),
            sa.Column("task_id", sa.String(250)),
            sa.Column("map_index", sa.Integer),
            sa.PrimaryKeyConstraint("id"),
        ],
        "b2b_opportunities": [
            sa.Column("opportunity_id", sa.String(64), nullable=False),
            sa.Column("legal_entity", sa.String(16), nullable=False),
            sa.Column("prospect_id", sa.String(255), nullable=False),
            sa.Column("state", sa.String(16), nullable=False),
            sa.Column("run_id", sa.String(250)),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("opportunity_id"),
        ],
        "b2b_delta_links": [
            sa.Column("entity_set", sa.String(64), nullable=False),
            sa.Column("delta_link", sa.Text, nullable=False),
            sa.Column("run_id", sa.String(250)),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("entity_set"),
        ],
        "b2b_drift_findings": [
            sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
            sa.Column("run_id", sa.String(250), nullable=False),
            sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("kind", sa.String(32), nullable=False),
            sa.Column("legal_entity", sa.String(16)),
            sa.Column("prospect_id", sa.String(255)),
            sa.Column("lead_id", sa.String(64)),
            sa.Column("detail", sa.Text, nullable=False),
            sa.PrimaryKeyConstraint("id"),
        ],
        "b2b_anomalies": [
            sa.Column("legal_entity", sa.String(16), nullable=False),
            sa.Column("prospect_id", sa.String(255), nullable=False),
            sa.Column("kind", sa.String(48), nullable=False),
            sa.Column("detail", sa.Text, nullable=False),
            sa.Column("first_run_id", sa.String(250)),
            sa.Column("last_run_id", sa.String(250)),
            sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
            sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
            sa.Column("times_seen", sa.Integer, nullable=False),
            sa.PrimaryKeyConstraint("legal_entity", "prospect_id", "kind"),
        ],
        "b2b_task_failures": [
            sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
            sa.Column("dag_id", sa.String(250), nullable=False),
            sa.Column("run_id", sa.String(250), nullable=False),
            sa.Column("task_id", sa.String(250), nullable=False),
            sa.Column("map_index", sa.Integer, nullable=False),
            sa.Column("rendered_map_index", sa.String(250)),
            sa.Column("try_number", sa.Integer, nullable=False),
            sa.Column("failed_at", sa.DateTime(timezone=True), nullable=False),
            sa.Column("error", sa.Text, nullable=False),
            sa.Column("legal_entity", sa.String(16)),
            sa.Column("first_id", sa.String(255)),
            sa.Column("last_id", sa.String(255)),
            sa.PrimaryKeyConstraint("id"),
        ],
        "b2b_step_results": [
            sa.Column("dag_id", sa.String(250), nullable=False),
            sa.Column("run_id", sa.String(250), nullable=False),
            sa.Column("task_id", sa.String(250), nullable=False),
            sa.Column("map_index", sa.Integer, nullable=False),
            sa.Column("step", sa.String(64), nullable=False),
            sa.Column("legal_entity", sa.String(16), nullable=False),
            sa.Column("dry_run", sa.Boolean, nullable=False),
            sa.Column("result", sa.Text, nullable=False),
            sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("dag_id", "run_id", "task_id", "map_index"),
        ],
        "b2b_dry_run_rows": [
            sa.Column("run_id", sa.String(250), nullable=False),
            sa.Column("legal_entity", sa.String(16), nullable=False),
            sa.Column("prospect_id", sa.String(255), nullable=False),
            sa.Column("row", sa.Text, nullable=False),
            sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("run_id", "legal_entity", "prospect_id"),
        ],
        "b2b_planned_writes": [
            sa.Column("id", sa.Integer, autoincrement=True, nullable=False),
            sa.Column("run_id", sa.String(250), nullable=False),
            sa.Column("task", sa.String(250), nullable=False),
            sa.Column("system", sa.String(64), nullable=False),
            sa.Column("operation", sa.String(64), nullable=False),
            sa.Column("legal_entity", sa.String(16)),
            sa.Column("prospect_id", sa.String(255)),
            sa.Column("what", sa.Text, nullable=False),
            sa.Column("planned_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("id"),
        ],
        "b2b_tenant_models": [
            sa.Column("run_id", sa.String(250), nullable=False),
            sa.Column("connection", sa.String(250), nullable=False),
            sa.Column("model", sa.Text, nullable=False),
            sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
            sa.PrimaryKeyConstraint("run_id", "connection"),
        ],
    }


# (name, table, columns) of every index.
_INDEXES = (
    ("ix_b2b_prospects_stage", "b2b_prospects", ["stage"]),
    ("ix_b2b_prospects_lead", "b2b_prospects", ["lead_id"]),
    ("ix_b2b_prospects_opportunity", "b2b_prospects", ["opportunity_id"]),
    ("ix_b2b_prospects_email", "b2b_prospects", ["legal_entity", "email"]),
    ("ix_b2b_transitions_prospect", "b2b_transitions", ["legal_entity", "prospect_id"]),
    ("ix_b2b_opportunities_prospect", "b2b_opportunities", ["legal_entity", "prospect_id"]),
    ("ix_b2b_drift_findings_run_id", "b2b_drift_findings", ["run_id"]),
    ("ix_b2b_task_failures_run", "b2b_task_failures", ["dag_id", "run_id"]),
    ("ix_b2b_planned_writes_run_id", "b2b_planned_writes", ["run_id"]),
)


def upgrade() -> None:
    for name, items in _tables().items():
        op.create_table(name, *items)
    for name, table, columns in _INDEXES:
        op.create_index(name, table, columns)


def downgrade() -> None:
    for name in reversed(_tables()):
        op.drop_table(name)  # its indexes go with it


def adopt() -> None:
    """Brings a store that a release before migrations made (it has no version table) to this
    baseline without touching a row, as those releases' own code did when a store opened: the tables
    it lacks are created, the columns added since (all nullable) and the indexes it lacks are added."""
    inspector = sa.inspect(op.get_bind())
    present = set(inspector.get_table_names())
    for name, items in _tables().items():
        if name not in present:
            op.create_table(name, *items)
            continue
        columns = {column["name"] for column in inspector.get_columns(name)}
        for item in items:
            if isinstance(item, sa.Column) and item.name not in columns:
                op.add_column(name, item)
    indexes = {index["name"] for table in present & {table for _, table, _ in _INDEXES}
               for index in inspector.get_indexes(table)}
    for name, table, columns in _INDEXES:
        if name not in indexes:
            op.create_index(name, table, columns)
