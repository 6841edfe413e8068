"""Resuming a simulation: the checkpoint of everything its next round depends on.

`fedng.federated.simulate(..., checkpoint_dir=..., resume=True)` writes a `RunCheckpoint` after
every round and restores from it; the file format and the atomic write are
`fedng.federated.checkpoint`'s.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fedng._typing import Arrays
from fedng.federated.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
    server_state_from_dict,
    server_state_to_dict,
)
from fedng.federated.config.common import ServerConfig
from fedng.federated.messages import ServerMessage, ServerState
from fedng.federated.report.history import History

CHECKPOINT_FILE = "checkpoint.pt"
"""The run checkpoint's name inside `checkpoint_dir`."""
MODEL_FILE = "model.pt"
"""The final global model's `state_dict` inside `checkpoint_dir`."""


class RunCheckpoint:
    """Saves and restores everything a simulation's next round depends on.

    That is: the server state (parameters, algorithm buffers and meta, config), the next
    broadcast, the client-sampling generator, every client's persistent `client_state`, the global
    RNGs (torch's CPU and CUDA generators: dropout, a shuffling DataLoader; Python's `random` and
    NumPy's legacy generator: a Dataset's own augmentations), the clients' workspace model
    (its buffers, e.g. BatchNorm statistics, carry over between clients), and the history so far.
    Batch orders and sketches are seeded from (seed, round, client) and need nothing more.

    Args:
        folder: `checkpoint_dir` (None: `save` does nothing).
        hist: the run's history (its identity fields and, on restore, its rounds).
        num_examples: every client's training examples (a cheap fingerprint of the data).
    """

    def __init__(self, folder: str | Path | None, hist: History, num_examples: list[int]) -> None:
        self.folder = None if folder is None else Path(folder)
        self.hist = hist
        self.identity = {
            "task": hist.task,
            "algorithm": hist.algorithm,
            "seed": hist.seed,
            "participation": hist.sim["participation"],
            "num_clients": hist.sim["num_clients"],
            "num_examples": num_examples,
            "client_config": hist.client_config,
            "server_config": hist.server_config,
        }

    @property
    def path(self) -> Path:
        """The checkpoint file (`checkpoint_dir` / "checkpoint.pt")."""
        return Path(self.folder or ".") / CHECKPOINT_FILE

    def exists(self) -> bool:
        """Whether there is a checkpoint to resume from."""
        return self.folder is not None and self.path.exists()

    def save(
        self,
        state: ServerState[ServerConfig],
        message: ServerMessage,
        rng: np.random.Generator,
        client_states: dict[int, Arrays],
        model: nn.Module,
    ) -> None:
        """Writes the checkpoint of the rounds done so far (atomically)."""
        if self.folder is None:
            return
        run = {
            "kind": "fedng.simulate",
            "identity": self.identity,
            "server": server_state_to_dict(state),
            "message": _message_to_dict(message),
            "sampler": rng.bit_generator.state,
            "client_states": {c: dict(s) for c, s in client_states.items()},
            "global_rngs": global_rng_states(),
            "workspace": model.state_dict(),
            # JSON keeps every float exactly (NaN included) and History is JSON by design
            "history": json.dumps(self.hist.to_dict()),
        }
        save_checkpoint(self.path, run)

    def restore(
        self,
        rounds: int,
        rng: np.random.Generator,
        client_states: dict[int, Arrays],
        model: nn.Module,
    ) -> tuple[ServerState[ServerConfig], ServerMessage]:
        """Loads the checkpoint into the run's objects; returns (server state, next message).

        Raises:
            CheckpointError: a corrupt file, one that is not a simulation checkpoint, of another
                run, or with more rounds than `rounds`.
        """
        ck = load_checkpoint(self.path)
        run = ck.state
        if run.get("kind") != "fedng.simulate":
            raise CheckpointError(f"checkpoint {str(self.path)!r}: not a simulation checkpoint")
        saved = run["identity"]
        differ = [k for k in self.identity if saved.get(k) != self.identity[k]]
        if differ:
            k = differ[0]
            raise CheckpointError(
                f"simulate: the checkpoint {str(self.path)!r} is of another run: {k} differs"
                f" ({str(saved.get(k))[:80]} there, {str(self.identity[k])[:80]} here)"
            )
        past = History.from_dict(json.loads(run["history"]))
        done = past.rounds[-1].round
        if done > rounds:
            raise CheckpointError(
                f"simulate: the checkpoint {str(self.path)!r} has {done} rounds, more than"
                f" 'rounds'={rounds}"
            )
        self.hist.rounds = past.rounds
        rng.bit_generator.state = run["sampler"]
        client_states.update({int(c): dict(s) for c, s in run["client_states"].items()})
        set_global_rng_states(run["global_rngs"])
        model.load_state_dict(run["workspace"])
        return server_state_from_dict(run["server"]), _message_from_dict(run["message"])


def global_rng_states() -> dict[str, Any]:
    """The process-wide random generators a client's step may draw from, as plain data."""
    np_state = np.random.get_state(legacy=False)
    key = np_state["state"]["key"]
    return {
        "torch": torch.get_rng_state(),
        # only a CUDA that is in use: querying it would initialize it
        "cuda": (
            torch.cuda.get_rng_state_all()
            if torch.cuda.is_initialized()  # type: ignore[no-untyped-call]  # unannotated in torch
            else []
        ),
        "python": random.getstate(),
        "numpy": {**np_state, "state": {**np_state["state"], "key": torch.from_numpy(key.copy())}},
    }


def set_global_rng_states(states: dict[str, Any]) -> None:
    """Inverse of `global_rng_states` (CUDA states only where as many devices exist)."""
    torch.set_rng_state(states["torch"])
    cuda = states["cuda"]
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(states["python"])
    np_state = states["numpy"]
    key = np_state["state"]["key"].numpy()
    np.random.set_state({**np_state, "state": {**np_state["state"], "key": key}})


def _message_to_dict(m: ServerMessage) -> dict[str, Any]:
    """A sealed broadcast as plain data (restored exactly, so its bytes are the same)."""
    return {
        "round": m.round,
        "algorithm": m.algorithm,
        "params": m.params,
        "extras": m.extras,
        "meta": m.meta,
        "symmetric": sorted(m.symmetric),
        "dtype": m.dtype,
        "nbytes": m.nbytes,
    }


def _message_from_dict(d: dict[str, Any]) -> ServerMessage:
    return ServerMessage(**{**d, "symmetric": frozenset(d["symmetric"])})
