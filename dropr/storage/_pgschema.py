"""The PostgreSQL store's schema: created and migrated by the storage itself.

Every object lives in one schema of its own (``dropr`` unless told), so a
database can hold several stores and ``DROP SCHEMA … CASCADE`` removes one.
The version of the layout is a row of ``schema_version``; a storage that opens
an older layout runs the missing steps of ``MIGRATIONS`` in one transaction,
under an advisory lock, so several servers starting at once migrate once.
docs/storages.rst describes the tables.

The dedup record ``seen`` is partitioned by the day of the id's time (days
since the epoch, UTC); a partition is made before the first id of its day is
stored and dropped whole once every id it can hold is older than the window.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from psycopg import Connection, errors, sql

from dropr.errors import DroprError

#: Shards of the running totals: an add or an ack updates one, chosen by its
#: transaction id, so no single row is locked by every writer.
USAGE_SHARDS = 16

MS_PER_DAY = 86_400_000

_SCHEMA_RE = re.compile(r"[a-z_][a-z0-9_]{0,47}\Z")

_V1 = f"""
CREATE TABLE messages (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    id uuid NOT NULL,
    priority smallint NOT NULL,
    channel text NOT NULL,
    destination text,
    size integer NOT NULL,
    payload bytea NOT NULL,
    lease_until bigint NOT NULL DEFAULT 0,
    claim bigint
);
CREATE INDEX messages_order ON messages (queue, priority, seq);
CREATE TABLE failed (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    id uuid NOT NULL,
    priority smallint NOT NULL,
    channel text NOT NULL,
    destination text,
    payload bytea NOT NULL,
    reason text NOT NULL,
    failed_at double precision NOT NULL
);
CREATE INDEX failed_order ON failed (queue, seq);
CREATE TABLE seen (
    id uuid NOT NULL,
    day integer NOT NULL,
    PRIMARY KEY (id, day)
) PARTITION BY RANGE (day);
CREATE TABLE usage (
    shard smallint PRIMARY KEY,
    count bigint NOT NULL,
    bytes bigint NOT NULL
);
INSERT INTO usage SELECT s, 0, 0 FROM generate_series(0, {USAGE_SHARDS - 1}) AS s;
CREATE FUNCTION usage_added() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE usage SET count = count + d.c, bytes = bytes + d.b
    FROM (SELECT count(*) AS c, coalesce(sum(size), 0) AS b FROM added) AS d
    WHERE shard = txid_current() % {USAGE_SHARDS} AND d.c > 0;
    RETURN NULL;
END $$;
CREATE FUNCTION usage_removed() RETURNS trigger LANGUAGE plpgsql
SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE usage SET count = count - d.c, bytes = bytes - d.b
    FROM (SELECT count(*) AS c, coalesce(sum(size), 0) AS b FROM gone) AS d
    WHERE shard = txid_current() % {USAGE_SHARDS} AND d.c > 0;
    RETURN NULL;
END $$;
CREATE TRIGGER messages_added AFTER INSERT ON messages
    REFERENCING NEW TABLE AS added FOR EACH STATEMENT EXECUTE FUNCTION usage_added();
CREATE TRIGGER messages_removed AFTER DELETE ON messages
    REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION usage_removed();
"""

#: ``(version, DDL)``: each step brings the layout from ``version - 1``.
MIGRATIONS: list[tuple[int, str]] = [(1, _V1)]
SCHEMA_VERSION = MIGRATIONS[-1][0]


class SchemaTooNew(DroprError):
    """The database holds a store laid out by a newer dropr."""


def validate_schema(name: str) -> str:
    """``name`` if it is a plain lowercase identifier dropr may use as a schema."""
    if not isinstance(name, str) or not _SCHEMA_RE.match(name):
        raise DroprError(
            f"invalid PostgreSQL schema name {name!r}: use 1 to 48 characters "
            "from a-z 0-9 _ starting with a letter or _"
        )
    return name


def migrate(conn: Connection[tuple[Any, ...]], schema: str) -> int:
    """Create or bring up to date the store in ``schema``; returns the version found.

    Runs in the connection's current transaction; the caller commits.
    """
    ident = sql.Identifier(schema)
    # Two servers starting on a new database must not both create it.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dropr:{schema}",))
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
    conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
    row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
    found = int(row[0]) if row and row[0] is not None else 0
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"the store in schema {schema!r} has layout version {found}, newer than "
            f"this dropr knows ({SCHEMA_VERSION}): upgrade dropr on this host"
        )
    for version, ddl in MIGRATIONS:
        if version > found:
            conn.execute(ddl)  # our own constant text
    if found < SCHEMA_VERSION:
        conn.execute("DELETE FROM schema_version")
        conn.execute("INSERT INTO schema_version VALUES (%s)", (SCHEMA_VERSION,))
    return found


def partition_name(day: int) -> str:
    """The name of the partition of ``seen`` holding ids of ``day`` (days since the epoch)."""
    return f"seen_d{day}"


def existing_days(conn: Connection[tuple[Any, ...]], schema: str) -> set[int]:
    """The days that have a partition of ``seen``."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = to_regclass(%s)",
        (f"{schema}.seen",),
    ).fetchall()
    return {int(str(name)[len("seen_d") :]) for (name,) in rows}


def create_day(conn: Connection[tuple[Any, ...]], schema: str, day: int) -> None:
    """Make the partition of ``seen`` for ``day`` unless it exists."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dropr:{schema}:days",))
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
        ).format(
            sql.Identifier(schema, partition_name(day)),
            sql.Identifier(schema, "seen"),
            sql.Literal(day),
            sql.Literal(day + 1),
        )
    )


def drop_day(conn: Connection[tuple[Any, ...]], schema: str, day: int) -> None:
    """Forget every id of ``day`` at once (pruning by partition, no vacuum needed)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"dropr:{schema}:days",))
    conn.execute(
        sql.SQL("DROP TABLE IF EXISTS {}").format(sql.Identifier(schema, partition_name(day)))
    )


class DedupDays:
    """The days that have a partition of ``seen``, as this process knows them.

    ``run(work)`` runs ``work(conn)`` in a transaction (the storage's
    ``_run``).  What is known is only what committed: a rolled-back
    ``CREATE`` made nothing.
    """

    def __init__(self, schema: str, run: Callable[[Callable[[Any], Any]], Any]) -> None:
        self.schema = schema
        self._run = run
        self._known: set[int] = set()

    def forget(self) -> None:
        """Look at the catalog again next time (another process may have changed it)."""
        self._known.clear()

    def ensure(self, days: set[int]) -> None:
        """Make the partitions of ``days`` that do not exist."""
        missing = days - self._known
        if not missing:
            return

        def work(conn: Connection[tuple[Any, ...]]) -> set[int]:
            found = existing_days(conn, self.schema)
            for day in sorted(missing - found):
                create_day(conn, self.schema, day)
                found.add(day)
            return found

        self._known = self._run(work)

    def prune(self, keep_from: int) -> bool:
        """Drop the partitions of days before ``keep_from``; False if it must wait."""

        def work(conn: Connection[tuple[Any, ...]]) -> set[int]:
            # Dropping waits for adds in flight; never hold them up for long.
            conn.execute("SET LOCAL lock_timeout = '2s'")
            found = existing_days(conn, self.schema)
            for day in sorted(d for d in found if d < keep_from):
                drop_day(conn, self.schema, day)
                found.discard(day)
            return found

        try:
            self._known = self._run(work)
        except errors.LockNotAvailable:
            return False
        return True
