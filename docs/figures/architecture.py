"""Draws docs/figures/architecture.png: the layers (left) and one federated round (right).

Run from the repository root: `python docs/figures/architecture.py` (needs matplotlib).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

LAYERS = [
    ("fedng.flower", "Strategy + ClientApp adapters (planned)", "#eeeeee"),
    ("fedng.federated", "round · algorithms · aggregation · client · validate · wire", "#dbe9f6"),
    ("fedng.optim", "NaturalGradient (source: local / global / mixed)", "#d9f0d3"),
    ("fedng.curvature", "capture hooks → stats → KFAC / diag / low-rank → CurvatureSet", "#fdf2d0"),
    ("fedng.ops", "validation, dispatch, float64 references", "#f6dcdc"),
    ("fedng._C  /  csrc/", "pybind11 raw pointers · C++ kernels · OpenBLAS", "#e6dcf6"),
]

ROUND = [
    ("server: broadcast", "θ_t + global curvature\n(inverses or factors)"),
    ("client: NaturalGradient steps", "F_global (+ own F_k) preconditions\nlocal SGD; F_k accumulates"),
    ("client: upload", "Δθ_k + F_k payload\n(packed triangles, fp32/bf16/fp16)"),
    ("server: validate", "decode, shapes, finite,\nsymmetric/PSD, median checks"),
    ("server: aggregate", "mean or Fisher-weighted Δ;\nΣ p_k F_k → EMA → invert"),
]


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, title: str, body: str,
        color: str) -> None:
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02", fc=color, ec="#555555"))
    ax.text(x + w / 2, y + h * 0.66, title, ha="center", va="center", fontsize=10,
            fontweight="bold", family="monospace")
    ax.text(x + w / 2, y + h * 0.28, body, ha="center", va="center", fontsize=7.5)


def arrow(ax: plt.Axes, x0: float, y0: float, x1: float, y1: float) -> None:
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=12,
                                 color="#333333"))


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 6.2))
    ax.set_xlim(0, 11)
    ax.set_ylim(-0.3, 6.4)
    ax.axis("off")
    ax.text(2.6, 6.2, "Layers (imports point down only)", ha="center", fontsize=11)
    h, gap = 0.72, 0.26
    for i, (name, body, color) in enumerate(LAYERS):
        y = 5.6 - (i + 1) * (h + gap) + gap
        box(ax, 0.2, y, 4.8, h, name, body, color)
        if i:
            arrow(ax, 2.6, y + h + gap - 0.02, 2.6, y + h + 0.02)
    ax.text(8.2, 6.2, "One federated round (FedNG)", ha="center", fontsize=11)
    for i, (title, body) in enumerate(ROUND):
        y = 5.6 - (i + 1) * (h + gap) + gap
        box(ax, 5.9, y, 4.6, h, title, body, "#ffffff")
        if i:
            arrow(ax, 8.2, y + h + gap - 0.02, 8.2, y + h + 0.02)
    top = 5.6 - (h + gap) + gap + h / 2
    bottom = 5.6 - len(ROUND) * (h + gap) + gap + h / 2
    ax.annotate("", xy=(10.55, top), xytext=(10.55, bottom),
                arrowprops={"arrowstyle": "-|>", "connectionstyle": "arc3,rad=0.3",
                            "color": "#888888"})
    ax.text(10.75, (top + bottom) / 2, "next\nround", fontsize=8, color="#666666", va="center")
    out = Path(__file__).with_suffix(".png")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
