"""PNG plots of histories: the test metric against rounds and against communicated bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedng.federated.report.history import History


def _stack(hs: list[History], key: str) -> np.ndarray:
    n = min(len(h.rounds) for h in hs)
    return np.array([[getattr(r, key) for r in h.rounds[:n]] for h in hs], dtype=float)


def plot_histories(
    groups: dict[str, list[History]], out_dir: str | Path, title: str = ""
) -> list[Path]:
    """Writes `metric_vs_rounds.png` and `metric_vs_bytes.png` (median over seeds, min-max band).

    Args:
        groups: label -> the histories of its seeds.
        out_dir: the folder to write into.
        title: plot title.

    Returns:
        The paths written.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    first = next(iter(groups.values()))[0]
    ylabel = f"test {first.metric}"
    paths = []
    for xkey, fname, xlabel in (
        ("round", "metric_vs_rounds.png", "round"),
        ("cum_bytes", "metric_vs_bytes.png", "MB (uplink + downlink)"),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
        for label, hs in groups.items():
            y = _stack(hs, "metric")
            x = np.median(_stack(hs, xkey), axis=0)
            if xkey == "cum_bytes":
                x = x / 1e6
            med = np.median(y, axis=0)
            (line,) = ax.plot(x, med, label=label, lw=1.6)
            if len(hs) > 1:
                ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if xkey == "cum_bytes":
            ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
