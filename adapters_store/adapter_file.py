"""The adapter file: the one owner of the format (read, write, key styles, int8, metadata).

Interchange format: one safetensors file, PEFT LoRA keys with the ``unet.`` prefix
(``unet.<module>.lora_A.weight`` (r, in), ``unet.<module>.lora_B.weight`` (out, r)), fp16 by default, and
header metadata of strings:

==========================  ===============================================================
``rank``, ``alpha``         numbers as decimal strings
``target_modules``          JSON list, e.g. ``["to_k", "to_out.0", "to_q", "to_v"]``
``base_fingerprint``        the base model fingerprint the adapter was trained on
``subject``, ``version``    the registry name and version (export only)
``created``                 ISO-8601 UTC timestamp of the registration (export only)
``trainer_version``         passed through if given
``lora_adapter_metadata``   diffusers' LoRA config JSON (keys prefixed ``unet.``), so that
                            ``load_lora_adapter(..., prefix="unet")`` reads alpha and the patterns
``quantization``            ``int8-per-rank-component`` for int8 files (below)
anything else               the caller's metadata; non-strings JSON-encoded
==========================  ===============================================================

Key styles read (`lora_factors`): PEFT / diffusers (``lora_A`` / ``lora_B``, optional ``unet.`` prefix and
``.default``), old diffusers attention-processor keys (``lora.down`` / ``lora.up``) and kohya
(``lora_unet_*.lora_down`` / ``lora_up`` + ``.alpha``), the last two converted by diffusers' own converters.

Storage compression (optional, `compress`): per-module SVD rank truncation (`truncate`; ranks go to
``rank_pattern`` and ``alpha_pattern`` keeps each module's scale, so the file still loads in plain diffusers),
and int8 factors with one fp16 scale per rank component (`quantize_int8`: ``<key>`` int8 + ``<key>.scale``;
`dequantize` restores floats; plain diffusers needs `dequantize` + `write_file` first).

Blob bytes (`encode`) are canonical (sorted header, fixed tensor order) so identical tensors + metadata hash to
the same sha256 across processes; ``safetensors.torch.save`` orders metadata randomly.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load as _load_bytes
from safetensors.torch import save_file

from .errors import AdapterFileError

# Keys describing a registry entry rather than the adapter's content: kept out of blobs (so the same
# tensors under two names dedupe) and added back by ``export``.
ENTRY_KEYS = ("subject", "version", "created")
MAX_METADATA_BYTES = 1 << 20
SCALE_SUFFIX = ".scale"  # int8 files: the fp16 scales of `<key>` are `<key>.scale`
QUANTIZATION = "int8-per-rank-component"

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
        raise AdapterFileError("tensors must be a non-empty dict[str, torch.Tensor]")
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        if not isinstance(key, str) or not key or key == "__metadata__":
            raise AdapterFileError(f"bad tensor key {key!r}")
        if not isinstance(t, torch.Tensor):
            raise AdapterFileError(f"tensor {key!r} is a {type(t).__name__}, not a torch.Tensor")
        if t.dtype not in _DTYPES:
            raise AdapterFileError(f"tensor {key!r} has unsupported dtype {t.dtype}")
        if t.layout != torch.strided:
            raise AdapterFileError(f"tensor {key!r} is not dense")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFileError(f"tensor {key!r} has NaN or inf values")
        out[key] = t.detach().to("cpu").contiguous()
    return out


def stringify_metadata(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """Metadata as safetensors header strings: str kept, everything else JSON-encoded."""
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise AdapterFileError("metadata must be a dict of str -> JSON-able values")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise AdapterFileError(f"metadata key {key!r} is not a non-empty str")
        if isinstance(value, str):
            out[key] = value
            continue
        try:
            out[key] = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AdapterFileError(f"metadata {key!r} is not JSON-able: {exc}") from None
    if sum(len(k) + len(v) for k, v in out.items()) > MAX_METADATA_BYTES:
        raise AdapterFileError("metadata is larger than 1 MiB")
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
        raise AdapterFileError(f"not a valid safetensors payload: {exc}") from None


def header_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` strings of safetensors bytes."""
    try:
        (n,) = struct.unpack("<Q", data[:8])
        return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})
    except Exception as exc:
        raise AdapterFileError(f"not a valid safetensors header: {exc}") from None


