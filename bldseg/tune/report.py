"""Plots of a search, for the parent MLflow run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bldseg.train.plots import save_figure

#: One colour per trial status, in both panels of ``trials.png``.
STATUS_COLOURS = {
    "completed": "tab:green",
    "early-stopped": "tab:orange",
    "diverged": "tab:red",
    "error": "black",
}
OTHER_STATUS = "tab:gray"  # a status not listed above (a search recorded by an older bldseg)


def plot_trials(table: pd.DataFrame, path: Path, metric: str) -> Path:
    """``trials.png``: the trials of a search, coloured by how they ended.

    Left: the best ``metric`` of each trial (bars). Right: parallel coordinates of the numeric
    searched parameters and, on the last axis, the metric (each min-max scaled to [0, 1]), one
    line per trial. A trial without a score (NaN: it ended before its first epoch) has no bar
    and no point on the metric's axis, and is left out of its scale. Both legends list only the
    statuses present, with their counts.

    Args:
        table: :func:`bldseg.tune.runner.trial_table` (``trial_id``, ``status``, ``metric``,
            ``config/*`` columns).
        path: The PNG to write.
        metric: The optimised metric's column.
    """
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[1, 2])
    statuses = table["status"].astype(str)
    colours = [STATUS_COLOURS.get(s, OTHER_STATUS) for s in statuses]
    counts = statuses.value_counts()
    # the listed statuses in their fixed order, then any others
    present = [s for s in STATUS_COLOURS if s in counts] + [
        s for s in counts.index if s not in STATUS_COLOURS
    ]

    labels = [str(t)[-5:] for t in table["trial_id"]]
    # a trial without an epoch (NaN) keeps its label but has no bar: 0.0 is not its score
    ax0.bar(range(len(labels)), table[metric].astype(float), color=colours)
    ax0.set_xticks(range(len(labels)), labels)
    ax0.set_xlim(-0.6, len(labels) - 0.4)
    ax0.set(title=f"best {metric} per trial", ylabel=metric)
    ax0.tick_params(axis="x", rotation=60, labelsize=7)
    ax0.legend(
        handles=[
            Patch(color=STATUS_COLOURS.get(s, OTHER_STATUS), label=f"{s} ({counts[s]})")
            for s in present
        ],
        fontsize=7,
        title="status",
        title_fontsize=7,
    )

    cols = [
        c
        for c in table.columns
        if c.startswith("config/")
        and pd.api.types.is_numeric_dtype(table[c])
        and table[c].nunique() > 1
    ]
    if cols:
        axes = [*cols, metric]
        x = table[axes].astype(float)
        # min and max over the trials that have a value (NaN skipped): a failed trial's line
        # stops before the metric's axis instead of squeezing the others' differences
        lo, hi = x.min(skipna=True), x.max(skipna=True)
        scaled = (x - lo) / (hi - lo).replace(0, 1)
        # completed trials drawn last: on top of the ones that ended early
        order = sorted(range(len(table)), key=lambda i: statuses.iloc[i] == "completed")
        for i in order:
            ax1.plot(range(len(axes)), scaled.iloc[i], color=colours[i], alpha=0.8, lw=1.3)
        ax1.set_xticks(
            range(len(axes)),
            [c.removeprefix("config/") for c in axes],
            rotation=35,
            ha="right",
            fontsize=7,
        )
        ax1.get_xticklabels()[-1].set_fontweight("bold")
        ax1.axvline(len(axes) - 1, color="gray", lw=0.8)
        ax1.set(
            title=f"searched parameters and {metric} (each scaled to [0, 1])", ylim=(-0.05, 1.05)
        )
        ax1.legend(
            handles=[
                Line2D([], [], color=STATUS_COLOURS.get(s, OTHER_STATUS), label=s) for s in present
            ],
            fontsize=7,
            loc="upper left",
            bbox_to_anchor=(1.0, 1.0),
        )
    else:
        ax1.axis("off")
    return save_figure(fig, path, dpi=100)
