"""The state store's schema under Alembic: its revisions (`versions/`), and how a store is brought to
this code's head. The store keeps its revision in a version table of its own, `b2b_alembic_version`,
apart from Airflow's `alembic_version`: it may live in Airflow's own database.

Configured here (`config`), with no alembic.ini. After changing the tables in `state.py`, write the
revision that makes the change, against a database at head (autogenerate drafts it; read it before
you keep it), e.g.:

    with sa.create_engine(url).begin() as connection:
        command.revision(migrations.config(connection), "add x", autogenerate=True, rev_id="0002_add_x")
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.operations import Operations
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from b2b_onboarding.errors import ConfigurationError

log = logging.getLogger(__name__)

VERSION_TABLE = "b2b_alembic_version"
# The schema of the last release without migrations: a store it made has no version table.
BASELINE = "0001_baseline"
_TABLE_PREFIX = "b2b_"
_VERSIONS = sa.table(VERSION_TABLE, sa.column("version_num"))


def config(connection: sa.Connection | None = None) -> Config:
    """Alembic's configuration of the store: its scripts in this package, run on `connection`."""
    alembic_config = Config()
    alembic_config.set_main_option("script_location", "b2b_onboarding.store:migrations")
    alembic_config.set_main_option("file_template", "%%(rev)s")  # a new revision's file: its id, e.g. 0002_add_x.py
    alembic_config.attributes["connection"] = connection
    return alembic_config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(config())


def head() -> str:
    """The revision this code's tables are at."""
    return _scripts().get_current_head()


def store_objects(name: str | None, type_: str, _parent_names: object) -> bool:
    """What Alembic compares of a database the store may share with Airflow: the store's own tables."""
    return type_ != "table" or bool(name and name.startswith(_TABLE_PREFIX))


@dataclass(frozen=True)
class Migration:
    """What opening a store did to its schema: from revision `before` (None: no version table) to `after`."""

    before: str | None
    after: str
    # A store of a release before migrations (its tables, no version table), brought under Alembic.
    unversioned_store: bool = False

    def __str__(self) -> str:
        if self.before == self.after:
            return f"already at revision {self.after}, this code's head: nothing to do"
        if self.unversioned_store:
            start = "a store of a release before migrations (no version table; every row kept)"
        elif self.before is None:
            start = "an empty database"
        else:
            start = f"revision {self.before}"
        return f"upgraded from {start} to revision {self.after}"


def _database(connection: sa.Connection) -> str:
    return connection.engine.url.render_as_string(hide_password=True)


def revision(connection: sa.Connection) -> str | None:
    """The store's revision; None when it has none (an empty database, or a store of a release before
    migrations). A revision this code does not know, a newer release's, is a ConfigurationError: such
    a store is never written by this code."""
    # Read here, not through Alembic's MigrationContext, which logs its dialect on every use: in every task's log.
    found: list[str] = []
    if sa.inspect(connection).has_table(VERSION_TABLE):
        found = list(connection.execute(sa.select(_VERSIONS.c.version_num)).scalars())
    known = {script.revision for script in _scripts().walk_revisions()}
    if unknown := [name for name in found if name not in known]:
        raise ConfigurationError(
            f"State store {_database(connection)}: its schema is at revision {', '.join(unknown)}, which this code "
            f"does not know (it knows revisions up to {head()}): a newer release of the product upgraded it. Nothing "
            "was written. Next step: install that release (or a newer one) of airflow-provider-d365-b2b-onboarding "
            "on every worker and every Airflow component that runs the product, then clear the task."
        )  # fmt: skip
    return found[0] if found else None


def upgrade(connection: sa.Connection) -> Migration:
    """Brings the store on `connection` to this code's head: creates it in an empty database, brings a
    store of a release before migrations under Alembic (`adopt` in the baseline, then stamped), and
    runs the revisions it lacks. The caller holds the store's write lock in the connection's
    transaction, so of two processes opening a behind store at once one upgrades, and the other,
    once it has the lock, finds it current."""
    before = revision(connection)
    if before == head():
        return Migration(before, before)
    tables = sa.inspect(connection).get_table_names()
    unversioned = before is None and VERSION_TABLE not in tables and any(
        name.startswith(_TABLE_PREFIX) for name in tables)  # fmt: skip
    if unversioned:
        context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
        with Operations.context(context):
            _scripts().get_revision(BASELINE).module.adopt()
        context.stamp(_scripts(), BASELINE)
    command.upgrade(config(connection), "head")
    done = Migration(before, head(), unversioned)
    log.info("state store %s: %s", _database(connection), done)
    return done
