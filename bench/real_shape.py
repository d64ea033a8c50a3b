"""Paint by Example at its real shapes, end to end: train -> export -> register -> place (three entry points) -> swap.

    OMP_WAIT_POLICY=PASSIVE python bench/real_shape.py --quick              # tiny shapes (< 1 min)
    OMP_WAIT_POLICY=PASSIVE python bench/real_shape.py --steps 3            # 860M UNet, ViT-L/14, SD VAE, 512 px
    python bench/real_shape.py --precision bf16-mixed --steps 10            # on a CUDA GPU

The base is random (no hub here) with Paint by Example's published shapes: the UNet of SD 1.x with 9 input channels
and cross-attention 768 (859.5M params), CLIP ViT-L/14 vision (24 layers, 1024 wide, patch 14, 224 px) + the
5-layer mapper + LayerNorm + Linear to 768, SD's VAE (128/256/512/512), PNDM, 512 px.

1. Training, ours against the peer at the same shape, batch, precision and gradient checkpointing, each in its own
   subprocess, alternated `--repeats` times: ours = `Subject.train(..., "paint-by-example", steps=..)` (annotation,
   data, Lightning, export, registry); the peer = a plain diffusers + PEFT loop (`unet.add_adapter`, AdamW, the same
   objective written out, `torch.autocast` for mixed precision) on random tensors of the same shapes. Step time:
   start-to-start of optimizer steps after `--warmup` (CPU: process CPU time, see `clock`); peak memory: the most
   the training allocates above what was allocated when it began, counted by torch itself (CUDA:
   max_memory_allocated; CPU: the profiler's memory events, see `Window`). On CPU the resident high-water mark
   (VmHWM) is reported beside it (`*_rss_peak_mb`): it adds the allocator's pools and fragmentation. Every weight is
   read once before any window opens (`prefault`): the safetensors loader maps the weight file, and pages first
   touched inside a window would otherwise count as training memory (at 256 px that was 6-7 GB of a side's VmHWM
   rise against 0.17 GB allocated, and it decided which side looked bigger). Each subprocess first runs its side
   once on the tiny base (`warm_up`). Ours' window is the Lightning fit (on_train_start to on_train_end), as the
   peer's is its loop; `subject_train_peak_*` is the whole Subject.train call (annotation and data preparation too;
   CPU: VmHWM, against the peer's VmHWM).
   Ratios ours / peer of the median step and of the peak, with a bootstrap 95% interval for the time.
2. Placement (in the last "ours" subprocess): the adapter's stored bytes; `studio.inpaint(room, mask, subject)`,
   `studio.progressive().place`, `studio.dual_branch().place` (`placed` counts those that returned an image of the
   room's size); swap: cold (registry read + verify + layout + copy, RAM tier cleared) and warm (RAM tier hit).
Goals: placed = 3, adapter_bytes <= 1.0e6, train time ratio <= 1.05, peak memory ratio <= 1.0. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The CPU memory measure uses torch.profiler; on a CUDA build without a GPU its library (kineto) logs
# "gpuGetDeviceCount failed" as an ERROR at every stop. Level 5 drops that line; a profiler that saw nothing
# fails the bench (`cpu_allocation_peak`), so a real fault is not hidden by it.
os.environ.setdefault("KINETO_LOG_LEVEL", "5")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GOALS = {"placed": 3, "adapter_bytes": 1.0e6, "train_time_ratio_vs_peft": 1.05, "train_peak_mem_ratio_vs_peft": 1.0}


# ------------------------------------------------------------------------------------------------ the base


def pbe_shaped_base(quick: bool, seed: int = 0):
    """A random base with Paint by Example's shapes (`quick`: the tiny test base, 32 px)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor, CLIPVisionConfig

    from subjectpaint.base import ExemplarInpainter, pbe_scheduler

    if quick:
        base = ExemplarInpainter.tiny(seed)
        base.name = "tiny-pbe-shaped"
        return base
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # Paint by Example's unet/config.json: SD 1.x, 9 input channels, 768 context
        sample_size=64, in_channels=9, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=768, attention_head_dim=8)
    vae = AutoencoderKL(  # SD's VAE
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4)
    clip = CLIPVisionConfig(  # CLIP ViT-L/14 vision tower; the mapper has (24 + 1) // 5 = 5 layers
        hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
        image_size=224, projection_dim=768, hidden_act="quick_gelu")
    encoder = PaintByExampleImageEncoder(clip, proj_size=768)
    features = CLIPImageProcessor(crop_size=224, size=224)
    base = ExemplarInpainter(vae, unet, encoder, pbe_scheduler(), features, name="pbe-shaped-random")
    return base.to(device="cpu", dtype=torch.float32)


