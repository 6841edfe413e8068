"""Plot titles and legends say what was run and what the band is (the figure, not pixels)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from fedng.federated.report import History, describe, figure, plot_histories
from test_fed_report import planted


def _texts(
    groups: dict[str, list[History]], xkey: str = "round", title: str = ""
) -> tuple[str, list[str]]:
    """The figure's title and legend labels."""
    fig = figure(groups, xkey, title)
    try:
        ax = fig.axes[0]
        legend = ax.get_legend()
        return ax.get_title(), [t.get_text() for t in legend.get_texts()]
    finally:
        plt.close(fig)


def test_title_names_task_clients_participation_seeds() -> None:
    groups = {
        "fedavg": [planted([0.1, 0.4, 0.5], seed=s) for s in (0, 1, 2)],
        "fedng": [planted([0.1, 0.5, 0.6], seed=s) for s in (0, 1, 2)],
    }
    assert describe(groups) == "toy: 8 clients, participation 0.5, seeds 0,1,2"
    for xkey in ("round", "cum_bytes"):
        title, labels = _texts(groups, xkey, title="toy")
        assert title == "toy: 8 clients, participation 0.5, seeds 0,1,2"
        assert labels == ["fedavg", "fedng", "line: median, band: min-max over 3 seeds"]
    title, _ = _texts(groups, title="tuned winners")
    assert title.splitlines() == ["tuned winners", describe(groups)]


def test_one_seed_has_no_band_entry_and_flags_are_in_the_legend() -> None:
    groups = {
        "fedng": [planted([0.1, 0.4, 0.2, 0.1], [2.0, 2.0, 3e7])],
        "fedfisher": [planted([0.1, 0.6], algorithm="fedfisher")],
    }
    title, labels = _texts(groups)
    assert title == "toy: 8 clients, participation 0.5, seed 0"
    assert labels == ["fedng [DIVERGED 1/1]", "fedfisher [ONE-SHOT]"]


def test_band_entry_with_unequal_seed_counts() -> None:
    groups = {
        "a": [planted([0.1, 0.4], seed=s) for s in (0, 1)],
        "b": [planted([0.1, 0.4], seed=s) for s in (0, 1, 2)],
    }
    _, labels = _texts(groups)
    assert labels[-1] == "line: median, band: min-max over 2-3 seeds"


def test_plot_histories_writes_both_pngs(tmp_path: Path) -> None:
    groups = {"fedavg": [planted([0.1, 0.4, 0.5], seed=s) for s in (0, 1)]}
    paths = plot_histories(groups, tmp_path, title="toy")
    assert [p.name for p in paths] == ["metric_vs_rounds.png", "metric_vs_bytes.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    with pytest.raises(ValueError, match="'xkey'"):
        figure(groups, "bytes")
