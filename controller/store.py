"""The controller's durable state in SQLite (WAL).

Every change is one ``BEGIN IMMEDIATE`` transaction, so writers are
serialised (no two enrollments can take the same block) and a ``kill -9`` at
any moment leaves either all of a change or none of it. ``synchronous=NORMAL``
in WAL mode keeps every committed transaction across a process crash; only a
power loss can drop the last few (never corrupt the file).

Queries are plain methods of :class:`Tx`, one open transaction. The schema
is :data:`controller.migrations.MIGRATIONS`, applied in order on open.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from meshcore.errors import Conflict, Exhausted, IdmeshError, InvalidInput, Unavailable

from .migrations import MIGRATIONS
from .rows import AgentRow, AuditRow, GrantRow, LoginRow, NodeRow, PolicyRow, TokenRow

__all__ = ["Store", "Tx", "from_iso", "iso"]


def iso(moment: datetime) -> str:
    """UTC, fixed width, so text order is time order; a moment UTC cannot hold (year 1 at +14:00) is bad input."""
    try:
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except OverflowError as exc:
        raise InvalidInput(f"time {moment.isoformat()} is out of range") from exc


def from_iso(text: str) -> datetime:
    return datetime.fromisoformat(text)  # what iso() wrote ("...Z" is UTC); ten times strptime's speed


class Tx:
    """One open transaction; every query of the controller is a method here."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    # meta -----------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self._c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # tokens ---------------------------------------------------------------
    def insert_token(self, row: TokenRow) -> None:
        self._c.execute(
            "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.hash, json.dumps(row.tags), row.owner, int(row.reusable), iso(row.created_at),
             iso(row.expires_at), row.uses, row.created_by),
        )

    def token(self, token_id: str) -> TokenRow | None:
        r = self._c.execute("SELECT * FROM tokens WHERE id = ?", (token_id,)).fetchone()
        if r is None:
            return None
        return TokenRow(r[0], bytes(r[1]), json.loads(r[2]), r[3], bool(r[4]), from_iso(r[5]), from_iso(r[6]), r[7], r[8])

    def tokens(self) -> list[TokenRow]:
        ids = [r[0] for r in self._c.execute("SELECT id FROM tokens ORDER BY created_at")]
        return [t for t in (self.token(i) for i in ids) if t is not None]

    def use_token(self, token_id: str) -> None:
        self._c.execute("UPDATE tokens SET uses = uses + 1 WHERE id = ?", (token_id,))

    def delete_token(self, token_id: str) -> bool:
        return self._c.execute("DELETE FROM tokens WHERE id = ?", (token_id,)).rowcount > 0

    # nodes ----------------------------------------------------------------
    def allocate_block(self, capacity: int) -> int:
        """The next never-used block; only when those run out, the lowest freed one.

        Not reusing a freed block at once keeps a removed node's addresses
        from meeting a new node while old certificates may still be around.
        """
        nxt = int(self.meta("next_block") or 0)
        if nxt < capacity:
            self.set_meta("next_block", str(nxt + 1))
            return nxt
        used = {r[0] for r in self._c.execute("SELECT block_index FROM nodes")}
        for index in range(capacity):
            if index not in used:
                return index
        raise Exhausted(f"all {capacity} node blocks of the mesh are in use")

    def insert_node(self, row: NodeRow) -> None:
        try:
            self._c.execute(
                "INSERT INTO nodes (name, block_index, wg_public_key, owner, tags, cert_serial, cert_not_after, "
                "enrolled_at, token_id, endpoints, routing) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row.name, row.block_index, row.wg_public_key, row.owner, json.dumps(row.tags), row.cert_serial,
                 iso(row.cert_not_after), iso(row.enrolled_at), row.token_id, json.dumps(list(row.endpoints)),
                 json.dumps(row.routing, sort_keys=True)),
            )
        except sqlite3.IntegrityError as exc:
            if "wg_public_key" in str(exc):
                raise Conflict("this WireGuard key is already used by another node") from exc
            if "block_index" in str(exc):
                raise Conflict(f"overlay block {row.block_index} is already allocated (store inconsistent)") from exc
            raise Conflict(f"a node named {row.name!r} is already enrolled") from exc

    def node(self, name: str) -> NodeRow | None:
        r = self._c.execute("SELECT * FROM nodes WHERE name = ?", (name,)).fetchone()
        return None if r is None else _node_row(r)

    def node_cert_serial(self, name: str) -> str | None:
        """The serial of the node's current certificate (None: no such node): what authentication compares."""
        r = self._c.execute("SELECT cert_serial FROM nodes WHERE name = ?", (name,)).fetchone()
        return None if r is None else str(r[0])

    def nodes(self) -> list[NodeRow]:
        return [_node_row(r) for r in self._c.execute("SELECT * FROM nodes ORDER BY name")]

    def set_node_endpoints(self, name: str, endpoints: tuple[str, ...]) -> None:
        self._c.execute("UPDATE nodes SET endpoints = ? WHERE name = ?", (json.dumps(list(endpoints)), name))

    def set_node_routing(self, name: str, routing: dict[str, Any]) -> None:
        self._c.execute("UPDATE nodes SET routing = ? WHERE name = ?", (json.dumps(routing, sort_keys=True), name))

    def set_node_mcp_ports(self, name: str, ports: tuple[int, ...]) -> None:
        self._c.execute("UPDATE nodes SET mcp_ports = ? WHERE name = ?", (json.dumps(list(ports)), name))

    def set_node_reach(self, name: str, reach: dict[str, Any]) -> None:
        self._c.execute("UPDATE nodes SET reach = ? WHERE name = ?", (json.dumps(reach, sort_keys=True), name))

    def set_node_certificate(self, name: str, serial: str, not_after: datetime) -> None:
        self._c.execute("UPDATE nodes SET cert_serial = ?, cert_not_after = ? WHERE name = ?",
                        (serial, iso(not_after), name))

    def delete_node(self, name: str) -> bool:
        return self._c.execute("DELETE FROM nodes WHERE name = ?", (name,)).rowcount > 0

    # certificates ---------------------------------------------------------
    def insert_certificate(self, serial: str, spiffe_id: str, kind: str, node: str | None,
                           issued_at: datetime, not_after: datetime) -> None:
        self._c.execute(
            "INSERT INTO certificates VALUES (?, ?, ?, ?, ?, ?, NULL)",
            (serial, spiffe_id, kind, node, iso(issued_at), iso(not_after)),
        )

    def certificate_revoked(self, serial: str) -> bool | None:
        """None when the controller never issued ``serial``."""
        r = self._c.execute("SELECT revoked_at FROM certificates WHERE serial = ?", (serial,)).fetchone()
        return None if r is None else r[0] is not None

    def revoke_certificate(self, serial: str, at: datetime) -> bool:
        return self._c.execute("UPDATE certificates SET revoked_at = ? WHERE serial = ? AND revoked_at IS NULL",
                               (iso(at), serial)).rowcount > 0

    def revoke_certificates_of_node(self, node: str, at: datetime) -> int:
        return self._c.execute(
            "UPDATE certificates SET revoked_at = ? WHERE node = ? AND revoked_at IS NULL", (iso(at), node)
        ).rowcount

    # policies -------------------------------------------------------------
    def insert_policy(self, row: PolicyRow) -> None:
        self._c.execute("INSERT INTO policies VALUES (?, ?, ?, ?, ?, ?)",
                        (row.version, row.hash, row.filename, row.text, row.applied_by, iso(row.applied_at)))

    def policy(self, version: int | None = None) -> PolicyRow | None:
        if version is None:
            r = self._c.execute("SELECT * FROM policies ORDER BY version DESC LIMIT 1").fetchone()
        else:
            r = self._c.execute("SELECT * FROM policies WHERE version = ?", (version,)).fetchone()
        return None if r is None else PolicyRow(r[0], r[1], r[2], r[3], r[4], from_iso(r[5]))

    def policies(self) -> list[PolicyRow]:
        rows = self._c.execute(
            "SELECT version, hash, filename, '', applied_by, applied_at FROM policies ORDER BY version"
        ).fetchall()
        return [PolicyRow(r[0], r[1], r[2], r[3], r[4], from_iso(r[5])) for r in rows]

    # agents ---------------------------------------------------------------
    def insert_agent(self, row: AgentRow) -> None:
        self._c.execute(
            "INSERT INTO agents VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL, ?, ?)",
            (row.id, row.name, row.node, row.principal, json.dumps(row.scopes), row.parent, row.ipv4, row.ipv6,
             row.serial, row.certificate, iso(row.issued_at), iso(row.not_after), row.grant_id, row.grant_signer),
        )

    def agent(self, agent_id: str) -> AgentRow | None:
        r = self._c.execute("SELECT * FROM agents WHERE id = ?", (agent_id,)).fetchone()
        return None if r is None else _agent_row(r)

    def live_agents(self, now: datetime, node: str | None = None, principal: str | None = None) -> list[AgentRow]:
        where, args = _equal(node=node, principal=principal)
        sql = f"SELECT * FROM agents WHERE ended_at IS NULL AND not_after > ?{where} ORDER BY issued_at"
        return [_agent_row(r) for r in self._c.execute(sql, [iso(now), *args])]

    def address_held(self, node: str, ipv4: str, ipv6: str, now: datetime) -> bool:
        """Whether a live agent of ``node`` holds either address (the partial indexes of step 9 answer it)."""
        sql = ("SELECT EXISTS (SELECT 1 FROM agents WHERE node = ? AND ipv4 = ? AND ended_at IS NULL AND not_after > ?)"
               " OR EXISTS (SELECT 1 FROM agents WHERE node = ? AND ipv6 = ? AND ended_at IS NULL AND not_after > ?)")
        (held,) = self._c.execute(sql, (node, ipv4, iso(now), node, ipv6, iso(now))).fetchone()
        return bool(held)

    def agent_children(self, agent_id: str) -> list[str]:
        return [r[0] for r in self._c.execute("SELECT id FROM agents WHERE parent = ? AND ended_at IS NULL",
                                              (agent_id,))]

    def agents_of_grant(self, grant_id: str) -> list[str]:
        """The live root agents born from a grant (their sub-agents carry it too, and end with them)."""
        return [r[0] for r in self._c.execute(
            "SELECT id FROM agents WHERE grant_id = ? AND parent IS NULL AND ended_at IS NULL", (grant_id,))]

    def end_agent(self, agent_id: str, at: datetime, reason: str) -> None:
        self._c.execute("UPDATE agents SET ended_at = ?, end_reason = ? WHERE id = ? AND ended_at IS NULL",
                        (iso(at), reason, agent_id))
        self._c.execute("UPDATE certificates SET revoked_at = ? WHERE serial = "
                        "(SELECT serial FROM agents WHERE id = ?) AND revoked_at IS NULL", (iso(at), agent_id))

    # logins ---------------------------------------------------------------
    def insert_login(self, row: LoginRow) -> None:
        self._c.execute(
            "INSERT INTO logins VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (row.id, row.node, row.local_user, row.mode, row.code_hash, row.device_code, row.csr, row.ttl_seconds,
             row.interval, iso(row.created_at), iso(row.expires_at), iso(row.next_poll_at), row.state,
             row.principal, row.approved_by, row.serial, row.certificate))

    def login(self, login_id: str) -> LoginRow | None:
        r = self._c.execute("SELECT * FROM logins WHERE id = ?", (login_id,)).fetchone()
        return None if r is None else _login_row(r)

    def pending_login_by_code(self, code_hash: bytes, now: datetime) -> LoginRow | None:
        r = self._c.execute("SELECT * FROM logins WHERE code_hash = ? AND state = 'pending' AND expires_at > ?",
                            (code_hash, iso(now))).fetchone()
        return None if r is None else _login_row(r)

    def pending_logins(self, node: str, now: datetime) -> int:
        return int(self._c.execute("SELECT count(*) FROM logins WHERE node = ? AND state = 'pending' AND "
                                   "expires_at > ?", (node, iso(now))).fetchone()[0])

    def update_login(self, login_id: str, **fields: Any) -> None:
        """Set the given columns (datetimes stored as times) of one login."""
        columns = ", ".join(f"{name} = ?" for name in fields)
        values = [iso(v) if isinstance(v, datetime) else v for v in fields.values()]
        self._c.execute(f"UPDATE logins SET {columns} WHERE id = ?", [*values, login_id])

    # grants ---------------------------------------------------------------
    def insert_grant(self, row: GrantRow) -> None:
        try:
            self._c.execute("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, NULL, NULL)",
                            (row.id, row.principal, row.signer, row.node, json.dumps(row.scopes), iso(row.issued_at),
                             iso(row.not_after), row.uses_allowed))
        except sqlite3.IntegrityError as exc:
            raise Conflict(f"grant {row.id} is already registered") from exc

    def grant(self, grant_id: str) -> GrantRow | None:
        r = self._c.execute("SELECT * FROM grants WHERE id = ?", (grant_id,)).fetchone()
        return None if r is None else _grant_row(r)

    def grants(self, principal: str | None = None, signer: str | None = None) -> list[GrantRow]:
        where, args = _equal(principal=principal, signer=signer)
        return [_grant_row(r) for r in self._c.execute(f"SELECT * FROM grants WHERE 1=1{where} ORDER BY issued_at",
                                                       args)]

    def use_grant(self, grant_id: str) -> None:
        self._c.execute("UPDATE grants SET uses = uses + 1 WHERE id = ?", (grant_id,))

    def revoke_grant(self, grant_id: str, at: datetime, by: str) -> bool:
        return self._c.execute("UPDATE grants SET revoked_at = ?, revoked_by = ? WHERE id = ? AND revoked_at IS NULL",
                               (iso(at), by, grant_id)).rowcount > 0

    # flows ----------------------------------------------------------------
    def insert_flows(self, node: str, records: list[tuple[datetime, str, str | None, str]]) -> None:
        """(at, verdict, principal, record JSON) rows seen by ``node``."""
        self._c.executemany("INSERT INTO flows(at, node, record, verdict, principal) VALUES (?, ?, ?, ?, ?)",
                            [(iso(at), node, record, verdict, principal) for at, verdict, principal, record in records])

    def prune_flows(self, before: datetime, keep: int) -> int:
        """Delete flow records older than ``before``, and all but the newest ``keep``; how many went."""
        gone = self._c.execute("DELETE FROM flows WHERE at < ?", (iso(before),)).rowcount
        newest = self._c.execute("SELECT id FROM flows ORDER BY id DESC LIMIT 1 OFFSET ?", (keep,)).fetchone()
        if newest is not None:
            gone += self._c.execute("DELETE FROM flows WHERE id <= ?", (newest[0],)).rowcount
        return int(gone)

    def flows(self, denied: bool = False, principal: str | None = None, node: str | None = None,
              limit: int = 1000) -> list[tuple[str, str]]:
        """The newest matching (node, record JSON), oldest first."""
        where, args = _equal(principal=principal, node=node)
        deny = " AND verdict = 'deny'" if denied else ""
        sql = f"SELECT node, record FROM flows WHERE 1=1{deny}{where} ORDER BY id DESC LIMIT ?"
        rows = self._c.execute(sql, [*args, limit]).fetchall()
        return [(r[0], r[1]) for r in reversed(rows)]

    # audit ----------------------------------------------------------------
    def audit(self, at: datetime, actor: str, action: str, target: str | None = None,
              source: str | None = None, **detail: Any) -> None:
        self._c.execute(
            "INSERT INTO audit(at, actor, action, target, source, detail) VALUES (?, ?, ?, ?, ?, ?)",
            (iso(at), actor, action, target, source, json.dumps(detail, sort_keys=True, default=str)),
        )

    def audit_rows(self, since: datetime | None = None, action: str | None = None, principal: str | None = None,
                   node_id: str | None = None, limit: int = 1000) -> list[AuditRow]:
        """The newest ``limit`` rows matching every filter given, oldest first.

        ``principal`` matches the identity tuple recorded in the row; ``node_id``
        (a node's SPIFFE ID) matches rows about the node or made by it.
        """
        sql, args = "SELECT * FROM audit WHERE 1=1", []  # type: tuple[str, list[Any]]
        if since is not None:
            sql += " AND at >= ?"
            args.append(iso(since))
        if action is not None:
            sql += " AND (action = ? OR action LIKE ?)"
            args += [action, f"{action}.%"]
        if principal is not None:
            sql += (" AND (json_extract(detail, '$.principal') = ? OR json_extract(detail, '$.owner') = ?"
                    " OR actor = ?)")
            args += [principal, principal, principal]
        if node_id is not None:
            name = node_id.rsplit("/", 1)[-1]
            sql += " AND (target = ? OR actor = ? OR json_extract(detail, '$.node') = ?)"
            args += [node_id, node_id, name]
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        rows = self._c.execute(sql, args).fetchall()
        return [AuditRow(r[0], from_iso(r[1]), r[2], r[3], r[4], r[5], json.loads(r[6])) for r in reversed(rows)]


