"""The summary table: one row per method (final and best metric, rounds- and bytes-to-target,
MB, times, flags), the target, and one note per flag with its particulars."""

from __future__ import annotations

import math

from fedng.federated.report.flags import FINAL_DROP, LOSS_BLOWUP
from fedng.federated.report.summary import Summary


def _fmt(x: float, spec: str) -> str:
    return "never" if x == math.inf else ("-" if not math.isfinite(x) else format(x, spec))


FLAG_DEFINITIONS = (
    f"flags: DIVERGED = non-finite test metric/loss, non-finite train loss, train loss >"
    f" {LOSS_BLOWUP:g} x its first value, or final more than {FINAL_DROP:g} worse than best;"
    " REJECTED = client updates the server rejected / sent (all rounds and seeds); STALLED ="
    " rounds that aggregated no update; ONE-SHOT = one round of communication by design"
)
"""The flags' definitions, printed under a table that shows a flag (see `report.flags`)."""


def table(rows: list[Summary], metric: str, target: float | None, markdown: bool = False) -> str:
    """The summary table (plain text, or markdown), then the flags' particulars, if any.

    Args:
        rows: one summary per method.
        metric: the test metric's name.
        target: the target value (None: no target).
        markdown: a markdown table instead of aligned text.

    Returns:
        The table, the target, and one note line per flag of each row (with the flags'
        definitions when any row is flagged).
    """
    head = [
        "method",
        f"final {metric} (median [min, max])",
        "best",
        "rounds→target",
        "MB→target",
        "MB total",
        "client s",
        "server s",
        "flags",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.label,
                f"{r.final_median:.4f} [{r.final_min:.4f}, {r.final_max:.4f}]",
                f"{r.best_median:.4f}",
                _fmt(r.rounds_to_target, ".0f"),
                _fmt(
                    r.bytes_to_target / 1e6
                    if math.isfinite(r.bytes_to_target)
                    else r.bytes_to_target,
                    ".2f",
                ),
                f"{r.total_mb:.2f}",
                f"{r.client_s * 1e3:.1f}ms",
                f"{r.server_s * 1e3:.1f}ms",
                ", ".join(r.flags) or "-",
            ]
        )
    note = f"target {metric} = {target:.4f}" if target is not None else "no target"
    notes = [line for r in rows for line in r.notes()]
    if notes:
        notes.append(FLAG_DEFINITIONS)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        extra = "".join(f"- {n}\n" for n in notes)
        return "\n".join(lines) + f"\n\n{note}\n" + (f"\n{extra}" if extra else "")
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*head).rstrip(), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    lines += [fmt.format(*row).rstrip() for row in body]
    return "\n".join([*lines, note, *notes])
