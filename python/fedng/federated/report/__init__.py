"""What a simulation reports: the per-round history, summaries over seeds, and plots."""

from fedng.federated.report.history import History, RoundRecord
from fedng.federated.report.plots import plot_histories
from fedng.federated.report.summary import Summary, summarize, table

__all__ = ["History", "RoundRecord", "Summary", "plot_histories", "summarize", "table"]
