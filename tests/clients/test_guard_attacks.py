"""The guard against replies that are well-formed but leak: each attack payload reaches the server
without the guard (the planted canary is recovered from the wire bytes the server would decode) and
is refused with it (the REFUSED code only; zero bytes of the canary). Real Flower Messages and
records, serialized as Flower sends them; the handler that plants a payload stands in for a buggy or
compromised device round."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
from flwr.common.secure_aggregation.secaggplus_constants import Key, Stage
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.compat.common import recorddict_compat as compat
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.supercore.task_identity import TaskIdentity

from clients.guard import privacy_guard, unmasked_guard
from fedasls.device.faults import FailureCode
from fedasls.federated.strategy import Downlink
from wire.messages import (
    GLOBAL_UPDATE_KEY,
    SECAGG_CONFIGS,
    PrivacyViolation,
    batch_update_key,
    downlink_records,
)

CANARY = "CANARY07X001QZ"
A, B = "m.q_proj.lora_A.weight", "m.q_proj.lora_B.weight"
GLOBAL = {A: torch.zeros(4, 8), B: torch.zeros(6, 4)}
CLIP = 1.0
HONEST = {"device_id": 3, "examples": 12, "rouge1": 0.25, "perplexity": 40.0}


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.task_id = TaskIdentity.run_id = TaskIdentity.node_id = None


def incoming(devices: list[int] | None = None) -> Message:
    """A global-adapter round's train message for device 3 (or a worker slot's `devices`), clip_norm 1."""
    config = ConfigRecord({"device-ids": devices} if devices else {"device-id": 3})
    records = {"config": config, **downlink_records(Downlink("global", False, 4, 0, CLIP, dict(GLOBAL)))}
    return Message(RecordDict(records), dst_node_id=1, message_type="train")


def context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def on_the_wire(reply: Message) -> tuple[bytes, Message]:
    """What the server receives: the reply's serialized bytes, and the Message it decodes from them."""
    wire = message_to_proto(reply).SerializeToString()
    return wire, message_from_proto(ProtoMessage.FromString(wire))


def canary_bytes() -> bytes:
    return CANARY.encode()


def float32_with_canary_bytes(shape: tuple[int, ...]) -> np.ndarray:
    """A float32 array whose raw bytes begin with the canary's ASCII bytes (zeros after)."""
    raw = canary_bytes().ljust(int(np.prod(shape)) * 4, b"\0")
    return np.frombuffer(raw, dtype=np.float32).reshape(shape).copy()


def nan_with_payload(data: bytes) -> float:
    """A quiet NaN (float64) whose 48 low payload bits hold `data` (6 bytes)."""
    return struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000000 | int.from_bytes(data, "big")))[0]


def update_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()})


def reply_with(metrics: dict, update: dict[str, np.ndarray] | None = None, key: str = GLOBAL_UPDATE_KEY):
    """A handler that plants a payload: a reply of these metrics (and update) built by hand, past build_reply."""
    def handler(msg: Message, ctx: Context) -> Message:
        records: dict = {"metrics": MetricRecord(metrics)}
        if update is not None:
            records[key] = update_record(update)
        return Message(RecordDict(records), reply_to=msg)

    return handler


# Each attack: (handler, recover(server's decoded reply) -> the canary as text, the canary's bytes as the
# wire carries them). Recovering it from the unguarded reply proves the payload would reach the server.
def _code_points(reply):
    return "".join(chr(int(v)) for v in reply.content["metrics"]["rouge1"])


def _name(reply):
    return next(k for k in reply.content["metrics"].keys() if k.startswith("CANARY"))


def _count(reply):
    return int(reply.content["metrics"]["examples"]).to_bytes(7, "big").decode()


def _nan_payload(reply):
    bits = struct.unpack("<Q", struct.pack("<d", reply.content["metrics"]["perplexity"]))[0]
    return (bits & (2**48 - 1)).to_bytes(6, "big").decode()


