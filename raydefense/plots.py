"""PNG plots (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def sweep_plot(budgets: Sequence[float], clean: Sequence[float], pgd: Sequence[float], dz: Sequence[float],
               path: str | Path, title: str, eps_label: str) -> Path:
    """Clean and PGD-20 accuracy (left axis) and Delta_z (right axis) against the training budget."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    ax.plot(budgets, clean, "o-", label="clean accuracy")
    ax.plot(budgets, pgd, "s-", label=f"PGD-20 accuracy @ {eps_label}")
    ax.set_xlabel("training budget k (eps = k x eps_unit)")
    ax.set_ylabel("validation accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(budgets, dz, "^--", color="tab:red", label=f"Delta_z @ {eps_label}")
    ax2.set_ylabel("Delta_z (logit shift)", color="tab:red")
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    fig.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="lower center", ncol=3, fontsize=8, frameon=False)
    ax.set_title(title)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
