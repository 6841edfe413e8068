"""Server time per round and peak server memory against the number of clients K.

For each model (the digits MLP 64-64-10, an MLP 784-512-512-10, an MLP 784-1024^3-10) and each
server (FedAvg; FedNG with the "mean", "summable" and exact "fisher" aggregations), a few real
client updates are computed once (FedNG's client with K-FAC curvature, random data of the
model's input size) and serialized; the server then receives K replayed updates (each decoded
afresh from its bytes with its own client id, as a server receives them) through the streaming
`fedng.federated.ServerRound`, which validates and folds each one as it arrives. FedNG-summable's
second phase (the line search) is answered by the same clients' code.

Measured per (model, server, K), medians over `--repeats` rounds from the same state (5x as
many for a K whose rounds move under 5 MB of updates: the digits MLP at K 10 and 100):
- server time: the time spent inside `ServerRound` (validation, folding, the solve, the next
  broadcast); decoding the bytes and the clients' answers are not server work and not counted;
- peak server memory: the largest number of tensor bytes the round holds (its running sums,
  any held updates, plus the one update being folded), `ServerRound.nbytes`, and the peak RSS
  growth of the process during the round (sampled after each reply).
Also, for item 4 of issue 11: FedAvg's round against the bare weighted sum of the same decoded
deltas (no validation; each decoded afresh for it, as for the server), folded in the same loop
with `mean_delta`'s torch arithmetic (the target's reference), and, for information, against the
same deltas folded in place by the native kernel (`packed_fold.fold_update`, no checks).
And, for information, FedNG-summable's floor: what its round cannot do without — each reply's
arrays (delta, `c_k`, the int8 factors) folded by the same native kernel without any check
(each decoded afresh, in a loop of its own after the round: interleaved with the server's adds
it slowed them ~5%), plus the LAPACK of the pooled solve alone (per block two
Cholesky factorizations of the damped factors, as the server factorizes them, one GEMM and two
triangular-solve pairs; inputs prepared outside the timer), against FedAvg's round.
Times are wall time and the server thread's CPU time (`time.thread_time`).

A cell whose estimated time (from K=10) exceeds `--budget-s` or whose held bytes exceed
`--max-held-gb` is skipped and reported as such (FedNG-exact holds every update).

Usage: python bench/bench_server.py [--quick] [--models digits,mlp512,mlp1024] [--ks 10,100,1000]
Writes bench/results/bench_server.{json,md} and bench_server.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from fedng.curvature import KFAC
from fedng.curvature.packed_fold import fold_update
from fedng.curvature.quantize import SCALE_SUFFIX, VEC_CHUNK, fold_plan, payload_segments
from fedng.federated.aggregation.matvec import block_vectors
from fedng.federated.aggregation.psd import PAD, padded
from fedng.federated.aggregation.summable import CONTRIB_PREFIX
from fedng.federated.aggregation.sums import WeightedSum
from fedng.federated.algorithms.fedng_server import CurvatureSums
from fedng.federated.client.params import get_params
from fedng.federated.config import make_configs
from fedng.federated.messages import ClientUpdate
from fedng.federated.round import client_step, server_init
from fedng.federated.server_round import ServerRound
from fedng.federated.tasks.base import ClientData, mlp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS_DIR, CpuMonitor, busy_warning, machine_info

MODELS: dict[str, list[int]] = {
    "digits": [64, 64, 10],
    "mlp512": [784, 512, 512, 10],
    "mlp1024": [784, 1024, 1024, 1024, 10],
}
SERVERS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("fedavg", {}),
    "fedng-mean": ("fedng", {"aggregation": "mean"}),
    "fedng-summable": ("fedng", {"aggregation": "summable"}),
    "fedng-exact": ("fedng", {"aggregation": "fisher"}),
}
BASE_UPDATES = 4
"""Distinct client updates computed per (model, server); replies replay them round-robin."""
SMALL_ROUND_BYTES = 5_000_000
SMALL_REPEATS = 5
"""A K whose updates total at most SMALL_ROUND_BYTES for every server is repeated SMALL_REPEATS
times as often: such rounds take ~1 ms, and a median of 3 of them is mostly noise."""


def _rss() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _clients(
    sizes: list[int], algo: str, extra: dict[str, Any]
) -> tuple[Any, list[ClientUpdate], list[bytes]]:
    """The server state and BASE_UPDATES real client updates (objects and wire bytes)."""
    torch.manual_seed(0)
    cc, sc = make_configs(algo, {"local_steps": 2, "batch_size": 64, **extra})
    model = mlp(sizes)
    state, msg = server_init(get_params(model), sc)
    ups, blobs = [], []
    for c in range(BASE_UPDATES):
        gen = torch.Generator().manual_seed(c)
        x = torch.randn(128, sizes[0], generator=gen)
        y = torch.randint(0, sizes[-1], (128,), generator=gen)
        u = client_step(model, ClientData(c, x, y, x[:8], y[:8]), msg, cc)
        ups.append(u)
        blobs.append(u.to_bytes())
    return state, ups, blobs


class BareFold:
    """A summable reply's arrays (delta, `c_k`, the int8 payload) folded into float32 sums by
    `fold_update` alone: no check, no plan, no Python path (the floor of the server's fold)."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.payload: tuple[torch.Tensor, tuple[int, ...], str] | None = None
        self.cpu_s = 0.0

    def fold(self, u: ClientUpdate, weight: float) -> None:
        xs = [*u.delta.values(), *(v for k, v in u.extras.items() if k.startswith(CONTRIB_PREFIX))]
        meta = u.meta["curv"]
        if not self.sums:
            self.sums = [torch.zeros(v.shape, dtype=torch.float32) for v in xs]
            kind = next(iter(meta["int8"]))
            segs, nacc, _, _ = fold_plan(payload_segments(meta)[kind])
            self.payload = (torch.zeros(nacc), segs, kind)
        assert self.payload is not None
        acc8, segs, kind = self.payload
        q, side = u.curvature[kind], u.curvature[kind + SCALE_SUFFIX]
        c0 = time.thread_time()
        fold_update(self.sums, xs, weight, (acc8, q, side, segs, VEC_CHUNK))
        self.cpu_s += time.thread_time() - c0


def bare_solve_cpu_s(rnd: ServerRound) -> float | None:
    """CPU time of the pooled solve's LAPACK alone (`summable._kron_direction`'s calls: per
    block two Cholesky factorizations of the damped factors, padded as the server pads them,
    one GEMM, two triangular-solve pairs) on the round's own pooled factors and mean; None when
    the round took no K-FAC summable step."""
    acc = rnd.acc
    if not isinstance(acc, CurvatureSums) or acc.pooled is None or acc.direction is None:
        return None
    rep = acc.pooled.reps.get("kfac")
    if not isinstance(rep, KFAC):
        return None
    ms = block_vectors(acc.pooled, acc.direction.mean)
    jobs = []
    for j, i in enumerate(acc.pooled.groups["kfac"]):
        if acc.direction.blocks[i] is None:
            continue
        root = acc.direction.lams[i] ** 0.5
        shifted = []
        for f, damp in ((rep.A[j], root * rep.pi(j)), (rep.G[j], root / rep.pi(j))):
            n = f.shape[0]
            pad = PAD if padded(n) else 0
            buf = torch.eye(n + pad)
            buf[:n, :n] = f
            buf[:n, :n].diagonal().add_(damp)
            shifted.append(buf)
        jobs.append((shifted, ms[i].contiguous(), rep.A[j]))
    c0 = time.thread_time()
    for (sa, sg), m, a in jobs:
        la = torch.linalg.cholesky_ex(sa).L[: a.shape[0], : a.shape[0]]
        lg = torch.linalg.cholesky_ex(sg).L[: m.shape[0], : m.shape[0]]
        t = torch.addmm(m, m, a, alpha=0.5)
        v = torch.cholesky_solve(t, lg)
        torch.cholesky_solve(v.T, la)
    return time.thread_time() - c0


def one_round(state: Any, ups: list[ClientUpdate], blobs: list[bytes], k: int) -> dict[str, Any]:
    """One streamed round of k replayed updates: server time (wall and CPU), held bytes, RSS
    growth, log; and the bare weighted sum of the same k deltas (FedAvg's fold without any
    check), each decoded afresh for it as for the server, folded in the same loop; for a
    summable round also its floor (`BareFold`, `bare_solve_cpu_s`)."""
    rss0 = _rss()
    peak_rss = 0
    peak_held = 0
    bare, bare_cpu, nat_cpu = 0.0, 0.0, 0.0
    acc = WeightedSum()
    nat: list[torch.Tensor] = []
    rnd = ServerRound(state)
    summable = ups[0].meta.get("curv", {}).get("int8") and any(
        key.startswith(CONTRIB_PREFIX) for key in ups[0].extras
    )
    bare_fold = BareFold() if summable else None
    for i in range(k):
        u = ClientUpdate.from_bytes(blobs[i % len(blobs)])
        u.client_id = i
        size = sum(
            v.numel() * v.element_size()
            for p in (u.delta, u.curvature, u.extras)
            for v in p.values()
        )
        rnd.add(u)
        fresh = ClientUpdate.from_bytes(blobs[i % len(blobs)])  # as fresh as the server's
        mine = fresh.delta
        t0, c0 = time.perf_counter(), time.thread_time()
        acc.fold(mine, 1.0 / k)
        bare += time.perf_counter() - t0
        bare_cpu += time.thread_time() - c0
        vals = list(mine.values())  # the same deltas into float32 sums in place, natively
        if not nat:
            nat = [torch.zeros(v.shape, dtype=torch.float32) for v in vals]
        c0 = time.thread_time()
        fold_update(nat, vals, 1.0 / k)
        nat_cpu += time.thread_time() - c0
        del fresh, mine
        peak_held = max(peak_held, rnd.nbytes + size)
        del u
        peak_rss = max(peak_rss, _rss() - rss0)
    probe = rnd.probe()
    if probe is not None:
        answers = [rnd.algo.answer_probe(u, probe) for u in ups]
        for i in range(k):
            r = answers[i % len(answers)]
            r.client_id = i
            rnd.add_reply(r)
    new, _ = rnd.finish()
    solve = bare_solve_cpu_s(rnd) if bare_fold is not None else None
    if bare_fold is not None:  # after the round: its own loop, not between the server's adds
        for i in range(k):
            bare_fold.fold(ClientUpdate.from_bytes(blobs[i % len(blobs)]), 1.0 / k)
    peak_rss = max(peak_rss, _rss() - rss0)
    log = {a: b for a, b in new.log.items() if a not in ("accepted", "rejected")}
    rejected = len(new.log.get("rejected", {}))
    return {
        "server_s": float(new.log["server_time_s"]),
        "server_cpu_s": rnd.cpu_server,
        "bare_sum_s": bare,
        "bare_sum_cpu_s": bare_cpu,
        "native_sum_cpu_s": nat_cpu,
        "bare_fold_cpu_s": bare_fold.cpu_s if bare_fold is not None else None,
        "bare_solve_cpu_s": solve,
        "held_bytes": peak_held,
        "rss_growth": peak_rss,
        "rejected": rejected,
        "log": log,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The whole grid; per (model, K) the servers' rounds are interleaved repeat by repeat, so
    that a change of the machine's load hits every server alike (ratios are same-run)."""
    mon = CpuMonitor()
    cells: list[dict[str, Any]] = []
    for model in args.models:
        sizes = MODELS[model]
        clients = {s: _clients(sizes, *SERVERS[s]) for s in args.servers}
        first: dict[str, float] = {}
        for k in args.ks:
            live: list[str] = []
            for server in args.servers:
                upd_bytes = len(clients[server][2][0])
                cell: dict[str, Any] = {
                    "model": model,
                    "server": server,
                    "K": k,
                    "update_bytes": upd_bytes,
                }
                held_est = k * upd_bytes if server == "fedng-exact" else 0
                est = first.get(server, 0.0) * k / args.ks[0]
                if held_est > args.max_held_gb * 1e9:
                    cell["skipped"] = f"would hold {held_est / 1e9:.1f} GB of updates"
                elif est > args.budget_s:
                    cell["skipped"] = f"estimated {est:.0f} s per round"
                else:
                    live.append(server)
                    cell["runs"] = []
                cells.append(cell)
                if "skipped" in cell:
                    print(f"  {model:<8} {server:<15} K={k:<5} skipped: {cell['skipped']}")
            big = any(k * len(clients[s][2][0]) >= 2e9 for s in live)
            small = all(k * len(clients[s][2][0]) <= SMALL_ROUND_BYTES for s in live)
            reps = 1 if big else args.repeats * (SMALL_REPEATS if small else 1)
            for _ in range(reps):
                for server in live:
                    state, ups, blobs = clients[server]
                    _get(cells, model, server, k)["runs"].append(one_round(state, ups, blobs, k))  # type: ignore[index]
            for server in live:
                cell = _get(cells, model, server, k) or {}
                runs = cell.pop("runs")
                cell.update(
                    {
                        "server_s": statistics.median(r["server_s"] for r in runs),
                        "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
                        "server_s_all": [r["server_s"] for r in runs],
                        "held_bytes": max(r["held_bytes"] for r in runs),
                        "rss_growth": max(r["rss_growth"] for r in runs),
                        "rejected": runs[0]["rejected"],
                        "log": runs[0]["log"],
                        "repeats": reps,
                    }
                )
                for key in ("bare_fold_cpu_s", "bare_solve_cpu_s"):
                    got = [r[key] for r in runs if r[key] is not None]
                    if len(got) == len(runs):
                        cell[key] = statistics.median(got)
                if server == "fedavg":
                    cell["bare_sum_s"] = statistics.median(r["bare_sum_s"] for r in runs)
                    cell["bare_sum_cpu_s"] = statistics.median(r["bare_sum_cpu_s"] for r in runs)
                    cell["native_sum_cpu_s"] = statistics.median(
                        r["native_sum_cpu_s"] for r in runs
                    )
                first.setdefault(server, cell["server_s"])
                print(
                    f"  {model:<8} {server:<15} K={k:<5} {cell['server_s'] * 1e3:9.1f} ms"
                    f"  held {cell['held_bytes'] / 1e6:8.1f} MB"
                    f"  rss +{cell['rss_growth'] / 1e6:7.1f} MB",
                    flush=True,
                )
    usage = mon.stop()
    return {
        "cells": cells,
        "cpu_usage": usage,
        "busy": busy_warning(usage),
        "machine": machine_info(),
    }


def _get(cells: list[dict[str, Any]], model: str, server: str, k: int) -> dict[str, Any] | None:
    return next((c for c in cells if (c["model"], c["server"], c["K"]) == (model, server, k)), None)


def verdicts(cells: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, from the cells that ran."""
    out = []

    def ratio(model: str, k: int, server: str = "fedng-summable") -> str:
        a, b = _get(cells, model, server, k), _get(cells, model, "fedavg", k)
        if a is None or b is None or "server_s" not in a or "server_s" not in b:
            return f"{server} / FedAvg at K={k} on {model}: not run"
        r = a["server_s"] / b["server_s"]
        met = "met" if r <= 3 else "MISSED"
        cpu = a["server_cpu_s"] / b["server_cpu_s"]
        return (
            f"{server} / FedAvg server time at K={k} on {model}: {r:.2f}x (target <= 3x: {met});"
            f" CPU time {cpu:.2f}x"
        )

    out.append(ratio("mlp512", 100))
    out.append(ratio("digits", 1000))
    for model in MODELS:
        for server in SERVERS:
            a, b = _get(cells, model, server, 100), _get(cells, model, server, 1000)
            if a and b and "held_bytes" in a and "held_bytes" in b:
                g = b["held_bytes"] / a["held_bytes"] - 1
                out.append(
                    f"memory {server} on {model}, K=100 -> 1000: {100 * g:+.1f}% held bytes"
                    f" (target within 10%: {'met' if abs(g) <= 0.10 else 'MISSED'})"
                )
    for c in cells:
        if c["server"] == "fedavg" and "bare_sum_s" in c:
            r = c["server_s"] / c["bare_sum_s"]
            cpu = c["server_cpu_s"] / c["bare_sum_cpu_s"]
            out.append(
                f"FedAvg round / bare weighted sum, {c['model']} K={c['K']}: {r:.2f}x"
                f" (target <= 1.5x: {'met' if r <= 1.5 else 'MISSED'}); CPU time {cpu:.2f}x"
            )
    for c in cells:  # not a target: what the summable round cannot do without
        f = _get(cells, c["model"], "fedavg", c["K"])
        if "bare_solve_cpu_s" in c and f and "server_cpu_s" in f:
            fold, solve, avg = c["bare_fold_cpu_s"], c["bare_solve_cpu_s"], f["server_cpu_s"]
            out.append(
                f"(info) {c['server']} floor, {c['model']} K={c['K']}: {c['K']} bare folds"
                f" {fold * 1e3:.1f} ms + bare pooled solve {solve * 1e3:.1f} ms ="
                f" {(fold + solve) / avg:.2f}x FedAvg's round (CPU {avg * 1e3:.1f} ms); the round"
                f" itself {c['server_cpu_s'] / avg:.2f}x"
            )
    for c in cells:  # not a target: the bare sum above is torch's; this is our in-place kernel
        if c["server"] == "fedavg" and c.get("native_sum_cpu_s"):
            out.append(
                f"(info) FedAvg round / native in-place weighted sum (`packed_fold.fold_update`,"
                f" no checks), {c['model']} K={c['K']}: CPU time"
                f" {c['server_cpu_s'] / c['native_sum_cpu_s']:.2f}x"
            )
    return out


def markdown(res: dict[str, Any], args: argparse.Namespace) -> str:
    """The table."""
    lines = [
        "# bench_server: server time per round and peak server memory vs K",
        "",
        f"Models {args.models}, K {args.ks}, repeats {args.repeats} ({SMALL_REPEATS}x for a K"
        f" whose updates total under {SMALL_ROUND_BYTES / 1e6:g} MB); times are medians of"
        " the time spent inside ServerRound (wall, and the server thread's CPU time, which a"
        " loaded machine does not inflate by descheduling); memory = tensor bytes the round"
        " holds at its peak (sums + held updates + the update in flight), and the process's RSS"
        " growth. The bare weighted sum folds the same decoded deltas in the same rounds.",
        "",
        "| model | server | K | update MB | server time / round | CPU time / round | per update"
        " | held MB | RSS growth MB | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in res["cells"]:
        if "skipped" in c:
            lines.append(
                f"| {c['model']} | {c['server']} | {c['K']} | {c['update_bytes'] / 1e6:.2f}"
                f" | - | - | - | - | - | skipped: {c['skipped']} |"
            )
            continue
        note = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in c["log"].items()
            if k != "server_time_s"
        )
        lines.append(
            f"| {c['model']} | {c['server']} | {c['K']} | {c['update_bytes'] / 1e6:.2f} |"
            f" {c['server_s'] * 1e3:.1f} ms | {c['server_cpu_s'] * 1e3:.1f} ms |"
            f" {c['server_s'] / c['K'] * 1e3:.2f} ms |"
            f" {c['held_bytes'] / 1e6:.1f} | {c['rss_growth'] / 1e6:.1f} | {note[:120]} |"
        )
    lines += ["", "## Targets", ""] + [f"- {v}" for v in verdicts(res["cells"])]
    if res.get("busy"):
        lines += ["", f"Note: {res['busy']}"]
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """Server time per round against K, one panel per model, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({c["model"] for c in res["cells"]}, key=list(MODELS).index)
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for server in SERVERS:
            pts = [
                (c["K"], c["server_s"])
                for c in res["cells"]
                if c["model"] == model and c["server"] == server and "server_s" in c
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=server)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clients per round K")
        ax.set_ylabel("server time per round (s)")
        ax.set_title(f"{model} ({'-'.join(map(str, MODELS[model]))})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--servers", default=",".join(SERVERS))
    p.add_argument("--ks", default="10,100,1000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=120.0, help="skip cells estimated slower")
    p.add_argument("--max-held-gb", type=float, default=4.0, help="skip cells holding more")
    p.add_argument("--quick", action="store_true", help="digits and mlp512, K 10 and 100, 1 repeat")
    p.add_argument("--out", default=str(RESULTS_DIR / "bench_server"))
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.servers = [s for s in args.servers.split(",") if s]
    args.ks = [int(k) for k in args.ks.split(",") if k]
    if args.quick:
        args.models = [m for m in args.models if m != "mlp1024"]
        args.ks = [k for k in args.ks if k <= 100]
        args.repeats = 1
    bad = [m for m in args.models if m not in MODELS] + [
        s for s in args.servers if s not in SERVERS
    ]
    if bad:
        print(f"bench_server: unknown models/servers {bad}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    res = run(args)
    res["args"] = vars(args)
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    md = markdown(res, args)
    out.with_suffix(".md").write_text(md)
    plot(res, out.with_suffix(".png"))
    print(md)
    print(f"wrote {out.with_suffix('.json')}, .md, .png ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
