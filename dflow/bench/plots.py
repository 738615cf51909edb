"""PNG plots of a benchmark's runs: load curves and pool sizes over time.

Every figure carries the emulation label: its seconds are emulated seconds.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from dflow.bench import LABEL
from dflow.bench.metrics import ModeRun, outcomes


def _figure(count: int, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        count, 1, figsize=(10, 2.6 * count), sharex=True, squeeze=False
    )
    fig.suptitle(f"{title}\n{LABEL}", fontsize=10)
    return plt, fig, [row[0] for row in axes]


def plot_load(runs: Mapping[str, ModeRun], path: Path, title: str) -> None:
    """Per mode: offered and completed requests per second (emulated), and the
    median latency of the requests arriving in each bin."""
    plt, fig, axes = _figure(len(runs), title)
    for ax, (mode, run) in zip(axes, runs.items()):
        requests = outcomes(run)
        horizon = max(
            [o.arrival for o in requests] + [o.done or 0.0 for o in requests] + [1.0]
        )
        width = max(horizon / 60, 1.0)
        edges = np.arange(0.0, horizon + width, width)
        offered, _ = np.histogram([o.arrival for o in requests], edges)
        done, _ = np.histogram([o.done for o in requests if o.done is not None], edges)
        ax.step(edges[:-1], offered / width, where="post", label="offered")
        ax.step(edges[:-1], done / width, where="post", label="completed")
        ax.set_ylabel("requests/s")
        ax.set_title(mode, fontsize=9, loc="left")
        latency = ax.twinx()
        centers, medians = [], []
        for lo, hi in itertools.pairwise(edges):
            spans = [
                o.done - o.arrival
                for o in requests
                if lo <= o.arrival < hi and o.done is not None
            ]
            if spans:
                centers.append((lo + hi) / 2)
                medians.append(float(np.median(spans)))
        latency.plot(centers, medians, color="tab:red", lw=0.8, label="p50 latency")
        latency.set_ylabel("p50 latency s", color="tab:red", fontsize=8)
        if ax is axes[0]:
            ax.legend(loc="upper left", fontsize=8)
    axes[-1].set_xlabel("emulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_pools(runs: Mapping[str, ModeRun], path: Path, title: str) -> None:
    """Per mode: workers on each pool over time (stacked)."""
    plt, fig, axes = _figure(len(runs), title)
    for ax, (mode, run) in zip(axes, runs.items()):
        times = [(t - run.start) / run.scale for t, _, _ in run.samples]
        labels = sorted({label for _, pools, _ in run.samples for label in pools})
        if times and labels:
            series = [
                [pools.get(label, 0) for _, pools, _ in run.samples] for label in labels
            ]
            ax.stackplot(times, series, labels=labels, step="post")
            ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
        ax.set_ylabel("workers")
        ax.set_title(mode, fontsize=9, loc="left")
    axes[-1].set_xlabel("emulated seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
