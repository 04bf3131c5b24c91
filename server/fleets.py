"""Two kinds of fleet behind one interface: who runs a sampled device, and how long it took.

- `WorkerSlots` (Flower's Simulation Engine): SuperNodes are worker slots, not devices. The sampled
  device id travels in the message (pfl-research style), so Flower's per-node cost (it polls every
  registered node and keeps a Context per node) stays bounded by the cohort while the population
  can be millions of devices. Timing is simulated: a device reports the work it did and the
  cost model turns it into simulated seconds (`fedasls.sim.simulated_timing`); availability windows
  and random dropouts come from the heterogeneity model. One message may carry several devices
  (`devices_per_message`), which the slot runs side by side (clients/device_pool.py).
- `DeviceNodes` (Flower's Deployment Engine): each SuperNode is one device. The server never sees
  node_config, so it asks each new node which device it is with a QUERY message (answered by the
  ClientApp's `@app.query()`), samples among the nodes that are connected, and treats a node that
  stops answering within the timeout (or that the SuperLink reports unavailable) as offline.
  Durations are the measured seconds from sending a device its round to its reply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.app.error import Error
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedasls.federated.strategy import Contribution
from fedasls.sim.cost_model import RoundWork
from fedasls.sim.simulated_timing import SimulatedTiming
from server.coordinator import Coordinator

REPLY_POLL_S = 0.05

MessageFor = Callable[[int], RecordDict]  # the content of one sampled device's train message
OnReplies = Callable[[list[Message]], None]  # progress callback as replies arrive


class SecureRound(Protocol):
    """A round whose updates the server sees only as an aggregate (SecAgg+, server/secagg.py)."""

    def contributions(self, completed: list[int]) -> tuple[list[Contribution], dict[str, float]]:
        """The aggregate of the completed devices' updates (as contributions) and the round's figures."""


@dataclass
class Dispatched:
    """What came back from one round's dispatch."""

    replies: list[Message]
    unreachable: set[int] = field(default_factory=set)  # devices whose node did not answer: offline, not failed
    devices: dict[str, list[int]] = field(default_factory=dict)  # sent message id -> the devices it carried
    secure: SecureRound | None = None  # set by a secure-aggregation fleet: the replies hold metrics only


class Fleet(Protocol):
    """Where sampled devices run. The fleet loop (server/rounds.py) only talks to this."""

    kind: str
    simulated: bool  # simulated timing (cost model, availability windows, random dropouts)?

    def connect(self, grid: Grid) -> None:
        """Wait until the SuperNodes this fleet needs are connected."""

    def sample(self, grid: Grid, coordinator: Coordinator, now: float) -> list[int]:
        """This round's devices (the coordinator's seeded choice among those that can run)."""

    def dropouts(self, coordinator: Coordinator, sampled: list[int]) -> set[int]:
        """Sampled devices that drop out before they start (simulated only)."""

    def dispatch(self, grid: Grid, devices: list[int], message_for: MessageFor, server_round: int,
                 on_replies: OnReplies | None = None) -> Dispatched:
        """Send each device its round and collect the replies."""

    def durations(self, results: dict[int, dict[str, Any]]) -> dict[int, float]:
        """Seconds each device that finished online took (simulated or measured)."""

    def describe(self) -> dict[str, Any]:
        """Figures for the run summary."""


def wait_for_nodes(grid: Grid, expected: int, timeout_s: float = 120.0, settle_s: float = 1.0) -> list[int]:
    """Node ids of the connected SuperNodes once at least `expected` are there and their number
    has not changed for `settle_s` (they register asynchronously)."""
    deadline = time.monotonic() + timeout_s
    nodes: list[int] = []
    stable_since = time.monotonic()
    while True:
        now_nodes = sorted(grid.get_node_ids())
        if now_nodes != nodes:
            nodes, stable_since = now_nodes, time.monotonic()
        settled = time.monotonic() - stable_since >= settle_s
        if nodes and ((len(nodes) >= expected and settled) or time.monotonic() > deadline):
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"no SuperNodes connected after {timeout_s:.0f} s: start at least one SuperNode")
        time.sleep(0.2)


def exchange(grid: Grid, messages: list[Message], timeout_s: float | None = None,
             on_replies: OnReplies | None = None) -> tuple[dict[str, Message], set[str]]:
    """Push `messages`, pull replies as they arrive; returns replies by message id and the ids of
    messages still unanswered after `timeout_s` (None: wait for all)."""
    pending = set(grid.push_messages(messages))
    sent = list(pending)
    replies: dict[str, Message] = {}
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending and (deadline is None or time.monotonic() < deadline):
        got = list(grid.pull_messages(pending))
        for reply in got:
            pending.discard(reply.metadata.reply_to_message_id)
            replies[reply.metadata.reply_to_message_id] = reply
        if got and on_replies is not None:
            on_replies(got)
        if not got:
            time.sleep(REPLY_POLL_S)
    return {mid: replies[mid] for mid in sent if mid in replies}, pending


