"""Results of the cases, as the terminal table and as docs/benchmarks.md.

Every case returns a `CaseResult`: its tables (medians and ratios), the targets it checks,
and optionally a panel for the chart. The report's "what limits it" section is written by
hand after reading a full run, so rewriting the report keeps it.
"""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from matplotlib.axes import Axes

LIMITS_BEGIN = "<!-- what-limits-it: kept when the report is rewritten -->"
LIMITS_END = "<!-- /what-limits-it -->"


@dataclass(frozen=True)
class Table:
    """Rows of already formatted cells; `align` has one `l` or `r` per column."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    align: str
    title: str = ""

    def text(self) -> str:
        widths = [max([len(c), *(len(row[i]) for row in self.rows)]) for i, c in enumerate(self.columns)]

        def line(cells: Sequence[str]) -> str:
            return "  ".join(cell.rjust(w) if a == "r" else cell.ljust(w)
                             for cell, w, a in zip(cells, widths, self.align)).rstrip()

        head = line(self.columns)
        body = [line(row) for row in self.rows]
        return "\n".join(([self.title] if self.title else []) + [head, "-" * len(head), *body])

    def markdown(self) -> str:
        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

        rule = "| " + " | ".join("---:" if a == "r" else "---" for a in self.align) + " |"
        return "\n".join(([f"**{self.title}**", ""] if self.title else []) +
                         [line(self.columns), rule, *(line(row) for row in self.rows)])


@dataclass(frozen=True)
class Target:
    """A goal from the issue, and whether this run met it."""

    goal: str
    measured: str
    held: bool

    @property
    def verdict(self) -> str:
        return "held" if self.held else "MISSED"


@dataclass
class CaseResult:
    key: str
    title: str
    about: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot: Callable[[Axes], None] | None = None
    seconds: float = 0.0

    def text(self) -> str:
        parts = [f"== {self.title} ({self.seconds:.0f} s)", *(t.text() for t in self.tables)]
        parts += [f"note: {n}" for n in self.notes]
        parts += [f"target: {t.goal}: {t.measured} -> {t.verdict}" for t in self.targets]
        return "\n\n".join(parts)

    def markdown(self) -> str:
        parts = [f"## {self.title}", self.about, *(t.markdown() for t in self.tables)]
        parts += [f"- {n}" for n in self.notes]
        return "\n\n".join(parts)


# --- numbers ------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1), linear between samples; p99 of 50 samples lies near the maximum."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:,.0f} ms" if seconds >= 0.0995 else f"{seconds * 1000:.1f} ms"


def mb(kib: float) -> str:
    return f"{kib / 1024:.1f} MB"


# --- docs/benchmarks.md ----------------------------------------------------------------------


def kept_limits_section(path: Path) -> str:
    """The hand-written "what limits it" text of the existing report, or a placeholder."""
    if path.exists():
        match = re.search(re.escape(LIMITS_BEGIN) + r"\n(.*?)\n?" + re.escape(LIMITS_END), path.read_text(), re.S)
        if match:
            return match.group(1).strip()
    return "_To be written from a full run: what bounds each figure that missed or nearly missed its target._"


def write_markdown(path: Path, command: str, machine: Sequence[tuple[str, str]], results: Sequence[CaseResult],
                   chart: Path | None) -> None:
    limits = kept_limits_section(path)
    targets = Table(["case", "target", "measured", "verdict"],
                    [[r.title, t.goal, t.measured, t.verdict] for r in results for t in r.targets], "llll")
    lines = [
        "# Benchmarks",
        "",
        "Measured by the benchmark in [bench/](../bench/), with real nginx, redis and haproxy processes, "
        "the test Kubernetes API server and `proxyctl run` as a process, all on loopback. Regenerate with:",
        "",
        "```sh",
        "apt-get install -y nginx libnginx-mod-stream redis-server redis-tools haproxy",
        "pip install -e '.[test]' matplotlib",
        command,
        "```",
        "",
        "`python -m bench --quick` is a smoke check (one round, shorter loads, about two minutes); "
        "`--only udp-many,udp-one,tcp,convergence,footprint,scale,rollout` picks cases. Neither rewrites this file "
        "unless given `--report PATH`. The full run takes about ten minutes on the machine below.",
        "",
        "Every case runs several times, alternating the contenders within each round so that a noisy machine "
        "shifts them alike; the tables show medians, and ratios against the direct path of the same round.",
        "",
        "## Machine",
        "",
        *(f"- {name}: {value}" for name, value in machine),
        "",
        "## Targets",
        "",
        targets.markdown(),
        "",
    ]
    if chart is not None:
        lines += [f"![UDP delivery, UDP single-client ceiling, convergence]({chart.name})", ""]
    lines += [r.markdown() + "\n" for r in results]
    lines += ["## What limits it", "", LIMITS_BEGIN, limits, LIMITS_END, ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
