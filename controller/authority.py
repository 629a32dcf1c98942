"""The controller's data directory: the CA, its TLS and admin credentials.

Layout of ``--data DIR`` (keys 0600, the directory 0700)::

    ca.crt  ca.key          the mesh CA (Ed25519)
    server.crt server.key   the API's TLS certificate, issued by the mesh CA
    admin.conf              the admin credential meshctl uses (0600)
    controller.db           the SQLite store (WAL), or
    controller.conf         where the PostgreSQL store is, and this replica's URL (0600)
    jwt.key                 the JWT-SVID signing key (ES256; made when first needed: controller.workload)

``init`` builds everything in memory first and writes each file with
O_EXCL, removing what it wrote if a later step fails: a failed init changes
nothing and a second init never overwrites a CA.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from joserfc.jwk import ECKey

from meshcore.addressing import CGNAT, MeshPrefixes, random_ula48
from meshcore.errors import Conflict, InvalidInput, PermissionDenied, Unavailable
from meshcore.identity import (
    CertificateAuthority,
    Claims,
    SpiffeId,
    build_leaf,
    cert_pem,
    key_pem,
    load_certificate,
    new_ca,
)

from .store import Store, is_postgres

__all__ = ["DataDir", "JwtKey", "default_url", "init_data_dir", "load_authority", "parse_url"]

ADMIN_CERT_TTL = timedelta(days=365)
SERVER_CERT_TTL = timedelta(days=365)
DEFAULT_NODE_CERT_TTL = timedelta(hours=24)


@dataclass(frozen=True)
class DataDir:
    path: Path

    @property
    def ca_cert(self) -> Path:
        return self.path / "ca.crt"

    @property
    def ca_key(self) -> Path:
        return self.path / "ca.key"

    @property
    def jwt_key(self) -> Path:
        return self.path / "jwt.key"

    @property
    def server_cert(self) -> Path:
        return self.path / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.path / "server.key"

    @property
    def admin_conf(self) -> Path:
        return self.path / "admin.conf"

    @property
    def database(self) -> Path:
        return self.path / "controller.db"

    @property
    def conf(self) -> Path:
        """``{"db": URL, "url": URL}`` (0600: the database URL may hold a password), for a PostgreSQL store:
        where the store is, and this replica's own URL."""
        return self.path / "controller.conf"

    def replica(self) -> tuple[Path | str, str | None]:
        """Where the store is, and this replica's URL (None: the mesh's, an SQLite controller)."""
        try:
            doc = json.loads(self.conf.read_text())
        except FileNotFoundError:
            return self.database, None
        except (OSError, ValueError) as exc:
            raise Unavailable(f"cannot read {self.conf}: {exc}") from exc
        return str(doc["db"]), str(doc["url"])


def default_url() -> str:
    return f"https://{socket.gethostname()}:8443"


