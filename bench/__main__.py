"""python -m bench: proxyctl's benchmarks, everything started here on loopback.

Each case runs several rounds, alternating its contenders; the tables give medians and
ratios, and each target from the issue is printed with whether it held. A full run (no
--quick, no --only) rewrites docs/benchmarks.md and its chart docs/benchmarks.png.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Sequence

from bench import (convergence, footprint, image, metrics_cost, rollout, scale, tcp_redis, udp_many_clients,
                   udp_one_client)
from bench.report import CaseResult, Table, write_markdown
from bench.system import AGENTS, CONTAINER_ENGINE, GIT, MATPLOTLIB, NGINX, REDIS_HAPROXY, Need, describe

DOCS = Path(__file__).resolve().parent.parent / "docs"
CASES: dict[str, tuple[ModuleType, list[Need]]] = {
    "udp-many": (udp_many_clients, NGINX),
    "udp-one": (udp_one_client, NGINX),
    "tcp": (tcp_redis, NGINX + REDIS_HAPROXY),
    "convergence": (convergence, NGINX),
    "footprint": (footprint, NGINX),
    "scale": (scale, NGINX),
    "rollout": (rollout, NGINX + AGENTS),
    "metrics-cost": (metrics_cost, NGINX + [GIT]),
    "image": (image, [CONTAINER_ENGINE]),
}


def _cases(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in CASES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown case(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(CASES)}")
    return chosen


def _missing(needs: Sequence[Need]) -> list[Need]:
    seen: dict[str, Need] = {}
    for need in needs:
        if need.what not in seen and need.missing():
            seen[need.what] = need
    return list(seen.values())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round, shorter loads: a smoke check (~2 min)")
    parser.add_argument("--only", type=_cases, metavar="CASE[,CASE]", default=list(CASES),
                        help=f"run only these cases: {', '.join(CASES)}")
    parser.add_argument("--report", type=Path, metavar="PATH",
                        help="write the Markdown report (and a PNG beside it) here; a full run writes "
                             "docs/benchmarks.md by default")
    args = parser.parse_args(argv)
    full = not args.quick and args.only == list(CASES)
    report: Path | None = args.report or (DOCS / "benchmarks.md" if full else None)

    needs = [need for name in args.only for need in CASES[name][1]] + ([MATPLOTLIB] if report else [])
    missing = _missing(needs)
    if missing:
        print("The benchmark needs, and this machine lacks:", file=sys.stderr)
        for need in missing:
            print(f"  {need.what.removeprefix('python:')}: {need.install}", file=sys.stderr)
        print("Install them, or leave out the cases that need them with --only.", file=sys.stderr)
        return 2

    machine = describe()
    command = " ".join(["python -m bench", *(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))])
    print(command)
    print("\n".join(f"{name}: {value}" for name, value in machine))
    results: list[CaseResult] = []
    started = time.monotonic()
    for name in args.only:
        print(f"\n--- {name}", flush=True)
        case_started = time.monotonic()
        result = CASES[name][0].run(args.quick)
        result.seconds = time.monotonic() - case_started
        results.append(result)
        print("\n" + result.text(), flush=True)

    targets = Table(["case", "target", "measured", "verdict"],
                    [[r.title, t.goal, t.measured, t.verdict] for r in results for t in r.targets], "llll")
    print(f"\n=== Targets ({time.monotonic() - started:.0f} s in all)\n\n{targets.text()}")
    if report is not None:
        from bench.chart import draw

        chart = report.with_suffix(".png")
        drawn = draw(results, chart)
        write_markdown(report, command, machine, results, chart if drawn else None)
        print(f"\nwrote {report}" + (f" and {chart}" if drawn else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
