"""Files meshd writes: whole or not at all, with their mode from birth (keys are never briefly readable)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["write_private"]


def write_private(path: Path, data: str, mode: int = 0o600, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically, created with ``mode``.

    ``durable=False`` skips the fsync, for files that need not outlive a
    crash (an agent's key dies with the agent anyway).
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
