"""The local API knows its caller by the kernel's word and pins its process (meshd.node.localapi.Caller)."""

from __future__ import annotations

import os
import subprocess

from meshd.node.localapi import Caller


def test_a_pidfd_says_when_the_caller_is_gone_whatever_its_pid_becomes() -> None:
    child = subprocess.Popen(["sleep", "30"])
    caller = Caller(child.pid, os.getuid(), os.getgid(), os.pidfd_open(child.pid))
    try:
        assert not caller.exited()
        child.kill()
        child.wait()
        assert caller.exited()  # even if the pid number is handed to another process now
    finally:
        assert caller.pidfd is not None
        os.close(caller.pidfd)


def test_a_caller_without_a_pidfd_is_never_taken_for_gone() -> None:
    assert not Caller(1, 0, 0, None).exited()
