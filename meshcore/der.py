"""Just enough DER to assemble a certificate from pre-encoded parts.

Issuing an agent identity must cost well under a millisecond. Most of a leaf
is the same for every certificate one CA issues (issuer, algorithm, the fixed
extensions), so :mod:`meshcore.identity` encodes those once and splices in
the per-leaf fields with these helpers. The unit tests prove the result is
byte-for-byte what ``cryptography``'s CertificateBuilder produces.
"""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["integer", "length", "octet_string", "read_length", "sequence", "time", "tlv", "utf8_string"]


def length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def read_length(der: bytes, offset: int) -> tuple[int, int]:
    """Return (length, offset of the content) for the length octets at ``offset``."""
    if offset >= len(der):
        raise ValueError("missing DER length")
    first = der[offset]
    if first < 0x80:
        return first, offset + 1
    count = first & 0x7F
    if count == 0 or count > 4 or offset + 1 + count > len(der):
        raise ValueError("bad DER length")
    return int.from_bytes(der[offset + 1 : offset + 1 + count], "big"), offset + 1 + count


def tlv(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:  # the common case, kept free of a second call: this is the issuance hot path
        return bytes((tag, n)) + content
    return bytes((tag,)) + length(n) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(0x30, b"".join(parts))


def integer(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative integers are not needed here")
    raw = value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")
    if raw[0] & 0x80:
        raw = b"\x00" + raw
    return tlv(0x02, raw)


def octet_string(content: bytes) -> bytes:
    return tlv(0x04, content)


def utf8_string(text: str) -> bytes:
    return tlv(0x0C, text.encode())


def time(moment: datetime) -> bytes:
    """RFC 5280 §4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""
    m = moment.astimezone(UTC) if moment.utcoffset() else moment
    clock = f"{m.month:02d}{m.day:02d}{m.hour:02d}{m.minute:02d}{m.second:02d}Z"
    if 1950 <= m.year < 2050:
        return tlv(0x17, f"{m.year % 100:02d}{clock}".encode())
    return tlv(0x18, f"{m.year:04d}{clock}".encode())