def _update_bytes(reply):
    raw = reply.content[GLOBAL_UPDATE_KEY][A].numpy().tobytes()
    return raw[:len(CANARY)].decode()


def _float32_nan_payloads(reply):  # two canary bytes in the payload of each float32 NaN
    bits = reply.content[GLOBAL_UPDATE_KEY][A].numpy().ravel().view(np.uint32)
    return b"".join(int(b & 0xFFFF).to_bytes(2, "big") for b in bits[:len(CANARY) // 2]).decode()


def _device_ids(reply):
    return "".join(chr(int(d)) for d in reply.content["metrics"]["device_id"])


def _float32_nans() -> np.ndarray:
    pairs = [canary_bytes()[i:i + 2] for i in range(0, len(CANARY), 2)]
    bits = np.zeros(32, dtype=np.uint32)
    bits[:len(pairs)] = [0x7FC00000 | int.from_bytes(p, "big") for p in pairs]
    return bits.view(np.float32).reshape(4, 8)


ZEROS_B = np.zeros((6, 4), dtype=np.float32)
ATTACKS = {
    # metric values that are a canary's code points (a list where one number belongs; ROUGE far above 1)
    "code points in metric values": (
        reply_with({**HONEST, "rouge1": [float(ord(c)) for c in CANARY]}), _code_points,
        struct.pack(f"<{len(CANARY)}d", *(float(ord(c)) for c in CANARY))),
    # an unknown metric name (the name itself spells the canary)
    "unknown metric name": (reply_with({**HONEST, CANARY: 1.0}), _name, canary_bytes()),
    # an allowed count far out of its range: 7 canary bytes as one integer
    "out-of-range metric": (
        reply_with({**HONEST, "examples": int.from_bytes(CANARY[:7].encode(), "big")}), _count, None),
    # a NaN where NaN is allowed (perplexity), its payload bits holding 6 canary bytes
    "NaN payload in a metric": (
        reply_with({**HONEST, "perplexity": nan_with_payload(CANARY[:6].encode())}), _nan_payload,
        struct.pack("<d", nan_with_payload(CANARY[:6].encode()))),
    # a correctly shaped float32 update whose bytes spell the canary
    "canary in update bytes": (
        reply_with(HONEST, {A: float32_with_canary_bytes((4, 8)), B: ZEROS_B}), _update_bytes, canary_bytes()),
    # a non-finite update: float32 NaNs whose payloads carry the canary, two bytes each
    "non-finite update": (reply_with(HONEST, {A: _float32_nans(), B: ZEROS_B}), _float32_nan_payloads,
                          _float32_nans().tobytes()[:len(CANARY) * 2]),
}


def _refused_with_nothing(reply: Message) -> None:
    from server.rounds import FAILURE_REASONS, failure_reason

    assert reply.has_error() and reply.error.code == FailureCode.REFUSED
    assert reply.error.reason == FailureCode.REFUSED.message and not reply.has_content()
    # the server counts it per device as a "refused" failure (server/rounds.py: _collect, failed_refused)
    assert failure_reason(reply.error.code) == "refused" and "refused" in FAILURE_REASONS


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_the_guard_refuses_a_payload_that_would_otherwise_reach_the_server(attack):
    handler, recover, planted = ATTACKS[attack]
    wire, received = on_the_wire(handler(incoming(), context()))  # no guard: the handler's reply as sent
    assert recover(received).startswith(CANARY[:6]), attack  # the server decodes the canary
    if planted is not None:
        assert planted in wire, attack
    wire, received = on_the_wire(privacy_guard(incoming(), context(), handler))
    _refused_with_nothing(received)
    assert b"CANARY" not in wire and (planted is None or planted not in wire), attack


def test_an_unclipped_update_reaches_the_server_only_without_the_guard():
    scale = 8e5 / math.sqrt(32 + 24)  # an honest-looking update of L2 norm 8e5, against clip_norm 1
    handler = reply_with(HONEST, {A: np.full((4, 8), scale, np.float32), B: np.full((6, 4), scale, np.float32)})
    _, received = on_the_wire(handler(incoming(), context()))
    norm = math.sqrt(sum(float((a.numpy().astype(np.float64) ** 2).sum()) for a in received.content[GLOBAL_UPDATE_KEY].values()))
    assert norm == pytest.approx(8e5, rel=1e-6)
    _refused_with_nothing(on_the_wire(privacy_guard(incoming(), context(), handler))[1])
    # the same update clipped to the round's norm (as the device clips it) passes
    clipped = reply_with(HONEST, {A: np.full((4, 8), 1 / math.sqrt(56), np.float32),
                                  B: np.full((6, 4), 1 / math.sqrt(56), np.float32)})
    assert not privacy_guard(incoming(), context(), clipped).has_error()


def test_a_batch_reply_is_checked_per_device_by_the_same_rules():
    """A worker slot's reply: the device ids cannot spell anything (only the devices asked for), and
    each device's update is norm-checked."""
    spelled = reply_with({"device_id": [ord(c) for c in CANARY]})
    assert _device_ids(on_the_wire(spelled(incoming([4, 9]), context()))[1]) == CANARY  # no guard: it arrives
    _refused_with_nothing(privacy_guard(incoming([4, 9]), context(), spelled))  # ids the slot was not asked for
    honest = {"device_id": [4, 9], "examples": [3, 5]}
    small = {A: np.full((4, 8), 0.01, np.float32), B: ZEROS_B}
    leaky = {A: float32_with_canary_bytes((4, 8)), B: ZEROS_B}
    assert not privacy_guard(incoming([4, 9]), context(), reply_with(honest, small, batch_update_key(9))).has_error()
    handler = reply_with(honest, leaky, batch_update_key(9))
    assert canary_bytes() in on_the_wire(handler(incoming([4, 9]), context()))[0]
    wire, received = on_the_wire(privacy_guard(incoming([4, 9]), context(), handler))
    _refused_with_nothing(received)
    assert b"CANARY" not in wire
    ragged = reply_with({"device_id": [4, 9], "examples": [3]})  # a list that does not line up with the devices
    _refused_with_nothing(privacy_guard(incoming([4, 9]), context(), ragged))


# ------------------------------------------------------------------------------------------- SecAgg+


def fit_message(stage: str | None = None) -> Message:
    """A SecAgg+ round's masked-vector stage message: the FitIns (global adapter, knobs) and, when
    `stage` is given, the protocol record naming it."""
    from server.secagg import fit_ins

    content = compat.fitins_to_recorddict(fit_ins(incoming().content), keep_input=True)
    if stage is not None:
        content[SECAGG_CONFIGS] = ConfigRecord({Key.STAGE: stage})
    return Message(content, dst_node_id=1, message_type="train")


def fitres(metrics: dict, arrays: list[np.ndarray], weight: int) -> RecordDict:
    res = FitRes(Status(Code.OK, ""), Parameters([ndarray_to_bytes(a) for a in arrays], "numpy.ndarray"), weight,
                 metrics)
    return compat.fitres_to_recorddict(res, False)


def test_secagg_fitres_is_checked_before_it_is_masked():
    """The handler's FitRes is norm- and allow-list-checked before secaggplus_mod masks it (the masked
    vector that leaves cannot be checked)."""
    honest = fitres(HONEST, [np.full((4, 8), 0.01, np.float32), ZEROS_B], 12)

    def handler_of(content):
        return lambda msg, ctx: Message(content, reply_to=msg)

    assert unmasked_guard(handler_of(honest))(fit_message(), context()).content["fitres.num_examples"]
    for name, content in {
        "unclipped": fitres(HONEST, [np.full((4, 8), 1e3, np.float32), ZEROS_B], 12),
        "canary bytes": fitres(HONEST, [float32_with_canary_bytes((4, 8)), ZEROS_B], 12),
        "canary metric name": fitres({**HONEST, CANARY: 1.0}, [np.zeros((4, 8), np.float32), ZEROS_B], 12),
        "weight above its examples": fitres(HONEST, [np.zeros((4, 8), np.float32), ZEROS_B], 13),
    }.items():
        with pytest.raises(PrivacyViolation):
            unmasked_guard(handler_of(content))(fit_message(), context())
        assert handler_of(content)(fit_message(), context()).content is content, name  # no guard: it goes on


def test_secagg_masked_stage_reply_metrics_and_weight_are_checked():
    """The masked-vector stage's reply: the vector is masked (unchecked), its metrics and weight leave
    in the clear and are checked by the same rules."""
    masked = [ndarray_to_bytes(np.zeros(s, dtype=np.int64)) for s in [(1,), (4, 8), (6, 4)]]

    def stage2(metrics: dict, weight: int):
        def handler(msg, ctx):
            content = fitres(metrics, [], weight)
            del content["fitres.parameters"]
            content["fitres.parameters"] = ArrayRecord()
            content[SECAGG_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: masked})
            return Message(content, reply_to=msg)

        return handler

    stage = Stage.COLLECT_MASKED_VECTORS
    assert not privacy_guard(fit_message(stage), context(), stage2(HONEST, 12)).has_error()
    leaky = stage2({**HONEST, CANARY: 1.0}, 12)
    assert canary_bytes() in on_the_wire(leaky(fit_message(stage), context()))[0]  # no guard: in the clear
    for handler in (leaky, stage2(HONEST, int.from_bytes(CANARY[:7].encode(), "big")),
                    stage2({**HONEST, "device_id": 77}, 12)):
        wire, received = on_the_wire(privacy_guard(fit_message(stage), context(), handler))
        _refused_with_nothing(received)
        assert b"CANARY" not in wire


# SecAgg+ stages 0, 1 and 3: only what Flower's secaggplus_mod sends for that stage.
SETUP_CONFIG = {Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 1.0,
                Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 100.0}


def stage_message(stage: str, configs: dict) -> Message:
    return Message(RecordDict({SECAGG_CONFIGS: ConfigRecord({Key.STAGE: stage, **configs})}), dst_node_id=1,
                   message_type="train")


def protocol_reply(configs: dict):
    """A handler that answers a protocol stage with this record, past secaggplus_mod."""
    return lambda msg, ctx: Message(RecordDict({SECAGG_CONFIGS: ConfigRecord(configs)}), reply_to=msg)


def real_setup_reply() -> dict:
    """Stage 0 as Flower's own secaggplus_mod answers it (two fresh EC public keys)."""
    from flwr.client.mod import secaggplus_mod

    ctx = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    reply = secaggplus_mod(stage_message(Stage.SETUP, SETUP_CONFIG), ctx, lambda m, c: None)
    return dict(reply.content[SECAGG_CONFIGS])


def _guarded(stage: str, message_configs: dict, reply_configs: dict) -> tuple[bool, bytes]:
    """(refused?, the wire bytes the server gets) for this stage's reply, through the guard."""
    reply = privacy_guard(stage_message(stage, message_configs), context(), protocol_reply(reply_configs))
    return reply.has_error(), on_the_wire(reply)[0]


def test_secagg_setup_reply_must_be_two_real_public_keys():
    honest = real_setup_reply()
    assert _guarded(Stage.SETUP, SETUP_CONFIG, honest)[0] is False
    pk1, pk2 = honest[Key.PUBLIC_KEY_1], honest[Key.PUBLIC_KEY_2]
    for attack in ({Key.PUBLIC_KEY_1: pk1 + canary_bytes(), Key.PUBLIC_KEY_2: pk2},  # appended to a real key
                   {Key.PUBLIC_KEY_1: canary_bytes(), Key.PUBLIC_KEY_2: pk2},  # not a key at all
                   {Key.PUBLIC_KEY_1: pk1, Key.PUBLIC_KEY_2: pk1}):  # one key twice
        unguarded = on_the_wire(protocol_reply(attack)(stage_message(Stage.SETUP, SETUP_CONFIG), context()))[0]
        refused, wire = _guarded(Stage.SETUP, SETUP_CONFIG, attack)
        assert refused and canary_bytes() not in wire
        assert canary_bytes() in unguarded or attack[Key.PUBLIC_KEY_1] == attack[Key.PUBLIC_KEY_2]


def test_secagg_share_keys_reply_sends_one_equal_ciphertext_per_named_neighbour():
    keys = real_setup_reply()
    pks = [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]]
    neighbours = {"1": pks, "2": pks, "3": pks}  # this node (1) and its two neighbours
    honest = {Key.DESTINATION_LIST: [2, 3], Key.CIPHERTEXT_LIST: [b"c" * 120, b"d" * 120]}
    assert _guarded(Stage.SHARE_KEYS, neighbours, honest)[0] is False
    for attack in ({Key.DESTINATION_LIST: [2, 3, 9], Key.CIPHERTEXT_LIST: [b"c" * 120, b"d" * 120,
                                                                           canary_bytes()]},  # an extra share
                   {Key.DESTINATION_LIST: [2, 3], Key.CIPHERTEXT_LIST: [b"c" * 120, canary_bytes().ljust(130)]},
                   {Key.DESTINATION_LIST: [2, 2], Key.CIPHERTEXT_LIST: [b"c" * 120, b"d" * 120]}):
        assert _guarded(Stage.SHARE_KEYS, neighbours, attack)[0], attack
        assert canary_bytes() not in _guarded(Stage.SHARE_KEYS, neighbours, attack)[1]


