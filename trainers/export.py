"""Training's side of the adapter interchange file: the scale folded into B and the metadata a trained adapter
carries. The format itself (keys, metadata, int8, truncation, read / write) is `adapters_store.adapter_file`;
its functions are re-exported here for the trainer's callers.

The training scale alpha / rank is folded into B (`fold_scale`), and the file says alpha = rank (training alpha
in `train_alpha`). Reason: diffusers 0.42 reads `lora_adapter_metadata` only when the file is named via
`weight_name=` or `use_safetensors=True`; a bare `load_lora_adapter(path, prefix="unet")` infers alpha = rank
from the shapes. With the scale folded, every loading path gives the same UNet output.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Mapping

import torch
from adapters_store.adapter_file import (  # noqa: F401  (the format's API, re-exported for the trainer's callers)
    SCALE_SUFFIX,
    cast,
    check,
    compress,
    dequantize,
    diffusers_metadata,
    peft_config_kwargs,
    quantize_int8,
    read_file,
    truncate,
    write_file,
)
from adapters_store.errors import AdapterFileError  # noqa: F401

TRAINER_VERSION = "subjectpaint-trainers/0.1"  # written into every adapter's metadata

__all__ = [
    "AdapterFileError", "SCALE_SUFFIX", "build_metadata", "cast", "check", "compress", "dequantize",
    "diffusers_metadata", "fold_scale", "peft_config_kwargs", "quantize_int8", "read_file", "truncate", "write_file",
]


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
