"""Named points where a test can kill the process as a power cut would (``LOWBIT_KILL_AT=NAME``).

A kill test that races a timer against a tiny model is flaky; one that dies at a named point is
exact. Unset (always, outside tests) each point costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal


def reach(point: str) -> None:
    """SIGKILL this process if ``LOWBIT_KILL_AT`` names ``point`` (nothing is flushed or cleaned up)."""
    if os.environ.get("LOWBIT_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
