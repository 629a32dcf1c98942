"""Tear down a mesh that ``make demo DEMO_ARGS=--keep`` left running.

    python -m demo.teardown PREFIX WORKDIR
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.e2e.netns import reap_stale


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    prefix, work = sys.argv[1], Path(sys.argv[2])
    removed = reap_stale(prefix)  # the demo process is gone, so its namespaces count as stale
    shutil.rmtree(work, ignore_errors=True)
    print(f"removed {len(removed)} namespace(s) and {work}")


if __name__ == "__main__":
    main()
