"""The store's schema, as the steps that build it: append-only.

Step *n* (1-based) is applied to a database whose ``PRAGMA user_version`` is
below *n*, each in a transaction of its own that also sets the version, so a
database of any age is brought forward and a crash mid-way leaves a
consistent older schema. A step never changes once released: a later need is
a new step, and a database newer than this list is refused, not guessed at.
"""

from __future__ import annotations

__all__ = ["MIGRATIONS"]

MIGRATIONS: list[str] = [
    # 1: foundation
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        hash BLOB NOT NULL,
        tags TEXT NOT NULL,
        owner TEXT,
        reusable INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0,
        created_by TEXT NOT NULL
    );
    CREATE TABLE nodes (
        name TEXT PRIMARY KEY,
        block_index INTEGER NOT NULL UNIQUE,
        wg_public_key TEXT NOT NULL UNIQUE,
        owner TEXT,
        tags TEXT NOT NULL,
        cert_serial TEXT NOT NULL,
        cert_not_after TEXT NOT NULL,
        enrolled_at TEXT NOT NULL,
        token_id TEXT
    );
    CREATE TABLE certificates (
        serial TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        kind TEXT NOT NULL,
        node TEXT,
        issued_at TEXT NOT NULL,
        not_after TEXT NOT NULL,
        revoked_at TEXT
    );
    CREATE INDEX certificates_node ON certificates(node);
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT,
        source TEXT,
        detail TEXT NOT NULL
    );
    CREATE INDEX audit_at ON audit(at);
    """,
    # 2: data plane — where each node can be reached (underlay ip:port candidates)
    """
    ALTER TABLE nodes ADD COLUMN endpoints TEXT NOT NULL DEFAULT '[]';
    """,
    # 3: policy versions, append-only
    """
    CREATE TABLE policies (
        version INTEGER PRIMARY KEY,
        hash TEXT NOT NULL,
        filename TEXT NOT NULL,
        text TEXT NOT NULL,
        applied_by TEXT NOT NULL,
        applied_at TEXT NOT NULL
    );
    """,
    # 4: agents — every agent identity ever issued; live ones have neither revoked_at nor retired_at
    """
    CREATE TABLE agents (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL,
        node TEXT NOT NULL,
        principal TEXT NOT NULL,
        scopes TEXT NOT NULL,
        parent TEXT,
        ipv4 TEXT NOT NULL,
        ipv6 TEXT NOT NULL,
        serial TEXT NOT NULL,
        certificate TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        not_after TEXT NOT NULL,
        ended_at TEXT,
        end_reason TEXT
    );
    CREATE INDEX agents_node ON agents(node);
    CREATE INDEX agents_principal ON agents(principal);
    CREATE INDEX agents_parent ON agents(parent);
    """,
    # 5: identity flow log (denied connections and a sample of accepted ones, as nodes saw them)
    """
    CREATE TABLE flows (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at TEXT NOT NULL,
        node TEXT NOT NULL,
        record TEXT NOT NULL,
        verdict TEXT NOT NULL,
        principal TEXT
    );
    CREATE INDEX flows_at ON flows(at);
    """,
    # 6: routes a node offers as a gateway, and its route tunnel key (a RouteOffer as JSON)
    """
    ALTER TABLE nodes ADD COLUMN routing TEXT NOT NULL DEFAULT '{}';
    """,
    # 7: principals (SPEC §6) — logins in progress, grants a principal signed, and how each agent was authorized.
    # Principal certificates go into `certificates` like every other (kind 'user', node = the device).
    """
    CREATE TABLE logins (
        id TEXT PRIMARY KEY,
        node TEXT NOT NULL,
        local_user TEXT,
        mode TEXT NOT NULL,
        code_hash BLOB,
        device_code TEXT,
        csr TEXT NOT NULL,
        ttl_seconds INTEGER NOT NULL,
        interval INTEGER NOT NULL,
        created_at TEXT NOT NULL,
        expires_at TEXT NOT NULL,
        next_poll_at TEXT NOT NULL,
        state TEXT NOT NULL,
        principal TEXT,
        approved_by TEXT,
        serial TEXT,
        certificate TEXT
    );
    CREATE INDEX logins_code ON logins(code_hash);
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        principal TEXT NOT NULL,
        signer TEXT NOT NULL,
        node TEXT NOT NULL,
        scopes TEXT NOT NULL,
        issued_at TEXT NOT NULL,
        not_after TEXT NOT NULL,
        uses_allowed INTEGER,
        uses INTEGER NOT NULL DEFAULT 0,
        revoked_at TEXT,
        revoked_by TEXT
    );
    CREATE INDEX grants_principal ON grants(principal);
    CREATE INDEX grants_signer ON grants(signer);
    ALTER TABLE agents ADD COLUMN grant_id TEXT;
    ALTER TABLE agents ADD COLUMN grant_signer TEXT;
    CREATE INDEX agents_grant ON agents(grant_id);
    """,
    # 8: nodes behind NAT (SPEC §7) — reflexive and relayed addresses, NAT behaviour, probe credentials (JSON)
    """
    ALTER TABLE nodes ADD COLUMN reach TEXT NOT NULL DEFAULT '{}';
    """,
    # 9: a birth asks whether its addresses are held by a live agent of its node: an index of the live ones,
    # so the question does not read the node's whole history (issue 16)
    """
    CREATE INDEX agents_live_ipv4 ON agents(node, ipv4) WHERE ended_at IS NULL;
    CREATE INDEX agents_live_ipv6 ON agents(node, ipv6) WHERE ended_at IS NULL;
    """,
    # 10: the ports a node serves MCP on (meshctl serve --mcp), a JSON list: senders watch for shadow MCP (issue 15)
    """
    ALTER TABLE nodes ADD COLUMN mcp_ports TEXT NOT NULL DEFAULT '[]';
    """,
    # 11: several controllers (SPEC §8, issue 14) — the mesh's one ordered change log, which every replica tails
    # (change_seq numbers it; netmap_version stays the version of the last netmap delta), and the replicas' URLs
    """
    CREATE TABLE changes (
        seq BIGINT PRIMARY KEY,
        kind TEXT NOT NULL,
        node TEXT,
        about TEXT,
        line TEXT NOT NULL
    );
    CREATE TABLE controllers (url TEXT PRIMARY KEY, joined_at TEXT NOT NULL);
    INSERT INTO controllers(url, joined_at) SELECT value, '' FROM meta WHERE key = 'url';
    INSERT INTO meta(key, value) SELECT 'change_seq', value FROM meta WHERE key = 'netmap_version';
    """,
]
