"""Train the demo base: Paint by Example's architecture, shrunk, on procedural product-in-room scenes.

    python -m subjectpaint.demo.train [--out subjectpaint/demo/weights] [--workdir runs/demo] [--seed 0]

Three Lightning stages, all seeded and resumable from `--workdir` (rerun the same command after an
interruption and it continues from the last checkpoint):

1. VAE (`AutoencoderKL`, 64 px -> 16x16x4 latents): reconstruction (L1 + MSE on the posterior mode) + a small
   KL term, cosine learning-rate decay.
2. UNet (9 input channels) + image encoder (tiny CLIP ViT -> mapper -> LayerNorm -> Linear, one token), trained
   together with the Paint-by-Example recipe: mask = the product's box or the paper's Bezier mask around it,
   masked image = the scene with the mask zeroed, exemplar = an augmented reference of the same product (flip,
   rotation, blur, elastic: torchvision v2), condition replaced by the learned `uncond_vector` 20% of the time,
   MSE under the DDPM schedule Paint by Example uses. Two departures buy a 2-core CPU budget: v-prediction
   instead of epsilon (the scheduler config says so, so every diffusers scheduler and pipeline samples it
   right; epsilon left the noisy steps, where the exemplar decides the colour, untrained after 500 steps), and
   the masked region weighted x8. An EMA of the weights is what ships.
3. VAE decoder refinement with the encoder frozen, so the latents stage 2 learned on do not move.
"""

from __future__ import annotations

import argparse
import sys
import copy
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, UNet2DConditionModel
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2
from transformers import CLIPImageProcessor, CLIPVisionConfig
from transformers.image_utils import OPENAI_CLIP_MEAN as CLIP_MEAN, OPENAI_CLIP_STD as CLIP_STD

from ..base import DEMO_DIR, ExemplarInpainter, denoising_target, pbe_scheduler
from ..masks import bezier_mask, box_mask
from .scenes import TRAIN_SEEDS, make_scene

SIZE = 64


def demo_scheduler():
    """Paint by Example's scheduler (PNDM, scaled-linear betas), predicting v instead of epsilon."""
    return PNDMScheduler.from_config(pbe_scheduler().config, prediction_type="v_prediction")


# ---------------------------------------------------------------------------------------------- models


