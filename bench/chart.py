"""The report's chart: one panel per case that has a plot (UDP and convergence)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from bench.report import CaseResult


def draw(results: Sequence[CaseResult], path: Path) -> bool:
    """Write the PNG; False when no selected case has a panel."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display here
    import matplotlib.pyplot as plt

    panels = [r for r in results if r.plot is not None]
    if not panels:
        return False
    figure, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
    for ax, result in zip(axes[0], panels):
        assert result.plot is not None
        result.plot(ax)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True
