"""Ready-made Flower components for a FAB: the run config names a fedng task and algorithm.

[tool.flwr.app.components]
serverapp = "fedng.flower.apps:server_app"
clientapp = "fedng.flower.apps:client_app"

Under secure aggregation (SecAgg+; `fedng.flower.secure`) use `secure_server_app` and
`secure_client_app` instead.
"""

from __future__ import annotations

from fedng.flower.client_app import make_client_app
from fedng.flower.secure import make_secure_client_app, make_secure_server_app
from fedng.flower.server_app import make_server_app

server_app = make_server_app()
client_app = make_client_app()
secure_server_app = make_secure_server_app()
secure_client_app = make_secure_client_app()

__all__ = ["client_app", "secure_client_app", "secure_server_app", "server_app"]
