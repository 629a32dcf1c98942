"""Names the kernel gives meaning to, checked before anything is asked of it."""

from __future__ import annotations

import re
import unicodedata

from .errors import InvalidInput

__all__ = ["PRINCIPAL_PATTERN", "check_ifname", "ifname_problem", "normal_principal"]

# Characters a principal may not hold: spaces, "@" (once only, as the separator), control characters (C0, DEL,
# C1), and the invisible and direction-changing ones (soft hyphen, zero-width spaces and joiners, LRM/RLM, bidi
# embeddings, overrides and isolates, word joiner, BOM) that would let one principal be made to look like another.
_NOT_IN_PRINCIPAL = r"\s@\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u202a-\u202e\u2060-\u206f\ufeff"
PRINCIPAL_PATTERN = rf"^[^{_NOT_IN_PRINCIPAL}]+@[^{_NOT_IN_PRINCIPAL}]+$"
"""A principal: ``local@domain``, visible characters only (SPEC §6), at most 320 of them where it is checked."""



def normal_principal(text: str) -> str:
    """A principal's one spelling: Unicode NFC, lower case. ``Nikita@ACME.com`` is ``nikita@acme.com``.

    Identity providers treat addresses case-insensitively (Google, Entra ID
    and Okta match and return them lower-cased), and so does every mesh
    that names people by address; a policy that said ``Nikita@acme.com``
    must not miss the agents of ``nikita@acme.com``. Applied wherever a
    principal enters: the policy file, API requests, the local API, the
    identity provider's claim, ``meshd run --principal-map``.
    """
    return unicodedata.normalize("NFC", text).lower()


_IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")


def ifname_problem(ifname: str) -> str | None:
    """Why ``ifname`` cannot be an interface name, or None.

    The kernel's limit is IFNAMSIZ (16 with the NUL); the character set is
    narrower than the kernel's so that a name is also a safe path component
    (wireguard-go's UAPI socket) and a safe word in an nftables script.
    """
    if not _IFNAME.match(ifname) or ifname in (".", ".."):
        return f"interface name {ifname!r} is not 1-15 of A-Z a-z 0-9 _ . -"
    return None


def check_ifname(ifname: str) -> str:
    """``ifname`` itself, or :class:`InvalidInput` saying what is wrong with it."""
    problem = ifname_problem(ifname)
    if problem is not None:
        raise InvalidInput(problem)
    return ifname
