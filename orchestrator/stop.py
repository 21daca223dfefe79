"""Graceful stops: the driver's stop request, as seen from the workers.

`requested()` is called by a running trial at the end of each epoch; when it returns True the trial
saves a checkpoint and ends with stage `interrupted` (no row is written; the next run resumes it).
"""

from __future__ import annotations


def requested() -> bool:
    """Whether the driver asked running trials to stop (SIGINT/SIGTERM)."""
    return False