def _batches(items: list[int], size: int) -> list[list[int]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class WorkerSlots:
    """Simulation: SuperNodes are worker slots; each message names the device(s) it runs."""

    kind = "slots"
    simulated = True

    def __init__(self, timing: SimulatedTiming, expected_slots: int, devices_per_message: int = 1):
        self.timing = timing
        self.expected_slots = expected_slots
        self.devices_per_message = max(1, devices_per_message)
        self.slots: list[int] = []

    def connect(self, grid: Grid) -> None:
        self.slots = wait_for_nodes(grid, self.expected_slots)

    def sample(self, grid: Grid, coordinator: Coordinator, now: float) -> list[int]:
        return coordinator.sample(now)

    def dropouts(self, coordinator: Coordinator, sampled: list[int]) -> set[int]:
        return coordinator.draw_dropouts(sampled)

    def dispatch(self, grid: Grid, devices: list[int], message_for: MessageFor, server_round: int,
                 on_replies: OnReplies | None = None) -> Dispatched:
        k = self.devices_per_message
        replies: list[Message] = []
        carried: dict[str, list[int]] = {}
        for wave in _batches(devices, len(self.slots) * k):
            messages, groups = [], []
            for slot, group in zip(self.slots, _batches(wave, k)):
                content = message_for(group[0]) if k == 1 else _batched(message_for, group, k)
                messages.append(Message(content, dst_node_id=slot, message_type="train", group_id=str(server_round)))
                groups.append(group)
            got, _ = exchange(grid, messages, on_replies=on_replies)
            carried |= {m.metadata.message_id: group for m, group in zip(messages, groups)}
            replies += got.values()
        return Dispatched(replies, devices=carried)

    def durations(self, results: dict[int, dict[str, Any]]) -> dict[int, float]:
        return {d: self.timing.seconds(d, RoundWork.from_metrics(m).cost_work())
                for d, m in results.items() if m["status_code"] == 0}

    def describe(self) -> dict[str, Any]:
        return {"fleet": self.kind, "slots": len(self.slots), "devices_per_message": self.devices_per_message}


def _batched(message_for: MessageFor, group: list[int], parallel: int) -> RecordDict:
    """One slot's message for several devices: the first device's downlink with the whole group."""
    content = message_for(group[0])
    config = content["config"]
    del config["device-id"]
    config["device-ids"] = list(group)
    config["parallel"] = min(parallel, len(group))
    return content


class DeviceNodes:
    """Deployment Engine: one SuperNode per device, learned by QUERY; silent nodes go offline."""

    kind = "nodes"
    simulated = False

    def __init__(self, min_nodes: int = 1, reply_timeout_s: float = 600.0, query_timeout_s: float = 300.0,
                 wait_s: float = 120.0):
        self.min_nodes = min_nodes
        self.reply_timeout_s = reply_timeout_s
        self.query_timeout_s = query_timeout_s
        self.wait_s = wait_s
        self.node_of: dict[int, int] = {}  # device id -> node id
        self.silent: set[int] = set()  # nodes that stopped answering: offline until they answer again
        self._seconds: dict[int, float] = {}

    def connect(self, grid: Grid) -> None:
        wait_for_nodes(grid, self.min_nodes, timeout_s=self.wait_s)
        self.refresh(grid)
        if not self.node_of:
            raise RuntimeError(f"no SuperNode answered which device it is within {self.query_timeout_s:.0f} s: start "
                               "them with --node-config \"partition-id=N store-dir='DIR'\", or give them longer "
                               "(deployment.query_timeout_s)")

    def refresh(self, grid: Grid) -> None:
        """Forget nodes that left; ask connected nodes not yet known (or silent before) who they are."""
        connected = set(grid.get_node_ids())
        self.node_of = {d: n for d, n in self.node_of.items() if n in connected and n not in self.silent}
        known = set(self.node_of.values())
        ask = sorted(connected - known)
        if not ask:
            return
        messages = [Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="query")
                    for n in ask]
        replies, _ = exchange(grid, messages, timeout_s=self.query_timeout_s)
        for reply in replies.values():
            node = reply.metadata.src_node_id
            if reply.has_error():
                continue
            self.node_of[int(reply.content["metrics"]["device_id"])] = node
            self.silent.discard(node)

    def sample(self, grid: Grid, coordinator: Coordinator, now: float) -> list[int]:
        self.refresh(grid)
        return coordinator.sample(now, among=sorted(self.node_of))

    def dropouts(self, coordinator: Coordinator, sampled: list[int]) -> set[int]:
        return set()  # real devices drop out by not answering

    def dispatch(self, grid: Grid, devices: list[int], message_for: MessageFor, server_round: int,
                 on_replies: OnReplies | None = None) -> Dispatched:
        messages = []
        for device_id in devices:
            content = message_for(device_id)
            del content["config"]["device-id"]  # the node knows who it is
            messages.append(Message(content, dst_node_id=self.node_of[device_id], message_type="train",
                                    group_id=str(server_round)))
        sent_at = time.monotonic()
        arrived: dict[str, float] = {}

        def timed(got: list[Message]) -> None:
            for reply in got:
                arrived[reply.metadata.reply_to_message_id] = time.monotonic() - sent_at
            if on_replies is not None:
                on_replies(got)

        replies, unanswered = exchange(grid, messages, timeout_s=self.reply_timeout_s, on_replies=timed)
        device_of = {m.metadata.message_id: d for m, d in zip(messages, devices)}
        unreachable = {device_of[mid] for mid in unanswered}
        kept: list[Message] = []
        self._seconds = {}
        for mid, reply in replies.items():
            if reply.has_error() and _node_unavailable(reply.error):
                unreachable.add(device_of[mid])
                continue
            kept.append(reply)
            self._seconds[device_of[mid]] = arrived.get(mid, time.monotonic() - sent_at)
        self.silent |= {self.node_of[d] for d in unreachable}
        return Dispatched(kept, unreachable, {mid: [d] for mid, d in device_of.items()})

    def durations(self, results: dict[int, dict[str, Any]]) -> dict[int, float]:
        return {d: self._seconds[d] for d, m in results.items() if m["status_code"] == 0 and d in self._seconds}

    def describe(self) -> dict[str, Any]:
        return {"fleet": self.kind, "nodes": len(self.node_of), "offline_nodes": len(self.silent)}


def _node_unavailable(error: Error) -> bool:
    return int(error.code) == ErrorCode.NODE_UNAVAILABLE


