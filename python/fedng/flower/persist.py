"""Checkpoints of a Flower run's server, in `fedng.federated.checkpoint`'s atomic format.

After every round the strategy writes `checkpoint.pt` (the server state, the next broadcast's
exact bytes, the sampler's generator, the history) and `history.json`; the ServerApp writes the
final global model as `model.pt` (a `state_dict`, as `simulate(checkpoint_dir=...)` does). Every
write is atomic (a temporary file, fsync, `os.replace`): a crash leaves the previous round's files.

The clients' persistent state is not in it: it lives on the nodes (`Context.state`, kept per
run), so a resumed run starts the clients' state afresh.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedng._typing import Arrays
from fedng.federated.algorithms.base import State
from fedng.federated.checkpoint import (
    CheckpointError,
    atomic_write,
    load_checkpoint,
    save_checkpoint,
    save_model,
    server_state_from_dict,
    server_state_to_dict,
)
from fedng.federated.client.params import set_params
from fedng.federated.messages import ServerMessage
from fedng.federated.report.history import History
from fedng.federated.resume import CHECKPOINT_FILE, MODEL_FILE
from fedng.federated.tasks.base import FederatedTask
from fedng.federated.wire import PayloadError

HISTORY_FILE = "history.json"
KIND = "fedng.flower"


class ServerCheckpoint:
    """The checkpoint folder of one Flower run.

    Args:
        folder: the folder (created when missing).
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        """The checkpoint file."""
        return self.folder / CHECKPOINT_FILE

    def exists(self) -> bool:
        """Whether there is a checkpoint to resume from."""
        return self.path.exists()

    def save(
        self,
        state: State,
        message: ServerMessage,
        rng: np.random.Generator,
        history: History,
        identity: dict[str, Any],
    ) -> None:
        """Writes the checkpoint of the rounds done so far, then `history.json` (both atomic)."""
        run = {
            "kind": KIND,
            "identity": identity,
            "server": server_state_to_dict(state),
            "message": message.to_bytes(),
            "sampler": rng.bit_generator.state,
            "history": json.dumps(history.to_dict()),
        }
        save_checkpoint(self.path, run)
        atomic_write(self.folder / HISTORY_FILE, history.to_json().encode())

    def restore(
        self, rng: np.random.Generator, history: History, identity: dict[str, Any], rounds: int
    ) -> tuple[State, ServerMessage]:
        """Loads the checkpoint: sets the sampler's state and the history's rounds; returns the
        server state and the next broadcast.

        Raises:
            CheckpointError: corrupt, not a Flower server checkpoint, of another run (what
                differs is named), with more rounds than `rounds`, or holding a broadcast of
                another wire format (one line).
        """
        run = load_checkpoint(self.path).state
        if run.get("kind") != KIND:
            raise CheckpointError(f"checkpoint {str(self.path)!r}: not a Flower server checkpoint")
        saved = run["identity"]
        differ = [k for k in identity if saved.get(k) != identity[k]]
        if differ:
            k = differ[0]
            raise CheckpointError(
                f"resume: the checkpoint {str(self.path)!r} is of another run: {k} differs"
                f" ({str(saved.get(k))[:80]} there, {str(identity[k])[:80]} here)"
            )
        past = History.from_dict(json.loads(run["history"]))
        if past.rounds[-1].round > rounds:
            raise CheckpointError(
                f"resume: the checkpoint {str(self.path)!r} has {past.rounds[-1].round} rounds,"
                f" more than num-server-rounds={rounds}"
            )
        try:  # before anything is changed: a checkpoint that fails leaves the caller's run as is
            message = ServerMessage.from_bytes(bytes(run["message"]))
        except PayloadError as err:  # e.g. written by a fedng of another wire format
            raise CheckpointError(
                f"resume: the checkpoint {str(self.path)!r} holds a broadcast this fedng cannot"
                f" read ({str(err)[:160]})"
            ) from err
        history.rounds = past.rounds
        rng.bit_generator.state = run["sampler"]
        return server_state_from_dict(run["server"]), message

    def save_model(self, task: FederatedTask, seed: int, params: Arrays) -> Path:
        """Writes the final global model as `model.pt` (the `state_dict` of `task.model_fn`)."""
        model = task.model_fn(seed)
        set_params(model, params)
        return save_model(self.folder / MODEL_FILE, model)
