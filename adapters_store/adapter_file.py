"""The adapter file: canonical safetensors bytes and the interchange metadata.

Interchange format (what ``export`` writes and ``import_`` reads): one safetensors file, tensor keys
as given (PEFT keys with the ``unet.`` prefix), header metadata of strings:

==========================  ===============================================================
``rank``, ``alpha``         numbers as decimal strings
``target_modules``          JSON list, e.g. ``["to_k", "to_out.0", "to_q", "to_v"]``
``base_fingerprint``        the base model fingerprint the adapter was trained on
``subject``, ``version``    the registry name and version (export only)
``created``                 ISO-8601 UTC timestamp of the registration (export only)
``trainer_version``         passed through if given
``lora_adapter_metadata``   diffusers' LoRA config JSON, passed through verbatim if given
anything else               the caller's metadata; non-strings JSON-encoded
==========================  ===============================================================

Blob bytes are canonical (sorted header, fixed tensor order) so identical tensors + metadata hash to
the same sha256 across processes; ``safetensors.torch.save`` orders metadata randomly.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load as _load_bytes

from .errors import InvalidAdapter

# Keys describing a registry entry rather than the adapter's content: kept out of blobs (so the same
# tensors under two names dedupe) and added back by ``export``.
ENTRY_KEYS = ("subject", "version", "created")
MAX_METADATA_BYTES = 1 << 20

_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code


def check_tensors(tensors: object) -> dict[str, torch.Tensor]:
    """Validate a ``dict[str, Tensor]`` and return contiguous CPU copies-or-views."""
    if not isinstance(tensors, Mapping) or not tensors:
        raise InvalidAdapter("tensors must be a non-empty dict[str, torch.Tensor]")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise InvalidAdapter(f"bad tensor key {key!r}")
        if not isinstance(t, torch.Tensor):
            raise InvalidAdapter(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _DTYPES:
            raise InvalidAdapter(f"tensor {key!r} has unsupported dtype {t.dtype}")
        if t.layout != torch.strided:
            raise InvalidAdapter(f"tensor {key!r} is not dense")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise InvalidAdapter(f"tensor {key!r} has NaN or inf values")
        out[key] = t.detach().to("cpu").contiguous()
    return out


def stringify_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Metadata as safetensors header strings: str kept, everything else JSON-encoded."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidAdapter("metadata must be a dict of str -> JSON-able values")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise InvalidAdapter(f"metadata key {key!r} is not a non-empty str")
        if isinstance(value, str):
            out[key] = value
            continue
        try:
            out[key] = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidAdapter(f"metadata {key!r} is not JSON-able: {exc}") from None
    if sum(len(k) + len(v) for k, v in out.items()) > MAX_METADATA_BYTES:
        raise InvalidAdapter("metadata is larger than 1 MiB")
    return out


def encode(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Canonical safetensors bytes: sorted metadata, tensors by (alignment desc, name)."""
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
    chunks, offset = [], 0
    for key in order:
        t = tensors[key]
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + b"".join(chunks)


def decode(data: bytes) -> dict[str, torch.Tensor]:
    """Tensors from safetensors bytes (the Rust parser validates offsets and sizes)."""
    try:
        return _load_bytes(data)
    except Exception as exc:  # safetensors raises its own error types
        raise InvalidAdapter(f"not a valid safetensors payload: {exc}") from None


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of safetensors bytes."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
    except Exception as exc:
        raise InvalidAdapter(f"not a valid safetensors header: {exc}") from None


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file (never unpickles)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InvalidAdapter(f"adapter file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise InvalidAdapter(f"{path!r} is not a valid safetensors file: {exc}") from None
    return tensors, metadata


def _number(value: Any, kind: type, what: str) -> Any:
    if value is None:
        return None
    try:
        x = kind(json.loads(value) if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise InvalidAdapter(f"metadata {what}={value!r} is not a {kind.__name__}") from None
    if isinstance(x, float) and not math.isfinite(x):
        raise InvalidAdapter(f"metadata {what}={value!r} is not finite")
    return x


def describe(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Column values (rank, alpha, target modules, dtype) from metadata, else from the tensors."""
    rank = _number(metadata.get("rank"), int, "rank")
    alpha = _number(metadata.get("alpha"), float, "alpha")
    targets = metadata.get("target_modules")
    if isinstance(targets, str):
        try:
            targets = json.loads(targets)
        except ValueError:
            targets = [t for t in targets.split(",") if t]
    downs = {k: t for k, t in tensors.items() if ".lora_A." in k or ".lora_down." in k}
    if rank is None and downs:
        rank = max(int(t.shape[0]) for t in downs.values() if t.dim() >= 1)
    if targets is None and downs:
        found = set()
        for key in downs:
            module = key.split(".lora_A.")[0].split(".lora_down.")[0].split(".")
            found.add(".".join(module[-2:]) if module[-1].isdigit() else module[-1])
        targets = sorted(found)
    if targets is not None and (not isinstance(targets, list)
                                or not all(isinstance(t, str) for t in targets)):
        raise InvalidAdapter(f"metadata target_modules={targets!r} is not a list of str")
    if rank is not None and rank < 1:
        raise InvalidAdapter(f"metadata rank={rank} must be >= 1")
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    return {"rank": rank, "alpha": alpha, "target_modules": targets,
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed"}