def _equal(**columns: str | None) -> tuple[str, list[str]]:
    """`` AND column = ?`` for each column given a value (None: not filtered on), and those values."""
    given = {column: value for column, value in columns.items() if value is not None}
    return "".join(f" AND {column} = ?" for column in given), list(given.values())


def _node_row(r: tuple[Any, ...]) -> NodeRow:
    return NodeRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], from_iso(r[6]), from_iso(r[7]), r[8],
                   tuple(json.loads(r[9])), json.loads(r[10]), json.loads(r[11]), tuple(json.loads(r[12])))


def _agent_row(r: tuple[Any, ...]) -> AgentRow:
    return AgentRow(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5], r[6], r[7], r[8], r[9], from_iso(r[10]),
                    from_iso(r[11]), from_iso(r[12]) if r[12] else None, r[13], r[14], r[15])


def _login_row(r: tuple[Any, ...]) -> LoginRow:
    return LoginRow(r[0], r[1], r[2], r[3], bytes(r[4]) if r[4] is not None else None, r[5], r[6], r[7], r[8],
                    from_iso(r[9]), from_iso(r[10]), from_iso(r[11]), r[12], r[13], r[14], r[15], r[16])


def _grant_row(r: tuple[Any, ...]) -> GrantRow:
    return GrantRow(r[0], r[1], r[2], r[3], json.loads(r[4]), from_iso(r[5]), from_iso(r[6]), r[7], r[8],
                    from_iso(r[9]) if r[9] else None, r[10])