def test_secagg_unmask_reply_answers_exactly_the_nodes_asked_for():
    asked = {Key.ACTIVE_NODE_ID_LIST: [1, 2], Key.DEAD_NODE_ID_LIST: [3]}
    honest = {Key.NODE_ID_LIST: [1, 2, 3], Key.SHARE_LIST: [b"a" * 52, b"b" * 52, b"s" * 324]}
    assert _guarded(Stage.UNMASK, asked, honest)[0] is False
    for attack in ({Key.NODE_ID_LIST: [1, 2, 3, 4], Key.SHARE_LIST: [b"a" * 52, b"b" * 52, b"s" * 324,
                                                                      canary_bytes()]},
                   {Key.NODE_ID_LIST: [1, 2, 3], Key.SHARE_LIST: [b"a" * 52, canary_bytes().ljust(60), b"s" * 324]},
                   {Key.NODE_ID_LIST: [2, 1, 3], Key.SHARE_LIST: [b"a" * 52, b"b" * 52, b"s" * 324]}):
        unguarded = on_the_wire(protocol_reply(attack)(stage_message(Stage.UNMASK, asked), context()))[0]
        refused, wire = _guarded(Stage.UNMASK, asked, attack)
        assert refused and canary_bytes() not in wire, attack
        assert canary_bytes() in unguarded or attack[Key.NODE_ID_LIST] == [2, 1, 3]


def test_secagg_masked_vector_must_be_int64_below_the_modulus():
    def stage2(arrays):
        def handler(msg, ctx):
            content = fitres(HONEST, [], 12)
            del content["fitres.parameters"]
            content["fitres.parameters"] = ArrayRecord()
            content[SECAGG_CONFIGS] = ConfigRecord({Key.MASKED_PARAMETERS: [ndarray_to_bytes(a) for a in arrays]})
            return Message(content, reply_to=msg)

        return handler

    stage = Stage.COLLECT_MASKED_VECTORS
    shapes = [(1,), (4, 8), (6, 4)]
    assert not privacy_guard(fit_message(stage), context(),
                             stage2([np.full(s, 2**32 - 1, np.int64) for s in shapes])).has_error()
    for arrays in ([np.zeros(s, np.int32) for s in shapes],  # not what the mod sends
                   [np.full(s, 2**40, np.int64) for s in shapes],  # above the modulus: room for 8 more bits a value
                   [np.zeros(s, np.int64) for s in shapes[:2]]):  # a tensor missing
        assert privacy_guard(fit_message(stage), context(), stage2(arrays)).has_error()
