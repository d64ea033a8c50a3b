"""The adapter interchange file (DESIGN.md "Adapters"; keys of adapters_store/adapter_file.py).

One safetensors file: PEFT LoRA keys with the `unet.` prefix (`unet.<module>.lora_A.weight` (r, in),
`unet.<module>.lora_B.weight` (out, r)), header metadata: rank, alpha, target_modules, base_fingerprint, subject,
created, trainer_version, and diffusers' `lora_adapter_metadata` (the LoraConfig as JSON, keys prefixed `unet.`).
fp16 by default.

The training scale alpha / rank is folded into B (`fold_scale`), and the file says alpha = rank (training alpha
in `train_alpha`). Reason: diffusers 0.42 reads `lora_adapter_metadata` only when the file is named via
`weight_name=` or `use_safetensors=True`; a bare `load_lora_adapter(path, prefix="unet")` infers alpha = rank
from the shapes. With the scale folded, every loading path gives the same UNet output.

Storage compression (optional):
- `truncate(tensors, metadata, energy)`: per module, the SVD of B @ A keeps the fewest components holding
  `energy` of its squared singular values; ranks go to `rank_pattern`, and `alpha_pattern` keeps every module's
  scale, so the file still loads in plain diffusers.
- `quantize_int8`: factors as int8 with one fp16 scale per rank component (A's rows, B's columns), stored
  as `<key>` (int8) + `<key>.scale`; `dequantize` restores float factors (our loader does it on load; plain
  diffusers needs `dequantize` + `write_file` first).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from subjectpaint.errors import InvalidAdapter

from . import TRAINER_VERSION

SCALE_SUFFIX = ".scale"


class AdapterFileError(InvalidAdapter):
    """An adapter file or tensor set that is not a valid interchange adapter (a `StoreError`, so the CLI and the
    server answer it as a bad input)."""


def _module_keys(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(".lora_A.weight")] for k in tensors if k.endswith(".lora_A.weight"))


def _peft_name(module_key: str, prefix: str = "unet.") -> str:
    return module_key[len(prefix):] if module_key.startswith(prefix) else module_key


def diffusers_metadata(rank: int, alpha: float, targets, dropout: float = 0.0, rank_pattern=None,
                       alpha_pattern=None) -> str:
    """diffusers' `lora_adapter_metadata` JSON for the UNet (keys prefixed `unet.`, as `save_lora_weights` writes)."""
    config = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": sorted(targets),
              "lora_dropout": float(dropout), "init_lora_weights": True, "bias": "none", "use_dora": False,
              "rank_pattern": dict(rank_pattern or {}), "alpha_pattern": dict(alpha_pattern or {})}
    return json.dumps({f"unet.{k}": v for k, v in config.items()}, sort_keys=True)


def fold_scale(tensors: Mapping[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """B <- (alpha / rank) * B, so the stored factors are the exact weight delta B @ A (scale 1)."""
    k = float(alpha) / int(rank)
    return {key: (v.float() * k if key.endswith(".lora_B.weight") else v.float()) for key, v in tensors.items()}


def build_metadata(*, rank: int, alpha: float, targets, base_fingerprint: str, subject: str | None = None,
                   dropout: float = 0.0, extra: Mapping | None = None) -> dict[str, str]:
    """Metadata of a file whose factors were scale-folded (`fold_scale`): alpha = rank in the file and in
    diffusers' config; the training alpha is kept as `train_alpha`."""
    meta = {
        "format": "pt",
        "rank": str(int(rank)),
        "alpha": repr(float(rank)),
        "train_alpha": repr(float(alpha)),
        "target_modules": json.dumps(sorted(targets)),
        "base_fingerprint": base_fingerprint,
        "trainer_version": TRAINER_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lora_adapter_metadata": diffusers_metadata(rank, rank, targets, dropout),
    }
    if subject is not None:
        meta["subject"] = subject
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def cast(tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}


# --------------------------------------------------------------------------------------- compression


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
        name = _peft_name(key)
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
    meta["quantization"] = "int8-per-rank-component"
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


# --------------------------------------------------------------------------------------------- files


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


def compress(tensors, metadata, *, dtype: torch.dtype = torch.float16, energy: float | None = None,
             int8: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """float factors -> storage tensors: optional truncation, then fp16/fp32 or int8."""
    tensors = {k: v.float() for k, v in tensors.items()}
    if energy is not None and energy < 1.0:
        tensors, metadata = truncate(tensors, metadata, energy)
    if int8:
        return quantize_int8(tensors, metadata)
    return cast(tensors, dtype), dict(metadata)


def write_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """Write the interchange file atomically (tmp + rename)."""
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


def read_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32
              ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Float factors (int8 dequantized) and metadata of an interchange file; never unpickles."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise AdapterFileError(f"{os.fspath(path)!r} is not a readable safetensors file: {exc}") from None
    tensors = dequantize(tensors, dtype)
    check(tensors, metadata)
    return tensors, metadata


def peft_config_kwargs(metadata: Mapping[str, str]) -> dict:
    """LoraConfig kwargs from the file's diffusers metadata (what `load_lora_adapter` would build)."""
    raw = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    cfg = {k.removeprefix("unet."): v for k, v in raw.items() if k.startswith("unet.")}
    if not cfg:
        cfg = {"r": int(metadata["rank"]), "lora_alpha": float(metadata["alpha"]),
               "target_modules": json.loads(metadata["target_modules"])}
    return cfg
