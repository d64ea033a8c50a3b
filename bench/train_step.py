"""Lightning overhead: SubjectLoRAModule under a Lightning Trainer vs a plain PyTorch + PEFT loop, same model,
same batch, same run.

    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py            # demo base (tiny if its weights are absent)
    OMP_WAIT_POLICY=PASSIVE python bench/train_step.py --quick    # tiny base, few steps (< 1 min)

Each run builds its model, then takes `--steps` optimizer
steps on one fixed batch; we record the median step time (start-to-start wall time, after `--warmup` steps) and the peak memory during
training above the memory held just before it (CUDA: max_memory_allocated; CPU: ru_maxrss - RSS). Memory: each
side once in its own process. Time: both sides in one process, a warm-up round, then `--repeats` alternating
rounds; `time_ratio` is the median of the paired per-round ratios with its 95 % interval (bench/_stats.py).
Goal: time ratio <= 1.05 (upper bound), memory ratio <= 1.1.
Both sides: AdamW, same LoRA (rank 4 on to_q/to_k/to_v/to_out.0), same loss code path for the plain loop
(written out below, not the module's), progress bar off. Last stdout line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._stats import finish, ratio_stats  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(quick: bool, batch: int, device: str):
    import torch

    from subjectpaint.base import ExemplarInpainter
    from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, make_room, product_photos
    from trainers.annotate import foreground_box
    from trainers.data import SubjectDataModule, signed_target

    try:
        base = ExemplarInpainter.tiny(0) if quick else ExemplarInpainter.demo()
    except Exception:
        base = ExemplarInpainter.tiny(0)
    base.to(device=device)
    size = base.resolution
    photos = [p.image.resize((size, size)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 3)]
    data = SubjectDataModule.for_base(base, photos, [foreground_box(p) for p in photos],
                                      backgrounds=[make_room(s, size) for s in range(4)], batch_size=batch, seed=0)
    items = [data.dataset[i] for i in range(batch)]
    fixed = {k: torch.stack([it[k] for it in items]) for k in ("target", "mask", "reference")}
    fixed["target"], fixed["mask"] = signed_target(fixed["target"]), fixed["mask"].float()  # as the VAE takes them
    return base, fixed


def run_lightning(base, fixed, steps, warmup, device):
    import lightning as L
    import torch

    from trainers.lora_module import SubjectLoRAModule, make_trainer

    module = SubjectLoRAModule(base, rank=4, lr=1e-4, seed=0)
    times = []

    class Clock(L.Callback):
        """Start-to-start wall time of consecutive steps: everything the loop does (fetch, hooks, step, logging)."""

        last = None

        def on_train_batch_start(self, *a):
            if device == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

        def on_train_end(self, *a):
            self.on_train_batch_start()

    class Same(torch.utils.data.IterableDataset):
        def __iter__(self):
            for _ in range(steps):
                yield fixed

    loader = torch.utils.data.DataLoader(Same(), batch_size=None)
    trainer = make_trainer(steps, None, progress=False, accelerator="gpu" if device == "cuda" else "cpu",
                           callbacks=[Clock()])
    start = reset_peak(device)
    trainer.fit(module, loader)
    return times[warmup:], peak(device) - start


def run_plain(base, fixed, steps, warmup, device):
    """The peer: a hand-written loop with PEFT LoRA and the same objective."""
    import copy

    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from subjectpaint.base import pbe_scheduler
    from trainers.lora_module import lora_config

    unet = copy.deepcopy(base.unet).requires_grad_(False)
    torch.manual_seed(0)
    unet.add_adapter(lora_config(4), adapter_name="subject")
    unet.train()
    vae, encoder = base.vae, base.image_encoder
    noise_sched = DDPMScheduler.from_config(pbe_scheduler().config)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    batch = {k: v.to(device) for k, v in fixed.items()}
    times = []
    start = reset_peak(device)
    for step in range(steps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(step)
        target, mask, reference = batch["target"], batch["mask"], batch["reference"]
        b = target.shape[0]
        with torch.no_grad():
            keep = 1.0 - (mask > 0.5).float()
            latents = vae.encode(target).latent_dist.sample(generator=g) * vae.config.scaling_factor
            masked = vae.encode(target * keep).latent_dist.sample(generator=g) * vae.config.scaling_factor
            cond = encoder(reference)
            dropped = torch.rand(b, 1, 1, generator=g, device=device) < 0.2
            cond = torch.where(dropped, encoder.uncond_vector.expand_as(cond), cond)
            keep_small = F.interpolate(keep, size=latents.shape[-2:])
            noise = torch.randn(latents.shape, generator=g, device=device)
            t = torch.randint(0, 1000, (b,), generator=g, device=device)
            noisy = noise_sched.add_noise(latents, noise, t)
        pred = unet(torch.cat([noisy, masked, keep_small], 1), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), noise.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[warmup:], peak(device) - start


def reset_peak(device) -> int:
    import torch

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss_bytes()


def peak(device) -> int:
    import torch

    return torch.cuda.max_memory_allocated() if device == "cuda" else peak_bytes()


def child(args) -> None:
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    base, fixed = build(args.quick, args.batch, device)
    run = run_lightning if args.side == "lightning" else run_plain
    times, mem = run(base, fixed, args.steps, args.warmup, device)
    print(json.dumps({"side": args.side, "median_s": statistics.median(times), "peak_bytes": int(mem),
                      "device": device, "base": base.name}))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny base, 10 steps, batch 4, 4 rounds")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=7, help="alternating timing rounds (4 with --quick)")
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--side", choices=("lightning", "plain"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch, args.repeats = 10, 2, 4, min(args.repeats, 4)
    if args.side:
        return child(args)

    # 1. peak memory: each side in its own process (ru_maxrss only grows), both at once
    def command(side):
        return [sys.executable, __file__, "--side", side, "--steps", str(args.steps), "--warmup", str(args.warmup),
                "--batch", str(args.batch)] + ["--quick"] * args.quick + ["--cpu"] * args.cpu

    children = {side: subprocess.Popen(command(side), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for side in ("plain", "lightning")}
    memory = {}
    for side, proc in children.items():
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"the {side} side exited {proc.returncode}")
        memory[side] = json.loads(out.strip().splitlines()[-1])

    # 2. step time: both sides in this process, one warm-up round, then alternating rounds; each run's median step
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    base, fixed = build(args.quick, args.batch, device)
    runs = {"plain": run_plain, "lightning": run_lightning}
    times: dict[str, list[float]] = {"plain": [], "lightning": []}
    for r in range(args.repeats + 1):
        for side in (("plain", "lightning") if r % 2 == 0 else ("lightning", "plain")):
            step_times, _ = runs[side](base, fixed, args.steps, args.warmup, device)
            if r > 0:  # round 0 warms both (imports, allocator, kernels)
                times[side].append(statistics.median(step_times))
    mem = {s: memory[s]["peak_bytes"] for s in memory}
    summary = {
        "bench": "train_step", "quick": args.quick, "device": device, "base": base.name, "batch": args.batch,
        "steps": args.steps, "lightning_step_s": round(statistics.median(times["lightning"]), 5),
        "plain_step_s": round(statistics.median(times["plain"]), 5),
        **ratio_stats(times["lightning"], times["plain"], "time_ratio"),
        "lightning_peak_mb": round(mem["lightning"] / 2**20, 2), "plain_peak_mb": round(mem["plain"] / 2**20, 2),
        "memory_ratio": round(mem["lightning"] / max(mem["plain"], 1), 4),
    }
    print(f"step: lightning {summary['lightning_step_s']*1e3:.1f} ms, plain {summary['plain_step_s']*1e3:.1f} ms, "
          f"ratio {summary['time_ratio']} [{summary['time_ratio_lo']}, {summary['time_ratio_hi']}]; "
          f"peak: lightning {summary['lightning_peak_mb']} MB, plain {summary['plain_peak_mb']} MB")
    finish(summary, {"time_ratio": "<= 1.05", "memory_ratio": "<= 1.1"})


if __name__ == "__main__":
    main()