def demo_networks(seed: int = 0):
    """The shrunk Paint-by-Example networks, freshly initialised."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
        scaling_factor=1.0,  # set from data after stage 1
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=128,
        attention_head_dim=4,  # diffusers reads this as the number of heads: 4 heads of 8/16/32 channels
        norm_num_groups=16,
    )
    clip = CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=SIZE,
        patch_size=8,
        projection_dim=128,
    )
    encoder = PaintByExampleImageEncoder(clip, proj_size=128)
    with torch.no_grad():
        encoder.uncond_vector.normal_(0, 0.02)
    features = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                                  image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    return vae, unet, encoder, features


# ------------------------------------------------------------------------------------------------ data


def to_unit(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1).copy()) / 255.0


class SceneData(Dataset):
    """Item i is a pure function of (seed, i): a training scene and its Paint-by-Example sample."""

    reference_augment = v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomRotation(20, fill=1.0),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.1, 1.5))], p=0.3),
        v2.RandomApply([v2.ElasticTransform(alpha=20.0, sigma=5.0, fill=1.0)], p=0.3),
    ])

    def __init__(self, length: int, seed: int = 0, stage: str = "unet", loose: float = 0.0):
        self.length, self.seed, self.stage, self.loose = length, seed, stage, loose

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        rng = np.random.default_rng([self.seed, i])
        scene = make_scene(int(rng.integers(len(TRAIN_SEEDS))), SIZE)
        target = to_unit(scene.composite) * 2 - 1
        if self.stage == "vae":
            pick = rng.integers(4)
            img = to_unit((scene.composite, scene.room, scene.exemplar, scene.composite)[pick]) * 2 - 1
            if pick == 3:  # what the UNet's masked-image channels encode: the scene, box zeroed
                img = img * (1 - box_mask((SIZE, SIZE), scene.mask_box))[None]
            return {"image": img}
        pick = rng.random()
        if pick < 0.5:
            mask = box_mask((SIZE, SIZE), scene.mask_box)
        elif pick < 1.0 - self.loose:
            mask = bezier_mask((SIZE, SIZE), scene.mask_box, np.random.default_rng(rng.integers(2**31)), max_offset=2)
            mask = torch.maximum(mask, box_mask((SIZE, SIZE), scene.box))  # never cut into the product
        else:  # a loose box with the product somewhere inside, as users draw them (not in the paper)
            x0, y0, x1, y1 = scene.mask_box
            w, h = x1 - x0, y1 - y0
            g = rng.uniform(0.1, 0.5, size=4) * np.array([w, h, w, h])
            mask = box_mask((SIZE, SIZE), (max(0, int(x0 - g[0])), max(0, int(y0 - g[1])),
                                           min(SIZE, int(x1 + g[2]) + 1), min(SIZE, int(y1 + g[3]) + 1)))
        torch.manual_seed(int(rng.integers(2**31)))
        if rng.random() < 0.7:
            reference = to_unit(scene.exemplar)
        else:  # the object cut from the scene itself, as Paint by Example trains
            x0, y0, x1, y1 = scene.box
            side = max(x1 - x0, y1 - y0)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            crop = scene.composite.crop((cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side))
            reference = to_unit(crop.resize((SIZE, SIZE)))
        reference = self.reference_augment(reference).clamp(0, 1)
        reference = v2.functional.normalize(reference, CLIP_MEAN, CLIP_STD)
        return {"target": target, "mask": mask[None], "reference": reference}


# ------------------------------------------------------------------------------------------- stage 1


class VAEModule(L.LightningModule):
    def __init__(self, vae: AutoencoderKL, lr: float = 2e-3, kl_weight: float = 1e-7, steps: int = 1500):
        super().__init__()
        self.vae, self.lr, self.kl_weight, self.steps = vae, lr, kl_weight, steps

    def training_step(self, batch, _):
        x = batch["image"]
        posterior = self.vae.encode(x).latent_dist
        recon = self.vae.decode(posterior.mode()).sample
        mse = F.mse_loss(recon, x)
        loss = F.l1_loss(recon, x) + mse + self.kl_weight * posterior.kl().mean()
        self.log_dict({"mse": mse, "psnr": 10 * torch.log10(4.0 / mse)}, prog_bar=True)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.vae.parameters(), lr=self.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps, eta_min=self.lr / 20)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DecoderModule(L.LightningModule):
    """Stage 3: sharpen the VAE decoder with the encoder frozen (the latents the UNet learned stay the same)."""

    def __init__(self, vae: AutoencoderKL, lr: float = 5e-4):
        super().__init__()
        self.vae, self.lr = vae, lr
        self.vae.requires_grad_(False)  # stage 2 froze it all; only the decoder side trains here
        self.vae.decoder.requires_grad_(True)
        self.vae.post_quant_conv.requires_grad_(True)

    def training_step(self, batch, _):
        x = batch["image"]
        with torch.no_grad():
            z = self.vae.encode(x).latent_dist.sample()
        mse = F.mse_loss(self.vae.decode(z).sample, x)
        self.log("psnr", 10 * torch.log10(4.0 / mse), prog_bar=True)
        return mse

    def configure_optimizers(self):
        params = list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)


# ------------------------------------------------------------------------------------------- stage 2


class DemoBaseModule(L.LightningModule):
    """UNet + image encoder with the Paint-by-Example objective; the VAE is frozen."""

    def __init__(self, vae, unet, encoder, lr=8e-4, drop=0.2, ema_decay=0.995, warmup=100, mask_weight=8.0):
        super().__init__()
        self.vae, self.unet, self.encoder = vae.requires_grad_(False).eval(), unet, encoder
        self.ema_unet, self.ema_encoder = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(encoder).requires_grad_(False)
        self.noise = DDPMScheduler.from_config(demo_scheduler().config)
        self.lr, self.drop, self.ema_decay, self.warmup, self.mask_weight = lr, drop, ema_decay, warmup, mask_weight

    def training_step(self, batch, _):
        target, mask, reference = batch["target"], batch["mask"], batch["reference"]
        b = target.shape[0]
        scale = self.vae.config.scaling_factor
        with torch.no_grad():
            keep = 1.0 - mask
            both = self.vae.encode(torch.cat([target, target * keep])).latent_dist.sample() * scale
            latents, masked_latents = both.chunk(2)
        keep_small = F.interpolate(keep, size=latents.shape[-2:])
        cond = self.encoder(reference)
        dropped = torch.rand(b, 1, 1, device=cond.device) < self.drop
        cond = torch.where(dropped, self.encoder.uncond_vector.expand_as(cond), cond)
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (b,), device=latents.device)
        noisy = self.noise.add_noise(latents, noise, t)
        pred = self.unet(torch.cat([noisy, masked_latents, keep_small], 1), t, encoder_hidden_states=cond).sample
        # Outside the mask the answer is in the masked-image channels; weight the masked region so a short
        # CPU budget goes to what the exemplar decides (a departure from the paper's uniform loss).
        weight = 1.0 + self.mask_weight * (1.0 - keep_small)
        loss = (weight * (pred - denoising_target(self.noise, latents, noise, t)) ** 2).mean() / weight.mean()
        self.log("loss", loss, prog_bar=True)
        return loss

    def on_train_batch_end(self, *args):
        decay = min(self.ema_decay, (1 + self.global_step) / (10 + self.global_step))
        with torch.no_grad():  # one fused update: a per-tensor loop is launch-bound on an accelerator
            ema = [*self.ema_unet.parameters(), *self.ema_encoder.parameters()]
            live = [*self.unet.parameters(), *self.encoder.parameters()]
            torch._foreach_lerp_(ema, live, 1 - decay)

    def configure_optimizers(self):
        params = list(self.unet.parameters()) + list(self.encoder.parameters())
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ------------------------------------------------------------------------------------------------ main


def fit(module, data, steps, batch, workdir: Path, name: str, seed: int, *, accelerator="cpu", workers=1,
        max_minutes=None, ckpt_every=100):
    """One Lightning stage. `max_minutes` caps the stage's wall time (an accelerator run sized by time, not
    steps: the step count it reached is in the trainer and goes into training.json)."""
    ckpt_dir = workdir / name
    last = ckpt_dir / "last.ckpt"
    trainer = L.Trainer(
        max_steps=steps,
        max_time={"minutes": max_minutes} if max_minutes else None,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_model_summary=False,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=ckpt_every, save_top_k=0),
        ],
        gradient_clip_val=1.0,
        deterministic=False,
    )
    loader = DataLoader(data, batch_size=batch, num_workers=workers, persistent_workers=True, shuffle=False,
                        pin_memory=accelerator != "cpu")
    L.seed_everything(seed, workers=True)
    trainer.fit(module, loader, ckpt_path=str(last) if last.exists() else None)
    return trainer


@torch.no_grad()
def point_posterior(vae: AutoencoderKL, logvar: float = -20.0) -> None:
    """Stage 1 trains on the posterior mode, so its log-variance head stays at its random init (std ~1). Make the
    posterior a point mass (std e^-10) so `latent_dist.sample()`, which stage 2 and the Paint-by-Example pipeline
    draw for the masked image, equals the mode."""
    c = vae.config.latent_channels
    vae.quant_conv.weight[c:].zero_()
    vae.quant_conv.bias[c:].fill_(logvar)


@torch.no_grad()
def latent_scale(vae, n=256, seed=0) -> float:
    data = SceneData(n, seed=seed + 99, stage="vae")
    x = torch.stack([data[i]["image"] for i in range(n)])
    return float(1.0 / vae.encode(x).latent_dist.mode().std())


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the demo base (see module docstring).")
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
    parser.add_argument("--workdir", type=Path, default=Path("runs/demo"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--decoder-steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--vae-batch", type=int, default=16)
    parser.add_argument("--loose", type=float, default=0.0, help="share of loose-box masks, taken from the Bezier half")
    parser.add_argument("--ema-decay", type=float, default=0.995)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--accelerator", default="cpu", help="cpu (the 40-minute recipe), gpu or auto")
    parser.add_argument("--workers", type=int, default=1, help="data-loader processes (scenes are drawn on the CPU)")
    parser.add_argument("--minutes", type=float, nargs=3, default=None, metavar=("VAE", "UNET", "DECODER"),
                        help="wall-time cap per stage; the steps reached are recorded")
    parser.add_argument("--ckpt-every", type=int, default=100)
    parser.add_argument("--lr", type=float, default=8e-4, help="stage 2 learning rate")
    parser.add_argument("--init", type=Path, default=None,
                        help="continue stage 2 from a saved demo base: its VAE is kept (stages 1 and 3 skipped) and its "
                             "UNet and encoder train on with a fresh optimizer (use another --seed for new scenes)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision("high")  # TF32 on an accelerator; no effect on the CPU
    caps = args.minutes or (None, None, None)
    run = dict(accelerator=args.accelerator, workers=args.workers, ckpt_every=args.ckpt_every)
    started = time.time()
    vae, unet, encoder, features = demo_networks(args.seed)
    done = {}
    if args.init:  # the VAE, its latent scale and the scenes' latents stay exactly those stage 2 learned on
        init = ExemplarInpainter.from_pretrained(args.init)
        vae, unet, encoder = init.vae, init.unet.requires_grad_(True).train(), init.image_encoder.requires_grad_(True).train()
        args.vae_steps = args.decoder_steps = 0
    else:  # stage 1: the VAE
        vae_module = VAEModule(vae, steps=args.vae_steps)
        done["vae"] = fit(vae_module, SceneData(args.vae_steps * args.vae_batch, args.seed, "vae"), args.vae_steps,
                          args.vae_batch, args.workdir, "vae", args.seed, max_minutes=caps[0], **run).global_step
        vae.cpu().eval()
        point_posterior(vae)
        vae.register_to_config(scaling_factor=latent_scale(vae, seed=args.seed))
    vae_minutes = (time.time() - started) / 60

    # stage 2: UNet + image encoder
    module = DemoBaseModule(vae, unet, encoder, lr=args.lr, ema_decay=args.ema_decay)
    done["unet"] = fit(module, SceneData(args.steps * args.batch, args.seed, "unet", args.loose), args.steps, args.batch,
                       args.workdir, "unet", args.seed, max_minutes=caps[1], **run).global_step

    # stage 3: the decoder, encoder frozen
    if args.decoder_steps:
        done["decoder"] = fit(DecoderModule(vae), SceneData(args.decoder_steps * args.vae_batch, args.seed + 1, "vae"),
                              args.decoder_steps, args.vae_batch, args.workdir, "decoder", args.seed,
                              max_minutes=caps[2], **run).global_step
    vae.cpu().eval()
    module.cpu()

    base = ExemplarInpainter(vae, module.ema_unet, module.ema_encoder, demo_scheduler(), features, name="subjectpaint-demo")
    base.to(device="cpu", dtype=torch.float16)  # shipped in half precision (loads as float32)
    args.out.mkdir(parents=True, exist_ok=True)
    base.save_pretrained(args.out)
    record = {
        "command": "OMP_WAIT_POLICY=PASSIVE python -m subjectpaint.demo.train " + " ".join(sys.argv[1:] if argv is None else argv),
        "seed": args.seed,
        "vae_steps": args.vae_steps,
        "steps": args.steps,
        "decoder_steps": args.decoder_steps,
        "batch": args.batch,
        "vae_batch": args.vae_batch,
        "ema_decay": args.ema_decay,
        "loose": args.loose,
        "lr": args.lr,
        "init": str(args.init) if args.init else None,
        "accelerator": args.accelerator,
        "steps_done": done,
        "device": torch.cuda.get_device_name() if args.accelerator != "cpu" and torch.cuda.is_available() else "cpu",
        "vae_minutes": round(vae_minutes, 1),
        "total_minutes": round((time.time() - started) / 60, 1),
        "torch_threads": torch.get_num_threads(),
        "fingerprint": base.fingerprint(),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record))


if __name__ == "__main__":
    main()
