"""The services' tensor payload: round trips, and every malformed body gives WireError."""

import random

import pytest
import torch
from safetensors.torch import save

from ppo_baseline.wire import Payload, Schema, TensorSpec, WireError, decode, encode

ROLLOUT = Schema({"tokens": TensorSpec(torch.int64, ("B", "T")), "mask": TensorSpec(torch.bool, ("B", "T")),
                  "scores": TensorSpec(torch.float32, ("B",)), "stats": TensorSpec(torch.float32, (3,))},
                 meta={"step": int})


def rollout(batch=2, length=5, **overrides):
    tensors = {"tokens": torch.arange(batch * length).view(batch, length), "mask": torch.ones(batch, length) > 0,
               "scores": torch.randn(batch), "stats": torch.zeros(3)}
    return Payload({**tensors, **overrides}, {"step": 7, "note": {"nested": [1, 2.5, None]}})


def test_round_trip_keeps_names_dtypes_values_and_metadata():
    sent = rollout(values=torch.randn(2, 5, dtype=torch.bfloat16))
    schema = Schema({**ROLLOUT.tensors, "values": TensorSpec(torch.bfloat16, ("B", "T"))}, ROLLOUT.meta)
    received = decode(encode(sent), schema)
    assert received.meta == sent.meta
    assert received.tensors.keys() == sent.tensors.keys()
    for name, tensor in sent.tensors.items():
        assert torch.equal(received.tensors[name], tensor)


def test_views_sharing_storage_and_empty_batches_encode():
    tokens = torch.arange(12).view(2, 6)
    shared = Payload({"a": tokens[:, 1:], "b": tokens[:, :-1]})
    schema = Schema({"a": TensorSpec(torch.int64, ("B", "T")), "b": TensorSpec(torch.int64, ("B", "T"))})
    assert torch.equal(decode(encode(shared), schema).tensors["a"], tokens[:, 1:])
    assert decode(encode(rollout(batch=0)), ROLLOUT).tensors["tokens"].shape == (0, 5)


@pytest.mark.parametrize("payload, message", [
    (rollout(tokens=torch.zeros(2, 5, dtype=torch.int32)), "'tokens' has dtype torch.int32, expected torch.int64"),
    (rollout(mask=torch.ones(2, 4) > 0), "'mask' has T=4 on axis 1, but 'tokens' has T=5"),
    (rollout(scores=torch.zeros(3)), "'scores' has B=3 on axis 0, but 'tokens' has B=2"),
    (rollout(tokens=torch.zeros(2, 5, 1, dtype=torch.int64)), "'tokens' has shape [2, 5, 1], expected dims ['B', 'T']"),
    (rollout(stats=torch.zeros(4)), "'stats' has size 4 on axis 0, expected 3"),
    (Payload({k: v for k, v in rollout().tensors.items() if k != "mask"}, {"step": 1}), "missing ['mask']"),
    (rollout(extra=torch.zeros(1)), "unexpected ['extra']"),
    (Payload(rollout().tensors, {}), "metadata key 'step' is missing"),
    (Payload(rollout().tensors, {"step": "7"}), "metadata 'step' is str"),
])
def test_schema_mismatches_name_what_is_wrong(payload, message):
    with pytest.raises(WireError, match=message.replace("[", r"\[").replace("]", r"\]")):
        decode(encode(payload), ROLLOUT)


def raw(meta: dict[str, str]) -> bytes:
    return save({"x": torch.zeros(1)}, metadata=meta)


@pytest.mark.parametrize("data, message", [
    (b"", "not a safetensors payload"),
    (b"garbage", "not a safetensors payload"),
    (b"\xff" * 8 + b"{}", "not a safetensors payload"),
    (b"\x02\x00\x00\x00\x00\x00\x00\x00[]", "not a safetensors payload"),
    (encode(rollout())[:-3], "not a safetensors payload"),
    (raw({"wire": "1", "meta": "not json"}), "metadata is not valid JSON"),
    (raw({"wire": "1", "meta": "[" * 100_000}), "metadata is not valid JSON"),
    (raw({"wire": "1", "meta": "[1]"}), "metadata is a JSON list"),
    (raw({"wire": "2", "meta": "{}"}), "wire format version '2'"),
    (raw({}), "wire format version None"),
])
def test_malformed_bytes_raise_wire_error(data, message):
    with pytest.raises(WireError, match=message):
        decode(data, Schema({"x": TensorSpec(torch.float32, (1,))}))


def test_mangled_payloads_never_raise_anything_but_wire_error():
    good = encode(rollout())
    rng = random.Random(0)
    for _ in range(300):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        mangled = bytes(data[:rng.randint(0, len(data))] if rng.random() < 0.3 else data)
        try:
            decode(mangled, ROLLOUT)
        except WireError:
            pass
