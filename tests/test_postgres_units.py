"""The PostgreSQL store's parts that need no database: fast tier.

What a server answers when the store's database is down, and that no
message shows a password, whatever libpq put in its own text.
"""

from __future__ import annotations

import pytest

from dropr.errors import DroprError, StorageUnavailable
from dropr.server._answers import refusal_for
from dropr.storage._pgconn import PgConnections
from dropr.storage._pgschema import validate_schema


def test_a_store_that_is_unavailable_is_answered_503_retry() -> None:
    refusal = refusal_for(StorageUnavailable("PostgreSQL store postgresql://u:***@db/x is down"))
    assert refusal is not None
    assert (refusal.status, refusal.retry) == (503, True)
    # The answer names no host: the store's spec is the operator's business.
    assert "db" not in refusal.reason and "postgresql" not in refusal.reason


def test_an_unavailable_store_names_no_password() -> None:
    conn = PgConnections("postgresql://dropr:pa55word@db.example:5432/dropr", "dropr", 2, 1.0)
    assert conn.where == "postgresql://dropr:***@db.example:5432/dropr"
    # libpq may quote the connection string; the password never reaches the message.
    error = conn._unavailable(OSError("could not connect with password=pa55word to db.example"))
    assert "pa55word" not in str(error)
    assert "postgresql://dropr:***@db.example:5432/dropr" in str(error)
    assert "retry" in str(error)


@pytest.mark.parametrize("name", ["dropr", "_x", "store_2"])
def test_schema_names(name: str) -> None:
    assert validate_schema(name) == name


@pytest.mark.parametrize("name", ["", "Dropr", "2x", "a-b", "x" * 49, "a; DROP TABLE t"])
def test_bad_schema_names_are_refused(name: str) -> None:
    with pytest.raises(DroprError, match="schema name"):
        validate_schema(name)
