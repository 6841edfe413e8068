"""PNG plots of histories: the test metric against rounds and against communicated bytes.

Each plot's title names the task, the clients, the participation and the seeds; each method's
line is the median over its seeds and the shaded band the min-max over them, which the legend
says; a method flagged by `report.flags` (diverged, rejected updates, one-shot) carries its flags
in its legend label.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedng.federated.report.history import History
from fedng.federated.report.summary import summarize

if TYPE_CHECKING:  # matplotlib is imported when a plot is drawn, not with the package
    from matplotlib.figure import Figure

AXES: dict[str, tuple[str, str]] = {
    "round": ("metric_vs_rounds.png", "round"),
    "cum_bytes": ("metric_vs_bytes.png", "MB (uplink + downlink)"),
}
"""x-axis key -> (file name, axis label)."""


def _stack(hs: list[History], key: str) -> np.ndarray:
    n = min(len(h.rounds) for h in hs)
    return np.array([[getattr(r, key) for r in h.rounds[:n]] for h in hs], dtype=float)


def _fmt_participation(p: object) -> str:
    return f"{p:g}" if isinstance(p, float | int) else str(p)


def describe(groups: dict[str, list[History]]) -> str:
    """The setting of the runs: task, clients, participation, seeds.

    Args:
        groups: label -> the histories of its seeds.

    Returns:
        e.g. "digits(alpha=0.1): 20 clients, participation 0.5, seeds 0,1,2".
    """
    hs = [h for group in groups.values() for h in group]
    first = hs[0]
    clients = sorted({h.sim.get("num_clients") for h in hs}, key=str)
    parts = sorted({_fmt_participation(h.sim.get("participation")) for h in hs})
    seeds = sorted({h.seed for h in hs})
    return (
        f"{first.task}: {'/'.join(str(c) for c in clients)} clients, participation"
        f" {'/'.join(parts)}, seed{'s' if len(seeds) > 1 else ''}"
        f" {','.join(str(s) for s in seeds)}"
    )


def band_label(groups: dict[str, list[History]]) -> str | None:
    """The legend entry that explains the shaded band (None when no method has two seeds)."""
    counts = sorted({len(hs) for hs in groups.values()})
    if counts[-1] < 2:
        return None
    n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"line: median, band: min-max over {n} seeds"


def _label(label: str, hs: list[History]) -> str:
    """A method's legend label, with its flags."""
    flags = summarize(label, hs, None).flags
    return f"{label} [{', '.join(flags)}]" if flags else label


def figure(groups: dict[str, list[History]], xkey: str = "round", title: str = "") -> Figure:
    """One plot of the test metric (median over seeds, min-max band) against `xkey`.

    Args:
        groups: label -> the histories of its seeds.
        xkey: "round" or "cum_bytes".
        title: a first title line (omitted when empty or just the task's name); the second
            line is always `describe(groups)`.

    Returns:
        The matplotlib figure (the caller saves and closes it).

    Raises:
        ValueError: an unknown `xkey`, or no histories.
    """
    if xkey not in AXES:
        raise ValueError(f"figure: 'xkey' must be one of {list(AXES)}, got {xkey!r}")
    if not groups or not all(groups.values()):
        raise ValueError("figure: 'groups' must hold at least one history per label")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    first = next(iter(groups.values()))[0]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for label, hs in groups.items():
        y = _stack(hs, "metric")
        x = np.median(_stack(hs, xkey), axis=0)
        if xkey == "cum_bytes":
            x = x / 1e6
        (line,) = ax.plot(x, np.median(y, axis=0), label=_label(label, hs), lw=1.6)
        if len(hs) > 1:
            ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.15)
    ax.set_xlabel(AXES[xkey][1])
    ax.set_ylabel(f"test {first.metric}")
    if xkey == "cum_bytes":
        ax.set_xscale("symlog", linthresh=1.0)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    band = band_label(groups)
    if band is not None:
        handles.append(Patch(color="0.5", alpha=0.3))
        labels.append(band)
    ax.legend(handles, labels, fontsize=8)
    setting = describe(groups)
    head = title if title and title != first.task else ""
    ax.set_title(f"{head}\n{setting}" if head else setting, fontsize=10)
    fig.tight_layout()
    return fig


def plot_histories(
    groups: dict[str, list[History]], out_dir: str | Path, title: str = ""
) -> list[Path]:
    """Writes `metric_vs_rounds.png` and `metric_vs_bytes.png` (see `figure`).

    Args:
        groups: label -> the histories of its seeds.
        out_dir: the folder to write into.
        title: a first title line (see `figure`).

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for xkey, (fname, _) in AXES.items():
        fig = figure(groups, xkey, title)  # selects the Agg backend before pyplot's import
        import matplotlib.pyplot as plt

        path = out / fname
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
