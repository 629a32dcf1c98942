"""The one exceptions module of idmesh.

Every error a user can meet is an :class:`IdmeshError` whose ``str()`` is one
line that says what is wrong and, where it helps, what to do. Lower-level
errors (cryptography, sqlite, ssl, httpx) are mapped at the boundary with
``raise ... from`` so a traceback never reaches a user::

    IdmeshError                     exit code 1
    ├── InvalidInput                a value the user gave is malformed (2)
    │   ├── InvalidToken            garbage, tampered, expired, used, foreign
    │   ├── InvalidCertificate      bad signature, expired, not an X509-SVID
    │   └── PolicyError             a policy file that cannot be used, with every location
    ├── NotFound                    a named node/token/file does not exist (3)
    ├── Conflict                    already enrolled, duplicate name, CA exists (4)
    │   └── Outdated                a peer speaks a protocol this one no longer serves
    ├── PermissionDenied            credential missing or not allowed (5)
    ├── Unavailable                 the controller or a daemon cannot be reached (6)
    │   └── Unreachable             not even connected: the request never left, another replica may take it
    └── Exhausted                   the overlay address space is full (7)

``status`` is the HTTP status the API answers with for that error class.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "Conflict",
    "Exhausted",
    "IdmeshError",
    "InvalidCertificate",
    "InvalidInput",
    "InvalidToken",
    "NotFound",
    "Outdated",
    "PermissionDenied",
    "PolicyError",
    "RateLimited",
    "Unavailable",
    "Unreachable",
    "error_for_status",
]


class IdmeshError(Exception):
    exit_code = 1
    status = 500


class InvalidInput(IdmeshError):
    exit_code = 2
    status = 422


class InvalidToken(InvalidInput):
    status = 401


class InvalidCertificate(InvalidInput):
    status = 401


class PolicyError(InvalidInput):
    """A policy that cannot be used, and every place where it is wrong.

    ``problems`` holds one line per problem, ``file:line:column: path: what is
    wrong`` (the form compilers use, so editors can jump to it); ``str()`` is
    those lines joined by newlines. The policy is rejected as a whole: there
    is never a partial policy.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("\n".join(self.problems))


class NotFound(IdmeshError):
    exit_code = 3
    status = 404


class Conflict(IdmeshError):
    exit_code = 4
    status = 409


class Outdated(Conflict):
    """The other side speaks a wire protocol older than this side serves (:mod:`meshcore.wire`)."""

    status = 426


class PermissionDenied(IdmeshError):
    exit_code = 5
    status = 403


class RateLimited(PermissionDenied):
    status = 429


class Unavailable(IdmeshError):
    exit_code = 6
    status = 503


class Unreachable(Unavailable):
    """No connection to that controller could be made (refused, no route, handshake failed or timed out).

    The request was never sent, so it is safe to send it to another
    controller replica (SPEC §8); an error after the request left is
    plain :class:`Unavailable`, as the controller may have acted on it.
    """


class Exhausted(IdmeshError):
    exit_code = 7
    status = 507


_BY_STATUS: dict[int, type[IdmeshError]] = {
    400: InvalidInput,
    401: InvalidToken,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: InvalidInput,
    426: Outdated,
    422: InvalidInput,
    429: RateLimited,
    503: Unavailable,
    507: Exhausted,
}


def error_for_status(status: int, message: str) -> IdmeshError:
    """Map an API error answer back to the exception class a client raises."""
    return _BY_STATUS.get(status, IdmeshError)(message)
