"""Claims of the prospects a task is writing, and the shared MSAL token caches (issue 16).

Frozen like the baseline: the two tables as this revision creates them, whatever the model says later.

Revision ID: 0002_claims_and_token_caches
Revises: 0001_baseline
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_claims_and_token_caches"
down_revision = "0001_baseline"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "b2b_claims",
        sa.Column("legal_entity", sa.String(16), nullable=False),
        sa.Column("prospect_id", sa.String(255), nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("owner", sa.String(800), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("legal_entity", "prospect_id", "step"),
    )
    op.create_table(
        "b2b_token_caches",
        sa.Column("name", sa.String(400), nullable=False),
        sa.Column("cache", sa.Text, nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("b2b_token_caches")
    op.drop_table("b2b_claims")
