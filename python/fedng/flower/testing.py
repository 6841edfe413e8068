"""An in-process Flower Grid: the real ClientApp on N nodes, no Ray, no SuperLink.

`LocalGrid` implements Flower's `Grid` interface by calling the ClientApp directly, each node with
its own `Context` (its `node_config` partition and its persistent `state`), and turns an exception
the ClientApp raises into the error reply Flower's runtime sends. Replies come back one per pull,
so a strategy that folds replies as they arrive is exercised as it is on a SuperLink. Hooks let a
test lose a reply (a timeout) or replace it (a malformed one).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

ReplyHook = Callable[[int, Message], Message | None]
"""(node id, reply) -> the reply actually delivered; None loses it (the server times out)."""

SERVER_NODE_ID = 1
CLIENT_APP_RAISED_EXCEPTION = 2
"""Flower's `ErrorCode.CLIENT_APP_RAISED_EXCEPTION`."""


def node_ids(num_nodes: int) -> list[int]:
    """Distinct node ids in reverse partition order (Flower's random ones are in no order)."""
    return [10_000 + 7919 * (num_nodes - i) for i in range(num_nodes)]


class LocalGrid(Grid):
    """Runs `client_app` in this process for `num_nodes` nodes serving partitions 0..N-1.

    Args:
        client_app: the ClientApp.
        num_nodes: nodes (node i serves `partition-id` i of `num-partitions` N).
        run_config: the run config every node sees (`RunSpec.to_run_config()`, or Flower's
            flattened `[tool.flwr.app.config]`).
        on_reply: a test hook that may replace or lose a reply.
        last_first: deliver the newest waiting reply first (replies out of send order).
        run_id: the run id.
    """

    def __init__(
        self,
        client_app: ClientApp,
        num_nodes: int,
        run_config: dict[str, bool | float | int | str],
        *,
        on_reply: ReplyHook | None = None,
        last_first: bool = False,
        run_id: int = 1,
    ) -> None:
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SERVER_NODE_ID
        TaskIdentity.task_id = 1
        self.client_app = client_app
        self.on_reply = on_reply
        self.last_first = last_first
        self._run = Run.create_empty(run_id)
        self.nodes = node_ids(num_nodes)
        self.contexts = {
            n: Context(
                run_id=run_id,
                node_id=n,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for i, n in enumerate(self.nodes)
        }
        self.replies: dict[str, Message] = {}
        self.alive = set(self.nodes)

    def set_run(self, run: Run) -> None:
        """Sets the run."""
        self._run = run

    @property
    def run(self) -> Run:
        """The run."""
        return self._run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """A message from the server to `dst_node_id`."""
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The live nodes."""
        return [n for n in self.nodes if n in self.alive]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Runs the ClientApp for each message now; its reply waits to be pulled."""
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = mid
            ids.append(mid)
            node = msg.metadata.dst_node_id
            if node not in self.alive:
                continue
            try:  # each node gets its own copy, as serialization gives it on a real grid
                reply = self.client_app(copy.deepcopy(msg), self.contexts[node])
            except Exception as err:  # what Flower's runtime does with a raising ClientApp
                reason = f"{type(err)}:<'{err}'>"
                reply = Message(Error(CLIENT_APP_RAISED_EXCEPTION, reason), reply_to=msg)
            if self.on_reply is not None:
                hooked = self.on_reply(node, reply)
                if hooked is None:
                    continue
                reply = hooked
            self.replies[mid] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """At most one waiting reply (replies arrive one by one)."""
        ids = list(message_ids)
        for mid in reversed(ids) if self.last_first else ids:
            if mid in self.replies:
                return [self.replies.pop(mid)]
        return []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Every reply that arrives (lost ones never do)."""
        ids = list(self.push_messages(messages))
        return [self.replies.pop(m) for m in ids if m in self.replies]
