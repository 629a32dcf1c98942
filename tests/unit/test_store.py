"""The controller's store: what a failed transaction leaves behind (nothing)."""

from __future__ import annotations

from pathlib import Path

import pytest

from controller.store import Store
from meshcore.errors import Unavailable


def test_a_commit_that_fails_is_rolled_back_and_the_next_transaction_works(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "c.db", create=True)
    try:
        with store.transaction() as tx:  # a constraint checked only at COMMIT: a way to make COMMIT fail
            tx.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
            tx.execute("CREATE TABLE child (p INTEGER REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)")
        with pytest.raises(Unavailable, match="did not commit: FOREIGN KEY constraint failed"), \
                store.transaction() as tx:
            tx.execute("INSERT INTO child VALUES (42)")
        with store.transaction() as tx:  # before the fix: "cannot start a transaction within a transaction"
            assert tx.execute("SELECT count(*) FROM child").fetchone() == (0,)
    finally:
        store.close()