def read_raw(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors as stored (int8 kept) and metadata of a safetensors file; never unpickles."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise AdapterFileError(f"adapter file {path!r} does not exist")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise AdapterFileError(f"{path!r} is not a valid safetensors file: {exc}") from None
    return tensors, metadata


def read_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Float factors (int8 dequantized) and metadata of an interchange file, its structure checked."""
    tensors, metadata = read_raw(path)
    tensors = dequantize(tensors, dtype)
    check(tensors, metadata)
    return tensors, metadata


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write the interchange file atomically (tmp + rename); the structure is checked first."""
    check(dequantize(tensors), metadata)
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=dict(metadata))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def check(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Structure of an interchange adapter: paired unet.*lora_A/B keys, matching ranks, metadata present."""
    for key in ("rank", "alpha", "target_modules", "base_fingerprint"):
        if key not in metadata:
            raise AdapterFileError(f"adapter metadata has no {key!r}")
    modules = _module_keys(tensors)
    if not modules:
        raise AdapterFileError("no `unet.*.lora_A.weight` tensors")
    for key in modules:
        if not key.startswith("unet."):
            raise AdapterFileError(f"tensor {key!r} is not under the `unet.` prefix")
        a, b = tensors.get(f"{key}.lora_A.weight"), tensors.get(f"{key}.lora_B.weight")
        if b is None or a.dim() not in (2, 4) or b.dim() != a.dim() or a.shape[0] != b.shape[1]:
            raise AdapterFileError(f"LoRA factors of {key!r} are missing or their ranks disagree")


def _number(value: Any, kind: type, what: str) -> Any:
    if value is None:
        return None
    try:
        x = kind(json.loads(value) if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise AdapterFileError(f"metadata {what}={value!r} is not a {kind.__name__}") from None
    if isinstance(x, float) and not math.isfinite(x):
        raise AdapterFileError(f"metadata {what}={value!r} is not finite")
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
        raise AdapterFileError(f"metadata target_modules={targets!r} is not a list of str")
    if rank is not None and rank < 1:
        raise AdapterFileError(f"metadata rank={rank} must be >= 1")
    dtypes = {str(t.dtype).removeprefix("torch.") for t in tensors.values()}
    return {"rank": rank, "alpha": alpha, "target_modules": targets,
            "dtype": dtypes.pop() if len(dtypes) == 1 else "mixed"}


# ------------------------------------------------------------------------------------- diffusers metadata


def diffusers_metadata(rank: int, alpha: float, targets, dropout: float = 0.0, rank_pattern=None,
                       alpha_pattern=None) -> str:
    """diffusers' `lora_adapter_metadata` JSON for the UNet (keys prefixed `unet.`, as `save_lora_weights` writes)."""
    config = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(targets),
              "lora_dropout": float(dropout), "init_lora_weights": True, "bias": "none", "use_dora": False,
              "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    return json.dumps({f"unet.{k}": v for k, v in config.items()}, sort_keys=True)


def peft_config_kwargs(metadata: Mapping[str, Any]) -> dict:
    """LoraConfig kwargs of the UNet from a file's metadata: diffusers' `lora_adapter_metadata` (what
    `load_lora_adapter` would build; its per-component `unet.` keys or flat ones), else the flat rank / alpha /
    target_modules keys."""
    raw = metadata.get("lora_adapter_metadata")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw or "{}")
        except json.JSONDecodeError:
            raise AdapterFileError("lora_adapter_metadata is not valid JSON") from None
    raw = dict(raw or {})
    cfg = {k.removeprefix("unet."): v for k, v in raw.items() if "." not in k or k.startswith("unet.")}
    if not cfg and "rank" in metadata:
        cfg = {"r": _number(metadata["rank"], int, "rank"),
               "target_modules": describe({}, metadata)["target_modules"]}
    for key in ("lora_alpha", "alpha"):  # flat interchange metadata
        if metadata.get(key) is not None and "lora_alpha" not in cfg:
            cfg["lora_alpha"] = _number(metadata[key], float, key)
    return cfg


