"""Ready-made Flower components for a FAB: the run config names a fedng task and algorithm.

[tool.flwr.app.components]
serverapp = "fedng.flower.apps:server_app"
clientapp = "fedng.flower.apps:client_app"
"""

from __future__ import annotations

from fedng.flower.client_app import make_client_app
from fedng.flower.server_app import make_server_app

server_app = make_server_app()
client_app = make_client_app()

__all__ = ["client_app", "server_app"]