def parse_url(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    try:
        port = parts.port or 443
    except ValueError as exc:
        raise InvalidInput(f"invalid controller URL {url!r}: {exc}") from exc
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/"):
        raise InvalidInput(f"invalid controller URL {url!r}: expected https://HOST:PORT")
    return parts.hostname, port


def _write_new(path: Path, data: str, mode: int, written: list[Path]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    written.append(path)
    with os.fdopen(fd, "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _prepare(data: Path, *existing: Path) -> None:
    if any(p.exists() for p in existing):
        raise Conflict(f"{data} already holds a mesh CA; refusing to overwrite it (use another --data directory)")
    try:
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(data, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
    except OSError as exc:
        raise PermissionDenied(f"cannot write to the data directory {data}: {exc.strerror or exc}") from exc


def _credentials(ca: CertificateAuthority, domain: str, url: str, urls: list[str],
                 now: datetime) -> tuple[dict[str, str], list[tuple[SpiffeId, x509.Certificate]]]:
    """This replica's files (name -> PEM) — its TLS certificate for ``url``'s host, an admin credential — and
    the certificates to register."""
    host, _ = parse_url(url)
    server_key = ed25519.Ed25519PrivateKey.generate()
    try:
        ip = ipaddress.ip_address(host)
        names: tuple[tuple[str, ...], tuple[object, ...]] = ((), (ip,))
    except ValueError:
        names = ((host,), ())
    server_id = SpiffeId(domain, "controller", host if not names[1] else "controller")
    server = build_leaf(ca, server_key.public_key(), server_id, Claims(kind="controller"), now,
                        SERVER_CERT_TTL, dns_names=names[0], ip_addresses=names[1])
    admin_key = ed25519.Ed25519PrivateKey.generate()
    admin_id = SpiffeId(domain, "admin", "admin")
    admin = build_leaf(ca, admin_key.public_key(), admin_id, Claims(kind="admin"), now, ADMIN_CERT_TTL)
    admin_conf = {"url": url, "urls": urls, "domain": domain, "ca_fingerprint": ca.fingerprint,
                  "ca": cert_pem(ca.cert), "certificate": cert_pem(admin), "key": key_pem(admin_key)}
    files = {"server.key": key_pem(server_key), "server.crt": cert_pem(server),
             "admin.conf": json.dumps(admin_conf, indent=2) + "\n"}
    return files, [(server_id, server), (admin_id, admin)]


def _register(tx: Any, actor: str, certificates: list[tuple[SpiffeId, x509.Certificate]], now: datetime) -> None:
    for sid, cert in certificates:
        tx.insert_certificate(format(cert.serial_number, "x"), str(sid), sid.kind, None, now, cert.not_valid_after_utc)
        tx.audit(now, actor, "certificate.issued", str(sid), serial=format(cert.serial_number, "x"),
                 not_after=cert.not_valid_after_utc)


def _write_all(data: Path, files: dict[str, str], written: list[Path]) -> None:
    for name, text in files.items():
        _write_new(data / name, text, 0o644 if name.endswith(".crt") else 0o600, written)


def _undo(written: list[Path], exc: BaseException, data: Path) -> None:
    for path in written:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            p.unlink(missing_ok=True)
    if isinstance(exc, OSError):
        raise PermissionDenied(f"cannot write to the data directory {data}: {exc.strerror or exc}") from exc


def init_data_dir(
    data: Path,
    domain: str,
    url: str,
    now: datetime,
    block_v4: int = 26,
    block_v6: int = 64,
    node_cert_ttl: timedelta = DEFAULT_NODE_CERT_TTL,
    db: str | None = None,
) -> dict[str, str]:
    """Create a mesh: CA, server certificate, admin credential, store (SQLite in ``data``, or the PostgreSQL
    database ``db``, which then holds no mesh yet)."""
    dd = DataDir(data)
    parse_url(url)
    prefixes = MeshPrefixes(CGNAT, random_ula48(), block_v4, block_v6)
    if db is not None and not is_postgres(db):
        raise InvalidInput(f"--db {db!r}: expected a PostgreSQL URL, postgresql://USER@HOST/DB (without --db: "
                           "SQLite in the data directory)")
    _prepare(data, dd.ca_key, dd.ca_cert, dd.database, dd.conf)
    ca = new_ca(domain, ed25519.Ed25519PrivateKey.generate(), now)
    files, certificates = _credentials(ca, domain, url, [url], now)
    written: list[Path] = []
    store = Store.open(db) if db is not None else None  # an unreachable database: nothing written yet
    try:
        _write_new(dd.ca_key, key_pem(ca.key), 0o600, written)
        _write_new(dd.ca_cert, cert_pem(ca.cert), 0o644, written)
        _write_all(data, files, written)
        if store is None:
            written.append(dd.database)
            store = Store.open(dd.database, create=True)
        else:
            _write_new(dd.conf, json.dumps({"db": db, "url": url}, indent=2) + "\n", 0o600, written)
        with store.transaction() as tx:
            if tx.meta("domain"):
                raise Conflict(f"the database {store.description} already holds the mesh {tx.meta('domain')}: "
                               "add this controller to it with 'mesh-controller join'")
            for key, value in {
                "domain": domain,
                "url": url,
                "prefix_v4": str(prefixes.v4),
                "prefix_v6": str(prefixes.v6),
                "block_v4": str(prefixes.block_v4),
                "block_v6": str(prefixes.block_v6),
                "node_cert_ttl": str(int(node_cert_ttl.total_seconds())),
                "ca_fingerprint": ca.fingerprint,
                "ca_cert": cert_pem(ca.cert),
            }.items():
                tx.set_meta(key, value)
            tx.add_controller(url, now)
            tx.audit(now, "mesh-controller init", "ca.created", f"spiffe://{domain}", fingerprint=ca.fingerprint)
            _register(tx, "mesh-controller init", certificates, now)
    except BaseException as exc:
        _undo(written, exc, data)
        raise
    finally:
        if store is not None:
            store.close()
    return {
        "domain": domain,
        "url": url,
        "ca_fingerprint": ca.fingerprint,
        "prefix_v4": str(prefixes.v4),
        "prefix_v6": str(prefixes.v6),
        "admin_conf": str(dd.admin_conf),
        "database": "sqlite" if db is None else "postgresql",
    }


def join_data_dir(data: Path, db: str, url: str, ca_key_file: Path, now: datetime) -> dict[str, Any]:
    """Add a replica: the mesh in PostgreSQL database ``db``, served from ``data`` at ``url``.

    Replicas share the mesh CA's key (as SPIRE servers in HA share one
    datastore and Teleport keeps its CA in the backend): ``ca_key_file`` is
    the first controller's ``ca.key``, copied over a channel you trust. It
    never enters the database, so a dump of the database signs nothing; it
    must match the CA the database was made with, or nothing is written.
    """
    from .netmap import log_delta

    if not is_postgres(db):
        raise InvalidInput(f"--db {db!r}: a replica joins a PostgreSQL database (postgresql://...); an SQLite "
                           "store serves one controller")
    dd = DataDir(data)
    parse_url(url)
    _prepare(data, dd.ca_key, dd.ca_cert, dd.database, dd.conf)
    store = Store.open(db)
    written: list[Path] = []
    try:
        with store.transaction() as tx:
            domain, ca_pem = tx.meta("domain"), tx.meta("ca_cert")
            if not domain or not ca_pem:
                raise Unavailable(f"the database {store.description} holds no mesh: run 'mesh-controller init "
                                  "--db' first")
            key = _read_ca_key(ca_key_file)
            ca = CertificateAuthority(load_certificate(ca_pem.encode()), key)
            if key.public_key().public_bytes_raw() != _public_raw(ca.cert):
                raise PermissionDenied(f"{ca_key_file} is not the key of the mesh CA of {domain} (sha256:"
                                       f"{ca.fingerprint}) in this database")
            known = tx.controllers()
            urls = known if url in known else [*known, url]
        files, certificates = _credentials(ca, domain, url, urls, now)
        _write_new(dd.ca_key, key_pem(ca.key), 0o600, written)
        _write_new(dd.ca_cert, cert_pem(ca.cert), 0o644, written)
        _write_all(data, files, written)
        _write_new(dd.conf, json.dumps({"db": db, "url": url}, indent=2) + "\n", 0o600, written)
        with store.transaction() as tx:
            if tx.add_controller(url, now):
                log_delta(tx, controllers=tuple(tx.controllers()))  # every node learns of this replica
            tx.audit(now, "mesh-controller join", "controller.joined", url, fingerprint=ca.fingerprint)
            _register(tx, "mesh-controller join", certificates, now)
    except BaseException as exc:
        _undo(written, exc, data)
        raise
    finally:
        store.close()
    return {"domain": domain, "url": url, "controllers": urls, "ca_fingerprint": ca.fingerprint,
            "admin_conf": str(dd.admin_conf)}


def leave(data: Path, now: datetime) -> dict[str, Any]:
    """Take the replica in ``data`` out of the mesh's list of controllers (nodes learn it from their stream and
    stop trying it); its data directory is left as it is, for ``serve`` to refuse nothing if it comes back."""
    from .netmap import log_delta

    where, url = DataDir(data).replica()
    if not isinstance(where, str) or url is None:
        raise InvalidInput(f"{data} is a controller of its own (SQLite): there is no list of replicas to leave")
    store = Store.open(where)
    try:
        with store.transaction() as tx:
            if url not in tx.controllers():
                raise InvalidInput(f"{url} is not among the mesh's controllers ({', '.join(tx.controllers())})")
            if len(tx.controllers()) == 1:
                raise InvalidInput(f"{url} is the mesh's only controller: nodes would have none left")
            tx.remove_controller(url)
            remaining = tx.controllers()
            log_delta(tx, controllers=tuple(remaining))
            tx.audit(now, "mesh-controller leave", "controller.left", url)
    finally:
        store.close()
    return {"url": url, "controllers": remaining}


def _read_ca_key(path: Path) -> ed25519.Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise InvalidInput(f"cannot read the CA key {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise InvalidInput(f"{path} is not a PEM private key") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InvalidInput(f"{path} is not an Ed25519 key")
    return key


def _public_raw(cert: x509.Certificate) -> bytes:
    public = cert.public_key()
    return public.public_bytes_raw() if isinstance(public, ed25519.Ed25519PublicKey) else b""


def load_authority(data: Path) -> CertificateAuthority:
    dd = DataDir(data)
    try:
        cert = load_certificate(dd.ca_cert.read_bytes())
        key = serialization.load_pem_private_key(dd.ca_key.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise Unavailable(f"no mesh CA in {data}: run 'mesh-controller init --data {data}' first") from exc
    except OSError as exc:
        raise PermissionDenied(f"cannot read the mesh CA in {data}: {exc.strerror}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise InvalidInput(f"{dd.ca_key} is not an Ed25519 key")
    return CertificateAuthority(cert, key)


@dataclass(frozen=True)
class JwtKey:
    key: ECKey
    kid: str

    @classmethod
    def load(cls, data: Path) -> JwtKey:
        """The mesh's JWT-SVID key in ``data``, made there (0600) if it has none yet.

        Made with O_EXCL: two controller processes that both find none keep
        the one that was written first.
        """
        path = DataDir(data).jwt_key
        try:
            key = ECKey.import_key(path.read_bytes())
        except FileNotFoundError:
            fresh = ECKey.generate_key("P-256")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return cls.load(data)
            except OSError as exc:
                raise Unavailable(f"cannot write the JWT-SVID key {path}: {exc.strerror}") from exc
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(fresh.as_pem(private=True))
                    out.flush()
                    os.fsync(out.fileno())
            except OSError as exc:  # a full disk: leave no half key for the next start to trip on
                path.unlink(missing_ok=True)
                raise Unavailable(f"cannot write the JWT-SVID key {path}: {exc.strerror}") from exc
            key = fresh
        return cls(key, key.thumbprint())

    def public(self) -> dict[str, Any]:
        return {**self.key.as_dict(private=False), "kid": self.kid, "use": "jwt-svid", "alg": "ES256"}
