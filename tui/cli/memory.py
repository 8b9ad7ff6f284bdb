"""Process-wide memory settings, made before anything imports torch (the first thing the
CLI package ``tui.cli`` does, for ``persona`` and ``python -m tui.cli``), so the allocator
reads them at its first allocation."""

from __future__ import annotations

import os

# torch's CPU allocator backs each allocation of 2 MB or more with transparent huge pages
# (madvise) when this is "1". A CPU judge batch allocates and frees hundreds of MB a layer;
# on 4 KB pages each fresh page faults: 5.1M faults and 15.6 s of system time for one demo
# judging job on the 2-core machine, 0.57M and 8.9 s with it, and 82.6 -> 70.2 s of wall
# time (docs/benchmarks.md, "Session 16"). Generation's smaller tensors did not change
# (72.5 -> 71.7 s).
HUGE_PAGES_VARIABLE = "THP_MEM_ALLOC_ENABLE"


def prefer_huge_pages() -> None:
    """Turn torch's huge-page allocations on unless the user's environment already says
    (``THP_MEM_ALLOC_ENABLE=0`` turns them off). Worker processes inherit it."""
    os.environ.setdefault(HUGE_PAGES_VARIABLE, "1")
