"""FedNG under Flower's secure aggregation (SecAgg+, flwr 1.41's legacy workflow path).

The server sees only weighted sums of the clients' payloads: the summable FedNG round (deltas,
`c_k = F_k delta_k`, curvature payloads, then the line-search scalars) runs as up to three SecAgg+
passes with fixed-point scales the server chooses (`server`, `vector`, `secure_sum`).

- `make_secure_client_app` / `make_secure_server_app`: the ClientApp (with `secaggplus_mod`) and
  the ServerApp; `SecureFedNGStrategy`: the strategy (in-process with `LocalGrid` too).
- `check_secure`: one-line refusal of configurations that need each client's payload.
"""

from fedng.flower.secure.client import make_secure_client_app
from fedng.flower.secure.server import (
    CountingGrid,
    SecureFedNGStrategy,
    SecureRound,
    build_secure_strategy,
    check_secure,
    make_secure_server_app,
    run_secure,
    secure_round,
)

__all__ = [
    "CountingGrid",
    "SecureFedNGStrategy",
    "SecureRound",
    "build_secure_strategy",
    "check_secure",
    "make_secure_client_app",
    "make_secure_server_app",
    "run_secure",
    "secure_round",
]