def load_base(directory: str, device: str, dtype: str = "float32"):
    import torch

    from subjectpaint.base import ExemplarInpainter

    base = ExemplarInpainter.from_pretrained(directory, device=device, torch_dtype=getattr(torch, dtype))
    base.name = Path(directory).name
    return base


def photos(size: int, n: int = 3):
    """Product photos on a plain backdrop at the base's size (drawn shapes; only the shapes matter here)."""
    import numpy as np
    import PIL.Image
    import PIL.ImageDraw

    out = []
    for i in range(n):
        img = PIL.Image.new("RGB", (size, size), (235, 235, 232))
        d = PIL.ImageDraw.Draw(img)
        s = size // 8
        d.rounded_rectangle((3 * s + i * s // 4, 2 * s, 5 * s + i * s // 4, 6 * s), radius=s // 2, fill=(40, 90, 170))
        d.ellipse((3 * s, int(1.6 * s), 5 * s, int(2.6 * s)), fill=(200, 60, 40))
        out.append(PIL.Image.fromarray(np.asarray(img)))
    return out


# ----------------------------------------------------------------------------------------- measurements


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak(device: str) -> int:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    return rss()


def peak(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


class Window:
    """What a stretch of training adds above what was held when it began.

    `close()` -> (allocated, rss): `allocated` is torch's own count of its allocations, the goal's measure. CUDA:
    max_memory_allocated above memory_allocated at the start. CPU (no allocator statistics there): the profiler's
    memory events, in which torch's CPU allocator reports every allocation made while profiling and its running
    total; frees of tensors made before the window are not reported, so the figure can only overstate. `rss` (CPU
    only): the VmHWM rise, which adds glibc's pools and fragmentation."""

    def __init__(self, device: str):
        self.device, self.profiler = device, None

    def open(self) -> "Window":
        import torch

        self.held = reset_peak(self.device)
        if self.device != "cuda":
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                   profile_memory=True)
            self.profiler.start()
        return self

    def close(self) -> tuple[int, int | None]:
        top = peak(self.device)  # before the profiler's own post-processing allocates
        self.high = top
        if self.profiler is None:
            return top - self.held, None
        self.profiler.stop()
        return cpu_allocation_peak(self.profiler), top - self.held


def cpu_allocation_peak(profiler) -> int:
    """The highest running total of CPU bytes allocated while `profiler` ran, above the total when it started."""
    from torch._C._profiler import _EventType

    events, stack = [], list(profiler.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        stack.extend(node.children)
    if not events:  # a training step always allocates: the measure itself failed
        raise RuntimeError("torch.profiler reported no CPU allocations: the memory measure did not work here")
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


def prefault(base) -> None:
    """Read every weight and buffer once, so their pages are resident before any memory window opens."""
    import torch

    with torch.no_grad():
        for module in (base.unet, base.vae, base.image_encoder):
            for t in (*module.parameters(), *module.buffers()):
                t.sum()


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def clock(device: str) -> float:
    """CUDA: wall time after a synchronize. CPU: this process's CPU time (all its threads), which a machine shared
    with other jobs does not inflate the way it inflates wall time."""
    if device == "cuda":
        sync(device)
        return time.perf_counter()
    return time.process_time()


def train_ours(base, args, device, workdir):
    """Subject.train with the paint-by-example preset; returns (step times, (fit's allocated peak, fit's rss peak,
    the whole call's peak), studio, subject). The fit's window opens at Lightning's on_train_start (after annotation
    and data preparation) and closes at on_train_end, as the peer's loop does; the whole call's spans Subject.train
    (`peak`: CUDA allocated, CPU VmHWM)."""
    import lightning as L

    from adapters_store import Registry
    from subjectpaint import Studio, Subject

    times = []

    class Clock(L.Callback):
        last = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if batch_idx % args.accumulate:
                return
            now = clock(device)
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

        def on_train_start(self, trainer, module):
            self.before = peak(device)  # the call's high-water mark so far (annotation, data preparation)
            self.window = Window(device).open()

        def on_train_end(self, trainer, module):
            self.on_train_batch_start(trainer, module, None, 0)
            self.fit = self.window.close()

    studio = Studio(base, registry=Registry(f"sqlite:///{workdir}/registry.db", f"{workdir}/blobs"))
    shots = photos(base.resolution)
    clock_cb = Clock()
    start = reset_peak(device)
    subject = Subject.train(shots, "product", studio, "paint-by-example", steps=args.steps, batch_size=args.batch,
                            accumulate=args.accumulate, precision=args.precision,
                            gradient_checkpointing=args.checkpointing, detector=None, progress=False,
                            callbacks=[clock_cb])
    whole = max(clock_cb.before, clock_cb.window.high, peak(device)) - start
    return times[args.warmup:], (*clock_cb.fit, whole), studio, subject


def train_peer(base, args, device):
    """The peer: diffusers + PEFT in a plain loop, same shapes, precision, checkpointing and objective."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from peft import LoraConfig

    unet, vae, encoder = base.unet, base.vae, base.image_encoder
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=0.2,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]), adapter_name="subject")
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if args.checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    noise_sched = DDPMScheduler.from_config(base.scheduler.config)
    opt = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-5, weight_decay=1e-2)
    micro = args.batch // args.accumulate
    crop = base.feature_extractor.crop_size
    size, ref = base.resolution, int(crop if isinstance(crop, (int, float)) else crop["height"])
    times, last = [], None
    window = Window(device).open()  # the batch is inside the window, as ours' data loading is
    g = torch.Generator(device=device).manual_seed(0)
    target = torch.rand(micro, 3, size, size, generator=g, device=device) * 2 - 1
    mask = torch.zeros(micro, 1, size, size, device=device)
    mask[..., size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1
    reference = torch.randn(micro, 3, ref, ref, generator=g, device=device)
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device) if args.precision == "16-mixed" else None
    dtype = unet.dtype
    for step in range(args.steps + 1):
        now = clock(device)
        if last is not None:
            times.append(now - last)
        last = now
        if step == args.steps:
            break
        for _ in range(args.accumulate):
            with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
                with torch.no_grad():
                    keep = 1.0 - (mask > 0.5).float()
                    scale = vae.config.scaling_factor
                    latents = vae.encode(target.to(dtype)).latent_dist.sample(generator=g) * scale
                    masked = vae.encode((target * keep).to(dtype)).latent_dist.sample(generator=g) * scale
                    cond = encoder(reference.to(dtype))
                    dropped = torch.rand(micro, 1, 1, generator=g, device=device) < 0.2
                    cond = torch.where(dropped, encoder.uncond_vector.to(cond.dtype).expand_as(cond), cond)
                    keep_small = F.interpolate(keep, size=latents.shape[-2:]).to(dtype)
                    noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
                    t = torch.randint(0, 1000, (micro,), generator=g, device=device)
                    noisy = noise_sched.add_noise(latents, noise, t)
                pred = unet(torch.cat([noisy, masked, keep_small], 1), t, encoder_hidden_states=cond).sample
                loss = F.mse_loss(pred.float(), noise.float()) / args.accumulate
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
    return times[args.warmup:], window.close()


def place_and_swap(studio, subject, device, steps: int) -> dict:
    """The three placement entry points and the swap latencies."""
    import numpy as np
    import PIL.Image

    from subjectpaint import Subject

    size = studio.base.resolution
    rng = np.random.default_rng(0)
    room = PIL.Image.fromarray(rng.integers(60, 200, (size * 3 // 4, size, 3), dtype=np.uint8))  # non-square
    mask = PIL.Image.new("L", room.size, 0)
    mask.paste(255, (size // 3, size // 4, 2 * size // 3, 2 * size // 3))
    loaded = Subject.load(subject.name, studio)
    placed, seconds = 0, {}
    for what, run in (("inpaint", lambda: studio.inpaint(room, mask, loaded, steps=steps, seed=0, progress=False)),
                      ("progressive", lambda: studio.progressive(steps=steps, progress=False).place(loaded, room,
                                                                                                    mask)),
                      ("dual_branch", lambda: studio.dual_branch(steps=steps, progress=False).place(loaded, room,
                                                                                                    mask))):
        t0 = time.perf_counter()
        try:
            out = run()
            placed += int(out.image.size == room.size)
        except Exception as exc:  # counted as not placed, and said
            print(f"{what} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        seconds[what] = round(time.perf_counter() - t0, 2)
    cold, warm = [], []
    for _ in range(3):
        studio.adapter_cache.clear()
        sync(device)
        t0 = time.perf_counter()
        studio.activate(loaded)
        sync(device)
        cold.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        studio.activate(loaded)
        sync(device)
        warm.append(time.perf_counter() - t0)
    studio.activate(None)
    return {"placed": placed, "place_s": seconds, "swap_cold_ms": round(1e3 * statistics.median(cold), 3),
            "swap_warm_ms": round(1e3 * statistics.median(warm), 3)}


# ------------------------------------------------------------------------------------------------ runs


def warm_up(args, device: str) -> None:
    """One short run of this side on the tiny base before anything is measured: the modules Lightning, PEFT and
    torch import lazily on a first fit, and the allocator's first pools, are a one-time cost of a process, not of
    a training run (a worker pays them once)."""
    import argparse as _argparse

    from subjectpaint.base import ExemplarInpainter

    tiny = ExemplarInpainter.tiny(0).to(device=device)
    small = _argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 0, "batch": args.accumulate})
    if args.side == "peer":
        train_peer(tiny, small, device)
    else:
        with tempfile.TemporaryDirectory(prefix="real-shape-warm-") as work:
            train_ours(tiny, small, device, work)[2].registry.close()


def child(args) -> None:
    import torch

    import lightning  # noqa: F401  (both sides import the same modules before the memory baseline)
    import peft  # noqa: F401

    import trainers.train  # noqa: F401
    from subjectpaint import Studio, Subject  # noqa: F401

    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    warm_up(args, device)
    base = load_base(args.base_dir, device, args.base_dtype)
    prefault(base)
    if args.side == "peer":
        times, (mem, rss_mem) = train_peer(base, args, device)
        out = {"side": "peer", "times": times, "peak_bytes": mem, "rss_peak_bytes": rss_mem,
               "call_peak_bytes": rss_mem if device != "cuda" else mem}
    else:
        with tempfile.TemporaryDirectory(prefix="real-shape-") as work:
            times, (mem, rss_mem, whole), studio, subject = train_ours(base, args, device, work)
            out = {"side": "ours", "times": times, "peak_bytes": mem, "rss_peak_bytes": rss_mem,
                   "call_peak_bytes": whole,
                   "adapter_bytes": subject.record.byte_size,
                   "dtype": str(base.dtype).replace("torch.", ""), "unet_params": sum(
                       p.numel() for p in base.unet.parameters())}
            print("trained:", json.dumps(out), file=sys.stderr, flush=True)  # seen before the placements end
            if args.place:
                out.update(place_and_swap(studio, subject, device, args.place_steps))
            studio.registry.close()
    out["device"] = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(json.dumps(out))


def ratio_interval(ours: list[float], peer: list[float], n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap 95% interval of median(ours) / median(peer)."""
    import random

    rng = random.Random(seed)
    draws = sorted(statistics.median(rng.choices(ours, k=len(ours))) / statistics.median(rng.choices(peer, k=len(peer)))
                   for _ in range(n))
    return draws[int(0.025 * n)], draws[int(0.975 * n) - 1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes at 32 px, 4 steps, batch 2, one alternation")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per training run")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the timing")
    ap.add_argument("--batch", type=int, default=1, help="samples per optimizer step")
    ap.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--precision", default="32", choices=("32", "16-mixed", "bf16-mixed"))
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (both sides)")
    ap.add_argument("--base-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="dtype of the frozen base (the LoRA factors train in fp32 either way)")
    ap.add_argument("--repeats", type=int, default=1, help="alternations of ours and the peer")
    ap.add_argument("--place-steps", type=int, default=2, help="denoising steps of each placement")
    ap.add_argument("--cpu", action="store_true", help="stay on the CPU even with a GPU present")
    ap.add_argument("--no-place", action="store_true", help="training comparison only (placed = 0)")
    ap.add_argument("--base-dir", help=argparse.SUPPRESS)
    ap.add_argument("--side", choices=("ours", "peer"), help=argparse.SUPPRESS)
    ap.add_argument("--place", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.batch, args.place_steps = 4, 2, 1
    if args.side:
        return child(args)
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="real-shape-base-") as tmp:
        base = pbe_shaped_base(args.quick)
        base.save_pretrained(tmp)  # built once; every subprocess loads the same weights (safetensors)
        del base
        results = {"ours": [], "peer": []}
        for r in range(args.repeats):
            for side in ("peer", "ours"):
                cmd = [sys.executable, __file__, "--side", side, "--base-dir", tmp]
                for k in ("steps", "warmup", "batch", "accumulate", "precision", "place_steps", "base_dtype"):
                    cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
                cmd += ["--checkpointing"] * args.checkpointing + ["--cpu"] * args.cpu
                cmd += ["--place"] * (side == "ours" and r == args.repeats - 1 and not args.no_place)
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its stderr: ours
                if proc.returncode:
                    raise SystemExit(f"{side} run failed ({proc.returncode})")
                results[side].append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(f"{side}: median step {statistics.median(results[side][-1]['times']):.3f} s, peak "
                      f"{results[side][-1]['peak_bytes'] / 2**20:.1f} MiB allocated", flush=True)
    ours_t = [t for r in results["ours"] for t in r["times"]]
    peer_t = [t for r in results["peer"] for t in r["times"]]
    ours_m = min(r["peak_bytes"] for r in results["ours"])
    peer_m = min(r["peak_bytes"] for r in results["peer"])
    rss = {side: (min(r["rss_peak_bytes"] for r in results[side]) if results[side][0]["rss_peak_bytes"] is not None
                  else None) for side in results}
    peer_call = min(r["call_peak_bytes"] for r in results["peer"])
    ours_call = min(r["call_peak_bytes"] for r in results["ours"])
    last = results["ours"][-1]
    lo, hi = ratio_interval(ours_t, peer_t)
    summary = {
        "bench": "real_shape", "quick": args.quick, "device": last["device"], "dtype": last["dtype"],
        "precision": args.precision, "gradient_checkpointing": args.checkpointing, "unet_params": last["unet_params"],
        "batch": args.batch, "accumulate": args.accumulate, "steps": args.steps, "warmup": args.warmup,
        "repeats": args.repeats, "ours_step_s": round(statistics.median(ours_t), 4),
        "peer_step_s": round(statistics.median(peer_t), 4),
        "train_time_ratio_vs_peft": round(statistics.median(ours_t) / statistics.median(peer_t), 4),
        "train_time_ratio_ci95": [round(lo, 4), round(hi, 4)],
        "ours_peak_mb": round(ours_m / 2**20, 1), "peer_peak_mb": round(peer_m / 2**20, 1),
        "train_peak_mem_ratio_vs_peft": round(ours_m / max(peer_m, 1), 4),
        "memory_measure": "cuda max_memory_allocated" if last["device"] != "cpu" else "cpu allocator (profiler)",
        "ours_rss_peak_mb": None if rss["ours"] is None else round(rss["ours"] / 2**20, 1),
        "peer_rss_peak_mb": None if rss["peer"] is None else round(rss["peer"] / 2**20, 1),
        "train_rss_peak_ratio_vs_peft": None if rss["ours"] is None else round(rss["ours"] / max(rss["peer"], 1), 4),
        "subject_train_peak_mb": round(ours_call / 2**20, 1),
        "subject_train_peak_mem_ratio_vs_peft": round(ours_call / max(peer_call, 1), 4),
        "adapter_bytes": last["adapter_bytes"], "placed": last.get("placed", 0), "place_s": last.get("place_s"),
        "swap_cold_ms": last.get("swap_cold_ms"), "swap_warm_ms": last.get("swap_warm_ms"),
        "minutes": round((time.time() - started) / 60, 2), "goals": GOALS,
    }
    summary["goal_met"] = (summary["placed"] == GOALS["placed"] and summary["adapter_bytes"] <= GOALS["adapter_bytes"]
                           and summary["train_time_ratio_vs_peft"] <= GOALS["train_time_ratio_vs_peft"]
                           and summary["train_peak_mem_ratio_vs_peft"] <= GOALS["train_peak_mem_ratio_vs_peft"])
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
