"""Sampler overhead: our Studio.inpaint vs diffusers' PaintByExamplePipeline, same weights, same run.

Full run: SD1.5-shaped UNet (9 input channels, ~860M params), SD VAE and a CLIP ViT-L/14-shaped image encoder,
all random, at 512x512 for a few steps. `--quick`: the tiny test model at 32x48 (under a minute).
Runs alternate (ours, theirs, ours, ...) after a warm-up; the median of each is compared.
Last stdout line: one JSON object with `ratio` = ours / diffusers (goal <= 1.02).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import torch  # noqa: E402


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
        steps, repeats = args.steps or 10, args.repeats or 5
    else:
        t0 = time.perf_counter()
        base, (w, h) = sd15_base(args.device, dtype), (512, 512)
        steps, repeats = args.steps or 3, args.repeats or 3
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

    def timed(fn):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    ours(), theirs()  # warm-up
    times = {"ours": [], "diffusers": []}
    for r in range(repeats):
        order = [("ours", ours), ("diffusers", theirs)] if r % 2 == 0 else [("diffusers", theirs), ("ours", ours)]
        for name, fn in order:
            times[name].append(timed(fn))
        print(f"repeat {r}: ours {times['ours'][-1]:.3f}s diffusers {times['diffusers'][-1]:.3f}s", flush=True)
    ours_s, theirs_s = statistics.median(times["ours"]), statistics.median(times["diffusers"])
    result = {
        "bench": "sampler_overhead",
        "shape": "tiny-32x48" if args.quick else "sd15-512x512",
        "device": args.device,
        "dtype": str(dtype).replace("torch.", ""),
        "steps": steps,
        "repeats": repeats,
        "ours_s": round(ours_s, 4),
        "diffusers_s": round(theirs_s, 4),
        "ratio": round(ours_s / theirs_s, 4),
        "goal": 1.02,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
