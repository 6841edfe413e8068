"""Run fedng's algorithms on Flower (flwr 1.41): simulation and deployment engines.

Needs the `flower` extra (`pip install 'fedng[flower]'`, Python >= 3.11); importing this package
without it raises one ImportError line saying so.

- `FedNGStrategy`: any fedng algorithm's server step on Flower's Message API (validation and
  rejection log intact, seeded sampling, each reply folded in as it arrives).
- `make_client_app` / `make_server_app`: the ClientApp (the algorithm's client step on your model
  and data, per-client state in `Context.state`) and the ServerApp.
- `codec`: fedng messages as Flower records, byte for byte the simulator's wire.
- `RunSpec`: the run config both sides read.
- `testing.LocalGrid`: an in-process Grid (no Ray, no SuperLink) for tests.
"""

from fedng.flower._require import require_flwr

require_flwr()

from fedng.flower.client_app import make_client_app  # noqa: E402
from fedng.flower.codec import decode_message, decode_update, encode_message, encode_update  # noqa: E402
from fedng.flower.runconfig import RunSpec  # noqa: E402
from fedng.flower.server_app import build_strategy, make_server_app, run_server  # noqa: E402
from fedng.flower.strategy import FedNGStrategy  # noqa: E402

__all__ = [
    "FedNGStrategy",
    "RunSpec",
    "build_strategy",
    "decode_message",
    "decode_update",
    "encode_message",
    "encode_update",
    "make_client_app",
    "make_server_app",
    "run_server",
]
