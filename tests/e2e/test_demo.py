"""``make demo`` itself (the README's first command): it runs to the end, and with ``--keep`` every line it tells
the user to type next works from the host's own shell, the teardown line included (issue 18)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.e2e.netns import _ip

ROOT = Path(__file__).resolve().parents[2]


def test_the_demo_runs_and_every_line_it_prints_to_explore_with_works_from_the_host(tmp_path: Path) -> None:
    from tests.e2e.conftest import require_e2e

    require_e2e()
    printed = tmp_path / "demo.out"  # a file, not a pipe: the daemons the demo leaves running hold its output open
    with printed.open("w") as stdout:
        done = subprocess.run([sys.executable, "-m", "demo", "--keep"], cwd=ROOT, check=False, stdout=stdout,
                              stderr=subprocess.STDOUT, timeout=300)
    out = printed.read_text()
    teardown = ([line.strip() for line in out.split("tear it down with:", 1)[1].splitlines() if line.strip()]
                if "tear it down with:" in out else [])  # a demo that failed has removed everything itself
    try:
        assert done.returncode == 0, out
        for act in ("5. access matrix", "6. revocation", "8. SPIFFE", "9. identity at the application layer",
                    "11. a relayed peer", "12. a second controller", "stream from replica 2", "demo finished"):
            assert act in out, out
        assert "agent | X509-SVID spiffe://acme.mesh/agent/" in out and "not an agent | refused" in out, out
        hints = out.split("Explore, e.g.:", 1)[1].split("tear it down with:", 1)[0]
        lines = [line.strip() for line in hints.splitlines() if line.strip()]
        assert len(lines) >= 4
        said = []
        for line in lines:
            ran = subprocess.run(line, shell=True, check=False, capture_output=True, text=True, timeout=30)
            assert ran.returncode == 0, f"{line}\n{ran.stdout}{ran.stderr}"
            said.append(ran.stdout)
        assert "laptop-hotel" in said[0]  # nodes list: the controller answered, from its namespace
    finally:
        for line in teardown:
            down = subprocess.run(line, shell=True, check=False, capture_output=True, text=True, timeout=120)
            assert down.returncode == 0, down.stdout + down.stderr
    assert len(teardown) == 1, out
    prefix = teardown[0].split()[-2]
    assert not [n for n in _ip("netns", "list").stdout.splitlines() if n.startswith(f"{prefix}-")]
