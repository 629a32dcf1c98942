"""nftables in-process, through libnftables (the library the ``nft`` command wraps).

Every table of meshd's (``inet idmesh``, the policy; ``inet idmesh_agents``,
the agents' marks and translations; ``inet idmesh_routes``, identity-based
routes) is changed through it: a change costs about half a millisecond
instead of the ~10 ms of spawning ``nft``. :class:`NftTable` is what the
subsystems hold: one table's scripts, its named counters and its removal,
with nft's errors worded the same way for all of them.
"""

from __future__ import annotations

import ctypes
import re
import threading
from collections.abc import Callable

from meshcore.errors import IdmeshError, PermissionDenied, Unavailable

__all__ = ["Libnftables", "Nft", "NftTable"]

Nft = Callable[[str], str]
"""A script in, nft's output out: :class:`Libnftables`, or a recording fake in tests."""


class Libnftables:
    """nftables in-process through libnftables (the library the ``nft`` command wraps).

    A change costs about half a millisecond instead of the ~10 ms of spawning
    ``nft`` here. Calling it with a script returns its output, or raises
    :class:`Unavailable` / :class:`PermissionDenied` with nft's first error line.
    ``check=True`` validates without committing, like ``nft -c``.
    """

    def __init__(self, *, check: bool = False) -> None:
        try:
            lib = ctypes.CDLL("libnftables.so.1")
        except OSError as exc:
            raise Unavailable("libnftables is missing (apt-get install nftables)") from exc
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        for getter in (lib.nft_ctx_get_output_buffer, lib.nft_ctx_get_error_buffer):
            getter.argtypes = [ctypes.c_void_p]
            getter.restype = ctypes.c_char_p
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise Unavailable("libnftables could not create a context")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        lib.nft_ctx_set_dry_run(ctx, check)
        self._lib, self._ctx = lib, ctx
        self._lock = threading.Lock()

    def __call__(self, script: str) -> str:
        with self._lock:
            if self._ctx is None:
                raise Unavailable("libnftables context is closed")
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            first = next((line for line in err.splitlines() if "Error:" in line), err.strip() or "(no message)")
            reason = first.split("Error:", 1)[-1].strip()
            cls = PermissionDenied if "Operation not permitted" in reason else Unavailable
            raise cls(reason)
        return out

    def close(self) -> None:
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None


class NftTable:
    """One ``inet`` table of meshd's: scripts run as one transaction each, named counters, removal.

    ``nft`` replaces libnftables (tests); without it a context is opened on
    first use and closed by :meth:`close`. Errors name what was being done
    and the table, e.g. ``nftables refused adding agent a3 (table inet
    idmesh_agents): ...``.
    """

    def __init__(self, name: str, nft: Nft | None = None) -> None:
        self.name = name
        self._nft = nft
        self._own: Libnftables | None = None

    def run(self, script: str, what: str) -> str:
        if self._nft is None:
            self._own = Libnftables()
            self._nft = self._own
        try:
            return self._nft(script)
        except PermissionDenied as exc:
            raise PermissionDenied(f"nftables refused {what} (table inet {self.name}): {exc} "
                                   "(needs CAP_NET_ADMIN)") from exc
        except IdmeshError as exc:
            raise Unavailable(f"nftables refused {what} (table inet {self.name}): {exc}") from exc

    def counter(self, name: str) -> int:
        """Packets a named counter of the table has counted."""
        out = self.run(f"list counter inet {self.name} {name}\n", f"reading counter {name}")
        found = re.search(r"packets (\d+)", out)
        return int(found.group(1)) if found else 0

    def exists(self) -> bool:
        """Whether the table is there (listing the names of the namespace's tables only: cheap at any size)."""
        return f"table inet {self.name}\n" in self.run("list tables inet\n", "listing the tables")

    def delete(self) -> None:
        """Remove the table, also one a crashed meshd left; no table there is not an error."""
        self.run(f"add table inet {self.name}\ndelete table inet {self.name}\n", "deleting the table")

    def close(self) -> None:
        """Close the libnftables context if it is ours (the table stays: see :meth:`delete`)."""
        if self._own is not None:
            self._own.close()
            self._own = self._nft = None