class Store:
    """One SQLite database file; transactions are serialised in-process too."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, create: bool = False) -> Store:
        if not create and not path.exists():
            raise Unavailable(f"no controller database at {path}: run 'mesh-controller init' first")
        try:
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            store = cls(conn)
            store._migrate()
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open the controller database {path}: {exc}") from exc
        return store

    def _migrate(self) -> None:
        (version,) = self._conn.execute("PRAGMA user_version").fetchone()
        if version > len(MIGRATIONS):
            raise IdmeshError(f"the database has schema {version}, newer than this controller knows ({len(MIGRATIONS)})")
        for number in range(version, len(MIGRATIONS)):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in MIGRATIONS[number].split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                self._conn.execute(f"PRAGMA user_version = {number + 1}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    @contextmanager
    def transaction(self) -> Iterator[Tx]:
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise Unavailable(f"controller database is unavailable: {exc}") from exc
            try:
                yield Tx(self._conn)
            except sqlite3.OperationalError as exc:  # the disk is full, the file locked or unreadable: not a bug
                self._rollback()
                raise Unavailable(f"controller database is unavailable: {exc}") from exc
            except BaseException:
                self._rollback()
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                # A failed COMMIT (disk full, say) leaves the transaction open: end it, or every later
                # BEGIN fails with "cannot start a transaction within a transaction".
                self._rollback()
                raise Unavailable(f"controller database did not commit: {exc}") from exc

    def _rollback(self) -> None:
        if self._conn.in_transaction:  # SQLite may have rolled back itself (SQLITE_FULL can)
            self._conn.execute("ROLLBACK")

    def close(self) -> None:
        self._conn.close()
