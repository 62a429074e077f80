"""Memory of proxyctl and its nginx, read from /proc when /metrics is asked for.

PSS (proportional set size) counts a page shared by n processes as 1/n to each, so the
figures of proxyctl and of all its nginx processes add up to what they cost together: the
closest per-process figure to a container's working set, which the memory budget is
quoted in. RSS would count the pages an nginx master shares with its workers once per
process. `/proc/<pid>/smaps_rollup` gives PSS in one short read per process (Linux 4.14+).
"""

from __future__ import annotations

import os
from typing import Iterable


def pss(pid: int) -> int | None:
    """The PSS of `pid` in bytes; None when the process is gone or its memory cannot be read."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", "rb") as rollup:
            for line in rollup:
                if line.startswith(b"Pss:"):
                    return int(line.split()[1]) * 1024  # the kernel writes kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def usage(nginx: Iterable[int]) -> dict[str, int]:
    """PSS in bytes of proxyctl itself and of the nginx processes `nginx`, summed; a process
    whose memory cannot be read is left out (nginx too, when none can be)."""
    found = {"proxyctl": pss(os.getpid())}
    sizes = [size for size in map(pss, nginx) if size is not None]
    found["nginx"] = sum(sizes) if sizes else None
    return {process: size for process, size in found.items() if size is not None}
