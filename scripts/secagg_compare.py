#!/usr/bin/env python3
"""FedNG under SecAgg+ against the same plaintext run (same seed, same clients), in process.

    python scripts/secagg_compare.py [--clients 5] [--rounds 10] [--curvature kfac] [--out F]

Both runs use Flower's real components over fedng's in-process `LocalGrid` (no Ray): the
plaintext one `FedNGStrategy` with the ready-made ClientApp, the secure one
`SecureFedNGStrategy` with `secaggplus_mod`. Prints (and writes with --out) a JSON report: per
round the max |theta_secure - theta_plain|, both accuracies, the largest quantization bound of
the round's secure sums, the clipped fraction, and the bytes both runs moved (Flower's serialized
message contents, both directions, every message of the round: SecAgg+'s key exchange included).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedng.federated.report.history import History
from fedng.flower import RunSpec, make_client_app, run_server
from fedng.flower.secure import CountingGrid, make_secure_client_app, run_secure
from fedng.flower.testing import LocalGrid


def compare(clients: int, rounds: int, settings: dict[str, Any], seed: int = 0) -> dict[str, Any]:
    """Runs both and returns the report (see the module docstring)."""
    spec = RunSpec(
        algorithm="fedng",
        rounds=rounds,
        seed=seed,
        task="digits",
        task_args={"num_clients": clients, "alpha": 0.5, "seed": seed},
        settings={"local_steps": 5, "lr": 0.05, **settings},
    )
    task = spec.make_task()
    params: dict[str, list[Any]] = {"plain": [], "secure": [], "ref": []}

    def keep(name: str) -> Any:
        return lambda st, h: params[name].append({k: v.clone() for k, v in st.params.items()})

    plain_bytes: list[int] = []
    counting = CountingGrid(
        LocalGrid(make_client_app(lambda s: task), clients, spec.to_run_config())
    )
    last = [0]

    def on_plain(state: Any, hist: History) -> None:
        params["plain"].append({k: v.clone() for k, v in state.params.items()})
        total = counting.up + counting.down
        plain_bytes.append(total - last[0])
        last[0] = total

    t0 = time.perf_counter()
    plain = run_server(counting, spec, task, on_round=on_plain)  # round 1 holds the query too
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = LocalGrid(make_secure_client_app(lambda s: task), clients, spec.to_run_config())
    secure = run_secure(grid, spec, task, on_round=keep("secure"))
    t_secure = time.perf_counter() - t0
    # reference: the plaintext run again, streaming (float sums in arrival order: the same
    # rounds up to rounding), to tell training's own sensitivity from the quantization's
    stream = replace(spec, streaming=True)
    app = make_client_app(lambda s: task)
    run_server(LocalGrid(app, clients, stream.to_run_config()), stream, task, on_round=keep("ref"))
    rows = []
    for r in range(rounds):
        a, b = params["secure"][r], params["plain"][r]
        rec_s, rec_p = secure.history.rounds[r + 1], plain.history.rounds[r + 1]
        rep = secure.reports[r]
        rows.append(
            {
                "round": r + 1,
                "max_abs_dtheta": max(float((a[k] - b[k]).abs().max()) for k in b),
                "max_abs_dtheta_streaming_vs_batch": max(
                    float((params["ref"][r][k] - b[k]).abs().max()) for k in b
                ),
                "acc_plain": rec_p.metric,
                "acc_secure": rec_s.metric,
                "max_sum_bound": rep.log()["max_bound"],
                "clipped_fraction": rep.clipped,
                "passes": rep.passes,
                "bytes_plain_flower": plain_bytes[r],
                "bytes_plain_fedng_wire": rec_p.bytes_up + rec_p.bytes_down,
                "bytes_secure_flower": rec_s.bytes_up + rec_s.bytes_down,
            }
        )
    return {
        "clients": clients,
        "rounds": rounds,
        "settings": spec.settings,
        "wall_s": {"plain": round(t_plain, 1), "secure": round(t_secure, 1)},
        "rounds_detail": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", type=int, default=5)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--curvature", default="kfac", choices=["kfac", "diag"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    logging.disable(logging.WARNING)
    report = compare(a.clients, a.rounds, {"curvature": a.curvature}, a.seed)
    text = json.dumps(report, indent=1)
    if a.out is not None:
        a.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