# ------------------------------------------------------------------------------------------ key styles

_KEY = re.compile(
    r"^(?:unet\.)?(?P<path>.+?)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)(?:\.default)?\.weight$"
)


def lora_factors(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any] | None = None
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """{UNet module path: (A (r, in), B (out, r), scale alpha / r)} from a LoRA state dict in any key style this
    module reads (int8 dequantized), alphas from the metadata (`peft_config_kwargs`, `alpha_pattern`) or kohya's
    per-module `.alpha` tensors."""
    sd = dict(state_dict)
    if any(t.dtype == torch.int8 for t in sd.values()):
        sd = dequantize(sd)
    alphas: dict[str, float] = {}
    if any(k.startswith("lora_unet_") for k in sd):  # kohya: alphas per module, keys converted by diffusers
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

        kohya_alphas = {k[: -len(".alpha")]: float(v) for k, v in sd.items() if k.endswith(".alpha")}
        sd, _ = _convert_non_diffusers_lora_to_diffusers(sd)
        sd = {k: v for k, v in sd.items() if k.startswith("unet.")}
        for kname, value in kohya_alphas.items():
            path = _kohya_path(kname)
            if path:
                alphas[path] = value
    if sd and not any(".lora_A." in k or ".lora_B." in k for k in sd):  # old diffusers attn-processor keys
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

        sd = convert_unet_state_dict_to_peft(sd)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterFileError(f"unrecognised LoRA key {key!r}")
        slot = "A" if m.group("kind") in ("lora_A", "lora.down", "lora_down") else "B"
        pairs.setdefault(m.group("path"), {})[slot] = tensor
    config = peft_config_kwargs(metadata or {})
    factors = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterFileError(f"{path}: LoRA needs both A (down) and B (up) factors")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise AdapterFileError(f"{path}: factor shapes {tuple(a.shape)} / {tuple(b.shape)} do not chain")
        r = a.shape[0]
        alpha = alphas.get(path, _alpha_for(path, config, r))
        factors[path] = (a, b, alpha / r)
    if not factors:
        raise AdapterFileError("no LoRA factors in the state dict")
    return factors


def _kohya_path(kohya_name: str) -> str | None:
    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key

    m = _KEY.match(_convert_unet_lora_key(kohya_name + ".lora_down.weight"))
    return m.group("path") if m else None


def _alpha_for(path: str, config: Mapping[str, Any], rank: int) -> float:
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.search(rf"(^|\.){re.escape(pattern)}$", path) or path.endswith(pattern):
            return float(value)
    return float(config.get("lora_alpha", rank))


def _module_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))


# ---------------------------------------------------------------------------------------- compression


def cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}


