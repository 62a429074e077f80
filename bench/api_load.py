"""python -m bench.api_load: the model behind docs/api-load.md's reconnection storm.

Every watch of 150,000 sidecars (5,000 nodes × 30 pods, three watches each) loses its
stream when the API server goes down, and retries with `proxyctl.watch.Backoff`. Once the
server is back, each resumed watch gets 410 Gone (a restarted watch cache starts past it),
waits its next backoff, and lists. Beside it, the backoff proxyctl had before: half to
all of min(10 s, 0.2 s × 2ⁿ⁻¹), relisting at once. Seeded: the same figures every run.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Callable

from proxyctl.watch import Backoff

WATCHES = 5000 * 30 * 3
OUTAGES = (60.0, 5.0)


def storm(outage: float, jittered: bool) -> str:
    """One outage of `outage` seconds, every watch simulated; a table row of what the API server sees."""
    refused = 0
    reconnects: Counter[int] = Counter()
    lists: list[float] = []
    for _ in range(WATCHES):
        backoff = Backoff()
        wait: Callable[[], float] = backoff.next if jittered else lambda: _previous(backoff)
        t = random.uniform(0, 0.05)  # the streams break as the server goes
        while (t := t + wait()) < outage:
            refused += 1
        reconnects[int(t - outage)] += 1
        lists.append(t - outage + (wait() if jittered else 0.0))
    lists.sort()
    listed = Counter(int(t) for t in lists)
    return (f"| {outage:g} s | {'full jitter, cap 30 s' if jittered else 'before'} | {refused / 1e6:.1f} million "
            f"({refused / WATCHES:.1f} per watch) | over {max(reconnects) + 1} s, at most {max(reconnects.values()):,}/s "
            f"| at most {max(listed.values()):,}/s; p50 {lists[len(lists) // 2]:.1f} s, "
            f"p99 {lists[int(len(lists) * 0.99)]:.1f} s, last {lists[-1]:.1f} s |")


def _previous(backoff: Backoff) -> float:
    """The backoff before full jitter, for comparison."""
    backoff.failures += 1
    delay = min(10.0, 0.2 * 2 ** min(backoff.failures - 1, 10))
    return random.uniform(delay / 2, delay)


def main() -> None:
    random.seed(1)
    print(f"{WATCHES:,} watches\n")
    print("| API server down for | backoff | refused attempts while down | watch reconnects once back "
          "| lists after the 410s (time after it is back) |")
    print("| --- | --- | --- | --- | --- |")
    for outage in OUTAGES:
        for jittered in (True, False):
            print(storm(outage, jittered))


if __name__ == "__main__":
    main()
