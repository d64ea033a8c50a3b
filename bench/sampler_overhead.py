"""Sampler overhead: our Studio.inpaint vs diffusers' PaintByExamplePipeline, same weights, same run.

Full run: SD1.5-shaped UNet (9 input channels, ~860M params), SD VAE and a CLIP ViT-L/14-shaped image encoder,
all random, at 512x512 for a few steps. `--quick`: the tiny test model at 32x48 (under a minute).

1. Work per denoising step, a CPU-measurable proxy of GPU overhead (per-step Python work, extra small kernels
   and host-device synchronisations show on a GPU, not on a CPU): a TorchDispatchMode counts every aten op
   dispatched and the ops that synchronise the host with the device (`.item()` / `bool(tensor)` / indexing with a
   tensor -> `_local_scalar_dense`, `nonzero`, `is_nonzero`, `equal`, and copies between devices). A UNet forward
   pre-hook cuts the count into steps: the window from one UNet call to the next is one whole step (UNet, guidance,
   scheduler step, hooks, the next step's input). Goals: ops per step <= diffusers', 0 syncs per step.
2. Time: the two alternate after a warm-up (bench/_stats.py); `ratio` = ours / diffusers, the median of the paired
   ratios with its 95 % interval (goal <= 1.02 on the upper bound).
Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from bench._stats import alternate, finish, ratio_stats  # noqa: E402

SYNC_OPS = {"_local_scalar_dense", "nonzero", "is_nonzero", "equal", "item", "_assert_async", "unique_consecutive",
            "masked_select", "repeat_interleave"}


class StepOps(TorchDispatchMode):
    """Counts dispatched aten ops and host-device synchronisations; `mark()` starts a new window."""

    def __init__(self):
        super().__init__()
        self.windows = [[0, 0]]  # [ops, syncs] per window

    def mark(self, *_):
        self.windows.append([0, 0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        window = self.windows[-1]
        window[0] += 1
        name = func.overloadpacket.__name__
        if name in SYNC_OPS or crosses_devices(name, args, kwargs):
            window[1] += 1
        return func(*args, **kwargs)


def crosses_devices(name, args, kwargs) -> bool:
    if name == "_to_copy" and "device" in kwargs and isinstance(args[0], torch.Tensor):
        return torch.device(kwargs["device"]).type != args[0].device.type
    if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return args[0].device.type != args[1].device.type
    return False


def count_per_step(unet, fn) -> dict:
    """Ops and syncs per denoising step of `fn()` (the windows between consecutive UNet calls; their max), and the
    ops before the first and after the last UNet call (setup, encode, decode)."""
    counter = StepOps()
    handle = unet.register_forward_pre_hook(counter.mark)
    try:
        with counter:
            fn()
    finally:
        handle.remove()
    steps = counter.windows[1:-1]  # windows[0]: before the first UNet call; windows[-1]: the last step + decode
    if not steps:
        raise RuntimeError("need at least two UNet calls to count a whole step")
    return {"ops_per_step": max(w[0] for w in steps), "syncs_per_step": max(w[1] for w in steps),
            "steps_counted": len(steps), "ops_in_steps": sum(w[0] for w in steps), "ops_outside_loop": counter.windows[0][0] + counter.windows[-1][0],
            "syncs_outside_loop": counter.windows[0][1] + counter.windows[-1][1]}


def sd15_base(device, dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from subjectpaint.base import ExemplarInpainter, pbe_scheduler

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, in_channels=9, out_channels=4, cross_attention_dim=768)
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=512,
    )
    clip = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=14, projection_dim=768,
    )
    encoder = PaintByExampleImageEncoder(clip, proj_size=768)
    base = ExemplarInpainter(vae, unet, encoder, pbe_scheduler(), CLIPImageProcessor(), name="sd15-shaped-random")
    return base.to(device=device, dtype=dtype)


def inputs(width, height):
    rng = np.random.default_rng(0)
    room = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    exemplar = PIL.Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    m = np.zeros((height, width), np.uint8)
    m[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return room, PIL.Image.fromarray(m), exemplar


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 32x48, under a minute")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    args = parser.parse_args()

    from subjectpaint.base import ExemplarInpainter
    from subjectpaint.studio import Studio

    dtype = torch.float16 if args.fp16 else torch.float32
    if args.quick:
        base, (w, h) = ExemplarInpainter.tiny(0).to(device=args.device, dtype=dtype), (48, 32)
        steps, repeats = args.steps or 10, args.repeats or 7
    else:
        t0 = time.perf_counter()
        base, (w, h) = sd15_base(args.device, dtype), (512, 512)
        steps, repeats = args.steps or 3, args.repeats or 5
        n = sum(p.numel() for p in base.unet.parameters())
        print(f"built SD1.5-shaped base: unet {n / 1e6:.0f}M params in {time.perf_counter() - t0:.1f}s", flush=True)
    room, mask, exemplar = inputs(w, h)
    studio = Studio(base)
    pipe = base.to_pipeline()

    def ours():
        studio.inpaint(room, mask, exemplar, steps=steps, seed=0, paste_back=False, resolution=max(w, h), progress=False)

    def theirs():
        pipe(example_image=exemplar, image=room, mask_image=mask, num_inference_steps=steps,
             generator=torch.Generator().manual_seed(0), output_type="pil")

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else None
    with torch.no_grad():
        counts = {"ours": count_per_step(base.unet, ours), "diffusers": count_per_step(base.unet, theirs)}
    for name, c in counts.items():
        print(f"{name}: {c['ops_per_step']} ops and {c['syncs_per_step']} syncs per step "
              f"({c['steps_counted']} steps counted); outside the loop {c['ops_outside_loop']} ops, "
              f"{c['syncs_outside_loop']} syncs", flush=True)
    times = alternate({"ours": ours, "diffusers": theirs}, repeats=repeats, warmup=1, sync=sync)
    for r, (a, b) in enumerate(zip(times["ours"], times["diffusers"])):
        print(f"repeat {r}: ours {a:.3f}s diffusers {b:.3f}s", flush=True)
    result = {
        "bench": "sampler_overhead",
        "quick": args.quick,
        "shape": "tiny-32x48" if args.quick else "sd15-512x512",
        "device": args.device,
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "ours_s": round(statistics.median(times["ours"]), 4),
        "diffusers_s": round(statistics.median(times["diffusers"]), 4),
        **ratio_stats(times["ours"], times["diffusers"]),
        "ops_per_step_ours": counts["ours"]["ops_per_step"],
        "ops_per_step_diffusers": counts["diffusers"]["ops_per_step"],
        "ops_per_step_excess": counts["ours"]["ops_per_step"] - counts["diffusers"]["ops_per_step"],
        "syncs_per_step_ours": counts["ours"]["syncs_per_step"],
        "syncs_per_step_diffusers": counts["diffusers"]["syncs_per_step"],
        "ops_outside_loop_ours": counts["ours"]["ops_outside_loop"],
        "ops_outside_loop_diffusers": counts["diffusers"]["ops_outside_loop"],
        "syncs_outside_loop_ours": counts["ours"]["syncs_outside_loop"],
        "syncs_outside_loop_diffusers": counts["diffusers"]["syncs_outside_loop"],
    }
    finish(result, {"ratio": "<= 1.02", "ops_per_step_excess": "<= 0", "syncs_per_step_ours": "== 0"})


if __name__ == "__main__":
    main()
