"""Plots of a search, for the parent MLflow run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from bldseg.train.plots import save_figure

STATUS_COLOURS = {
    "completed": "tab:green",
    "early-stopped": "tab:orange",
    "diverged": "tab:red",
    "error": "black",
}


def plot_trials(table: pd.DataFrame, path: Path, metric: str) -> Path:
    """Left: best metric per trial, coloured by status. Right: parallel coordinates of the
    numeric searched parameters (min-max scaled), one line per trial coloured by the metric."""
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5), width_ratios=[1, 2])
    labels = [str(t)[-5:] for t in table["trial_id"]]
    ax0.bar(labels, table[metric], color=[STATUS_COLOURS.get(s, "gray") for s in table["status"]])
    ax0.set(title=f"best {metric} per trial", ylabel=metric)
    ax0.tick_params(axis="x", rotation=60, labelsize=7)
    for status, c in STATUS_COLOURS.items():
        ax0.bar([], [], color=c, label=status)
    ax0.legend(fontsize=7)
    cols = [
        c
        for c in table.columns
        if c.startswith("config/")
        and pd.api.types.is_numeric_dtype(table[c])
        and table[c].nunique() > 1
    ]
    if cols:
        x = table[cols].astype(float)
        scaled = (x - x.min()) / (x.max() - x.min()).replace(0, 1)
        scores = table[metric].to_numpy()
        norm = plt.Normalize(np.nanmin(scores), np.nanmax(scores))
        cmap = plt.get_cmap("viridis")
        for i in range(len(table)):
            ax1.plot(range(len(cols)), scaled.iloc[i], color=cmap(norm(scores[i])), alpha=0.8)
        ax1.set_xticks(
            range(len(cols)),
            [c.removeprefix("config/") for c in cols],
            rotation=35,
            ha="right",
            fontsize=7,
        )
        ax1.set(title="searched parameters (scaled to [0, 1]), colour = " + metric)
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax1)
    else:
        ax1.axis("off")
    return save_figure(fig, path, dpi=100)
