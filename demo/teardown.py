"""Tear down a mesh that ``make demo DEMO_ARGS=--keep`` left running.

    python -m demo.teardown PREFIX WORKDIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.netns import _ip, _kill_pids, netns_pids, reap_stale
from tests.pg import stop_cluster


def stop_nodes(prefix: str) -> None:
    """Every process outside the controller's namespace (h1) at once, while the controller and coturn there still
    answer: a meshd deletes its TURN allocation on the way out and would wait 10 s for a relay already gone."""
    names = [line.split(" ")[0] for line in _ip("netns", "list").stdout.splitlines()]
    _kill_pids([pid for name in names if name.startswith(f"{prefix}-") and name != f"{prefix}-h1"
                for pid in netns_pids(name)], grace=5.0)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    prefix, work = sys.argv[1], Path(sys.argv[2])
    stop_nodes(prefix)
    removed = reap_stale(prefix)  # the demo process is gone, so its namespaces count as stale
    stop_cluster(work / "pg")  # the controllers' PostgreSQL, which runs outside the namespaces
    shutil.rmtree(work, ignore_errors=True)
    print(f"removed {len(removed)} namespace(s) and {work}")


if __name__ == "__main__":
    main()
