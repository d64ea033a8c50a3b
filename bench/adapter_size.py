"""Bytes per adapter file at Stable Diffusion 1.5 UNet shape (the Paint-by-Example UNet: 9 input channels,
cross_attention_dim 768, ~860M parameters), LoRA on to_q/to_k/to_v/to_out.0.

    OMP_WAIT_POLICY=PASSIVE python bench/adapter_size.py           # SD1.5 shape, ranks 4/8/16
    OMP_WAIT_POLICY=PASSIVE python bench/adapter_size.py --quick   # tiny UNet shape (< 1 min)

The UNet is built on the meta device (its module shapes are exactly the 860M model's; no weights are allocated)
and the LoRA factors are random (A Kaiming-uniform, B normal), written with `trainers.export` as real
safetensors files, header metadata included (what the registry stores). Storage forms: fp16 (the interchange
default), int8 (Subject.train's default storage), SVD truncation at 95% energy (+fp16 / +int8). Random factors
have a flat spectrum, so truncation here is the worst case; on trained demo adapters see the ranks kept and the
fidelity cost in bench/subject_fidelity.py (`compression_loss_db`). Goal: <= 1.0 MB for the default setting
(rank 4, int8). Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

from bench._stats import finish  # noqa: E402
from trainers import export  # noqa: E402
from trainers.lora_module import DEFAULT_TARGETS  # noqa: E402

SD15 = dict(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768, attention_head_dim=8,
            block_out_channels=(320, 640, 1280, 1280), layers_per_block=2)
TINY = dict(sample_size=16, in_channels=9, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32, attention_head_dim=8)


def lora_shapes(config: dict) -> tuple[dict[str, tuple[int, int]], int]:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    shapes = {}
    for name, mod in unet.named_modules():
        if isinstance(mod, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in DEFAULT_TARGETS):
            shapes[name] = (mod.in_features, mod.out_features)
    return shapes, sum(p.numel() for p in unet.parameters())


def random_adapter(shapes, rank: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (fan_in, fan_out) in shapes.items():
        bound = math.sqrt(6 / fan_in) / math.sqrt(6)  # Kaiming-uniform(a=sqrt(5)) as PEFT inits A
        tensors[f"unet.{name}.lora_A.weight"] = (torch.rand(rank, fan_in, generator=g) * 2 - 1) * bound
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.01
    return tensors


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny UNet shape")
    ap.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16])
    ap.add_argument("--energy", type=float, default=0.95)
    args = ap.parse_args(argv)
    shapes, n_params = lora_shapes(TINY if args.quick else SD15)
    forms = {"fp16": {}, "int8": {"int8": True}, f"svd{args.energy}+fp16": {"energy": args.energy},
             f"svd{args.energy}+int8": {"energy": args.energy, "int8": True}}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in args.ranks:
            tensors = random_adapter(shapes, rank)
            meta = export.build_metadata(rank=rank, alpha=rank, targets=DEFAULT_TARGETS, base_fingerprint="0" * 64,
                                         subject="size-bench")
            row = {"rank": rank, "lora_params": sum(t.numel() for t in tensors.values())}
            for form, kw in forms.items():
                stored, md = export.compress(tensors, meta, **kw)
                path = export.write_file(os.path.join(tmp, f"{rank}-{form}.safetensors"), stored, md)
                row[form] = os.path.getsize(path)
            rows.append(row)
    print(f"UNet {'tiny' if args.quick else 'SD1.5 (in_channels=9, cross_attention_dim=768)'}: "
          f"{n_params / 1e6:.1f}M params, {len(shapes)} LoRA targets")
    print(f"{'rank':>4} {'lora params':>12} " + " ".join(f"{f:>16}" for f in forms))
    for r in rows:
        print(f"{r['rank']:>4} {r['lora_params']:>12,} " + " ".join(f"{r[f] / 1e6:>13.3f} MB" for f in forms))
    default = next((r for r in rows if r["rank"] == 4), rows[0])
    summary = {"bench": "adapter_size", "quick": args.quick, "unet_params_m": round(n_params / 1e6, 1),
               "lora_targets": len(shapes),
               "bytes": {str(r["rank"]): {f: r[f] for f in forms} for r in rows},
               "default_setting": "rank 4, int8 factors (Subject.train storage='int8')",
               "default_bytes": default["int8"], "default_mb": round(default["int8"] / 1e6, 3),
               }
    finish(summary, {"default_mb": "<= 1.0"})


if __name__ == "__main__":
    main()
