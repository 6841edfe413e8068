"""What a simulation reports: the per-round history, summaries over seeds, and plots."""

from fedng.federated.report.flags import RunFlags, divergence, flags_of, reason_kind
from fedng.federated.report.history import History, RoundRecord
from fedng.federated.report.plots import describe, figure, plot_histories
from fedng.federated.report.summary import Summary, summarize
from fedng.federated.report.table import FLAG_DEFINITIONS, table

__all__ = [
    "FLAG_DEFINITIONS",
    "History",
    "RoundRecord",
    "RunFlags",
    "Summary",
    "describe",
    "divergence",
    "figure",
    "flags_of",
    "plot_histories",
    "reason_kind",
    "summarize",
    "table",
]
