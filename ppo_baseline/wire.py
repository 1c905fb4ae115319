"""The payload of the PPO services' HTTP bodies: named tensors plus small JSON metadata.

Format: one safetensors buffer (8-byte little-endian header length, JSON header, raw
tensor bytes). The tensors are its entries; the metadata is a JSON object stored as a
string under `meta` in the safetensors `__metadata__` map (str -> str), beside
`wire` = the format version. Nothing is ever unpickled: safetensors only reads dtypes,
shapes and byte ranges, so a hostile body can at worst fail validation (WireError).

A receiver validates what it decoded against a declared Schema: the exact set of tensor
names, each one's dtype and dims, where a named dim ("B", "T") must take the same size in
every tensor that names it, and the required metadata keys with their JSON types.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from safetensors.torch import load, save

WIRE_VERSION = "1"
HEADER_LENGTH_BYTES = 8


class WireError(ValueError):
    """A payload that cannot be decoded or does not match its schema (HTTP 400)."""


@dataclass
class Payload:
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TensorSpec:
    """dtype and dims of one tensor; a dim is a fixed size (int) or a name shared across
    the tensors of a payload (str), e.g. TensorSpec(torch.int64, ("B", "T"))."""

    dtype: torch.dtype
    dims: tuple[int | str, ...]


@dataclass(frozen=True)
class Schema:
    """What one endpoint accepts (or returns): tensors by name, required metadata keys by
    type (a type or tuple of types, as isinstance takes them). Extra tensors are errors;
    extra metadata keys are allowed."""

    tensors: Mapping[str, TensorSpec]
    meta: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)


def encode(payload: Payload) -> bytes:
    """Payload -> safetensors bytes. Tensors are copied to CPU into storage of their own:
    safetensors refuses views that share memory (tokens and tokens[:, 1:])."""
    tensors = {name: tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)
               for name, tensor in payload.tensors.items()}
    return save(tensors, metadata={"wire": WIRE_VERSION, "meta": json.dumps(payload.meta)})


def decode(data: bytes, schema: Schema) -> Payload:
    """bytes -> Payload validated against `schema`; anything wrong raises WireError."""
    # safetensors checks the whole layout (header JSON, str -> str metadata, byte ranges)
    # first, so that reading the metadata afterwards meets only well-formed headers.
    try:
        tensors = load(data)
    except Exception as error:  # safetensors raises its own SafetensorError on bad bytes
        raise WireError(f"not a safetensors payload: {error}") from None
    header = _header_metadata(data)
    if header.get("wire") != WIRE_VERSION:
        raise WireError(f"wire format version {header.get('wire')!r}, expected {WIRE_VERSION!r}")
    payload = Payload(tensors, _json_object(header.get("meta", "{}")))
    validate(payload, schema)
    return payload


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` map (str -> str) of a buffer that safetensors has loaded."""
    length = int.from_bytes(data[:HEADER_LENGTH_BYTES], "little")
    return _json_object(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + length]).get("__metadata__") or {}


def _json_object(text: str | bytes) -> dict:
    # RecursionError: deeply nested JSON ("[[[[...") must fail validation, not the server.
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise WireError(f"payload metadata is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise WireError(f"payload metadata is a JSON {type(value).__name__}, expected an object")
    return value


def validate(payload: Payload, schema: Schema) -> None:
    """Raise WireError naming the first mismatch between a payload and its schema."""
    missing = sorted(set(schema.tensors) - set(payload.tensors))
    extra = sorted(set(payload.tensors) - set(schema.tensors))
    if missing or extra:
        raise WireError(f"tensors: missing {missing}, unexpected {extra}")
    sizes: dict[str, tuple[int, str]] = {}
    for name, spec in schema.tensors.items():
        _check_tensor(name, payload.tensors[name], spec, sizes)
    for key, kind in schema.meta.items():
        if key not in payload.meta:
            raise WireError(f"metadata key {key!r} is missing")
        if not isinstance(payload.meta[key], kind):
            raise WireError(f"metadata {key!r} is {type(payload.meta[key]).__name__}, expected {kind}")


def _check_tensor(name: str, tensor: torch.Tensor, spec: TensorSpec, sizes: dict[str, tuple[int, str]]) -> None:
    """Check one tensor; `sizes` remembers which tensor first fixed each named dim."""
    if tensor.dtype != spec.dtype:
        raise WireError(f"tensor {name!r} has dtype {tensor.dtype}, expected {spec.dtype}")
    if tensor.dim() != len(spec.dims):
        raise WireError(f"tensor {name!r} has shape {list(tensor.shape)}, expected dims {list(spec.dims)}")
    for axis, (size, dim) in enumerate(zip(tensor.shape, spec.dims)):
        if isinstance(dim, int) and size != dim:
            raise WireError(f"tensor {name!r} has size {size} on axis {axis}, expected {dim}")
        if isinstance(dim, str):
            first, owner = sizes.setdefault(dim, (size, name))
            if size != first:
                raise WireError(f"tensor {name!r} has {dim}={size} on axis {axis}, but {owner!r} has {dim}={first}")
