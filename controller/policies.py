"""Policy versions: applied by the admin, kept forever, the newest pushed to every node.

A file is built aside and checked completely — it loads, and its own
``tests:`` pass — before it becomes the next version; one that fails
changes nothing and the previous version stays in force. Applying the text
already in force is not a new version. The controller itself needs the
parsed policy on hot paths (every agent issued), so it is parsed once per
version (:func:`in_force`), not per request.
"""

from __future__ import annotations

import difflib
import hashlib
from datetime import datetime

from meshcore.errors import InvalidInput, NotFound
from meshcore.policy import Policy, load_policy, run_tests
from meshcore.wire.api import PolicyApply, PolicyInfo

from .context import Context
from .netmap import policy_doc
from .rows import PolicyRow

__all__ = ["apply_policy", "in_force", "policy_history", "show_policy"]


def apply_policy(ctx: Context, actor: str, req: PolicyApply, now: datetime) -> PolicyInfo:
    """Validate, run the file's tests, store as the next version, push to every node."""
    policy = load_policy(req.text, req.filename)
    failures = run_tests(policy)
    if failures:
        raise InvalidInput(f"{len(failures)} policy test(s) fail, first: {failures[0]}")
    digest = hashlib.sha256(req.text.encode()).hexdigest()
    with ctx.store.transaction() as tx:
        tx.lock("policy")  # two replicas applying at once: the second sees the first's version
        current = tx.policy()
        if current is not None and current.hash == digest:
            return _policy_info(current, unchanged=True)
        row = PolicyRow((current.version if current else 0) + 1, digest, req.filename, req.text, actor, now)
        tx.insert_policy(row)
        diff = "".join(difflib.unified_diff(
            (current.text if current else "").splitlines(keepends=True), req.text.splitlines(keepends=True),
            f"v{current.version if current else 0}", f"v{row.version}"))
        tx.audit(now, actor, "policy.applied", f"policy v{row.version}", hash=digest, filename=req.filename,
                 diff=diff[:20000])
        doc = policy_doc(row)
        assert doc is not None
        ctx.hub.record_policy(tx, doc)
    return _policy_info(row)


def in_force(ctx: Context) -> Policy | None:
    """The policy in force, parsed once per version as the hub applies it (issuing an agent must not re-read
    YAML)."""
    return ctx.hub.parsed


def show_policy(ctx: Context, version: int | None = None) -> PolicyInfo:
    """One version with its text; the one in force when ``version`` is None."""
    with ctx.store.transaction() as tx:
        row = tx.policy(version)
    if row is None:
        raise NotFound("no policy has been applied yet" if version is None else f"no policy version {version}")
    return _policy_info(row)


def policy_history(ctx: Context) -> list[PolicyInfo]:
    with ctx.store.transaction() as tx:
        return [_policy_info(r, with_text=False) for r in tx.policies()]


def _policy_info(row: PolicyRow, unchanged: bool = False, with_text: bool = True) -> PolicyInfo:
    return PolicyInfo(version=row.version, hash=row.hash, filename=row.filename, applied_by=row.applied_by,
                      applied_at=row.applied_at, text=row.text if with_text else None, unchanged=unchanged)