@torch.no_grad()
def truncate(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], energy: float = 0.99
             ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Per-module SVD rank truncation keeping `energy` (0..1] of sum(sigma^2) of B @ A. Same dtype out."""
    if not 0.0 < energy <= 1.0:
        raise AdapterFileError(f"energy must be in (0, 1], got {energy}")
    rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
    patterns = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    old_ranks = patterns.get("unet.rank_pattern") or {}
    old_alphas = patterns.get("unet.alpha_pattern") or {}
    out, rank_pattern, alpha_pattern = dict(tensors), {}, {}
    for key in _module_keys(tensors):
        name = key.removeprefix("unet.")
        a4, b4 = tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"]  # Linear (2-D) or 1x1 conv (4-D)
        a, b = a4.reshape(a4.shape[0], -1), b4.reshape(b4.shape[0], b4.shape[1])
        dtype = a.dtype
        r = int(old_ranks.get(name, rank))
        scale = float(old_alphas.get(name, alpha)) / r
        qb, rb = torch.linalg.qr(b.double())  # B = Qb Rb, A^T = Qa Ra  ->  B A = Qb (Rb Ra^T) Qa^T
        qa, ra = torch.linalg.qr(a.double().T)
        u, s, vh = torch.linalg.svd(rb @ ra.T)
        total = float((s**2).sum())
        keep = 1 if total == 0 else int(torch.searchsorted(torch.cumsum(s**2, 0) / total, torch.tensor(energy - 1e-12,
                                                                                                         dtype=s.dtype))) + 1
        keep = max(1, min(keep, s.numel()))
        root = s[:keep].sqrt()
        out[f"{key}.lora_B.weight"] = (qb @ u[:, :keep] * root).to(dtype).reshape(b4.shape[0], keep, *b4.shape[2:])
        out[f"{key}.lora_A.weight"] = (root[:, None] * vh[:keep] @ qa.T).to(dtype).reshape(keep, *a4.shape[1:])
        rank_pattern[name], alpha_pattern[name] = keep, scale * keep
    meta = dict(metadata)
    top = max(rank_pattern.values()) if rank_pattern else rank
    meta["rank"], meta["alpha"] = str(top), repr(float(top) * alpha / rank)
    meta["truncation_energy"] = repr(float(energy))
    targets = json.loads(metadata["target_modules"])
    config = json.loads(meta["lora_adapter_metadata"])
    dropout = float(config.get("unet.lora_dropout", 0.0))
    meta["lora_adapter_metadata"] = diffusers_metadata(top, float(meta["alpha"]), targets, dropout,
                                                       {k: v for k, v in rank_pattern.items() if v != top},
                                                       alpha_pattern)
    return out, meta


@torch.no_grad()
def quantize_int8(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """int8 factors, symmetric, one fp16 scale per rank component (A's rows, B's columns)."""
    out = {}
    for key, t in tensors.items():
        t = t.float()
        if key.endswith(".lora_A.weight"):  # (r, in[, 1, 1]): a scale per row
            scale = t.abs().amax(dim=tuple(d for d in range(t.dim()) if d != 0), keepdim=True) / 127.0
        elif key.endswith(".lora_B.weight"):  # (out, r[, 1, 1]): a scale per column
            scale = t.abs().amax(dim=tuple(d for d in range(t.dim()) if d != 1), keepdim=True) / 127.0
        else:
            out[key] = t.to(torch.float16)
            continue
        scale = scale.clamp_min(1e-12).to(torch.float16).float()
        out[key] = torch.round(t / scale).clamp(-127, 127).to(torch.int8)
        out[key + SCALE_SUFFIX] = scale.to(torch.float16)
    meta = dict(metadata)
    meta["quantization"] = QUANTIZATION
    return out, meta


def dequantize(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Float factors from a (possibly) int8 file's tensors; float tensors pass through (cast to `dtype`)."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == torch.int8:
            scale = tensors.get(key + SCALE_SUFFIX)
            if scale is None:
                raise AdapterFileError(f"int8 tensor {key!r} has no {key + SCALE_SUFFIX!r}")
            out[key] = t.to(dtype) * scale.to(dtype)
        else:
            out[key] = t.to(dtype)
    return out


def compress(tensors, metadata, *, dtype: torch.dtype = torch.float16, energy: float | None = None,
             int8: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """float factors -> storage tensors: optional truncation, then fp16/fp32 or int8."""
    tensors = {k: v.float() for k, v in tensors.items()}
    if energy is not None and energy < 1.0:
        tensors, metadata = truncate(tensors, metadata, energy)
    if int8:
        return quantize_int8(tensors, metadata)
    return cast(tensors, dtype), dict(metadata)
