"""An in-process Flower ``Grid``: each message goes to a ClientApp in this process.

Node ``1000 + p`` holds partition ``p`` (node config ``partition-id``), as a
SuperNode started with ``--node-config "partition-id=p num-partitions=n"``
would. Messages are the real Flower ``Message`` objects; what no network
carries here is the serialisation, so every content is copied through
Flower's own record serialisation to keep server and clients apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable

from flwr.app import Context, Message, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

NODE0 = 1000


def _copy(content: RecordDict) -> RecordDict:
    return recorddict_from_proto(recorddict_to_proto(content))


class LocalGrid(Grid):
    """A grid of ``num_nodes`` in-process nodes running ``client_app``.

    Args:
        client_app: the ``flwr.clientapp.ClientApp``.
        run_config: the run config every context gets.
        num_nodes: nodes, partitions ``0 .. num_nodes - 1``.
        before_send: called with the list of messages of each
            ``send_and_receive``; may raise to simulate a crash of the server.
        after_reply: ``(message, reply) -> reply``, e.g. to corrupt a reply.
    """

    def __init__(
        self,
        client_app,
        run_config: dict,
        num_nodes: int,
        *,
        before_send: Callable[[list[Message]], None] | None = None,
        after_reply: Callable[[Message, Message], Message] | None = None,
    ):
        # Flower's runtimes set the process's identity before any Message is built.
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
        self.client_app = client_app
        self.contexts = {
            NODE0 + p: Context(
                run_id=1,
                node_id=NODE0 + p,
                node_config={"partition-id": p, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for p in range(num_nodes)
        }
        self.before_send = before_send
        self.after_reply = after_reply
        self._replies: dict[str, Message] = {}

    def set_run(self, run) -> None:  # pragma: no cover - not used in-process
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover - not used in-process
        raise NotImplementedError

    def create_message(self, *args, **kwargs) -> Message:  # pragma: no cover - deprecated in Flower
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            delivered = Message(
                _copy(msg.content), dst_node_id=node, message_type=msg.metadata.message_type
            )
            delivered.metadata.__dict__["_message_id"] = msg.metadata.message_id
            reply = self.client_app(delivered, self.contexts[node])
            reply = Message(_copy(reply.content), reply_to=delivered)
            if self.after_reply is not None:
                reply = self.after_reply(msg, reply)
            self._replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        if self.before_send is not None:
            self.before_send(messages)
        return self.pull_messages(self.push_messages(messages))
