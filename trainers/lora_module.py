"""SubjectLoRAModule: PEFT LoRA on the base UNet's attention projections, trained with Paint by Example's
objective (shared/papers/lora-image-guided-inpainting.txt 4.2; paint-by-example.txt 3.2.4).

The base (VAE, UNet weights, image encoder) is frozen; only the LoRA factors train. One step: VAE-encode the
target and the masked target, encode the augmented reference, replace the condition by the learned
unconditional vector 20% of the time, noise the latents under the base's DDPM schedule, predict the noise (or v, as the base's scheduler says) from the
9-channel input (noisy latent 4 + masked-image latent 4 + keep-mask 1), MSE. All randomness of a step (VAE
sampling, noise, timesteps, condition drop, LoRA dropout) comes from `(seed, global_step, rank)`, so a resumed
run continues exactly. Lightning owns the loop, checkpoints and progress bar (`make_trainer`, `fit`), and the
precision (autocast) and gradient accumulation. The LoRA is added to a copy of the UNet's module tree that shares its
weights (`shared_copy`): no second copy of the frozen weights, and the base's own UNet is left without adapters. The
LoRA factors train in fp32 whatever the frozen base's dtype; `gradient_checkpointing` recomputes the UNet's
activations in the backward pass.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from subjectpaint.base import LORA_TARGETS as DEFAULT_TARGETS
from subjectpaint.base import PREDICTION_TYPES, ExemplarInpainter, denoising_target
from subjectpaint.errors import InvalidArgument

from .data import signed_target

ADAPTER = "subject"
# The frozen VAE and image encoder stay in eval mode on purpose; Lightning's notice about it is noise here.
warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(lr_schedule: str) -> str:
    """`lr_schedule` if it is one of LR_SCHEDULES; InvalidArgument otherwise."""
    if lr_schedule not in LR_SCHEDULES:
        raise InvalidArgument(f"lr_schedule must be one of {LR_SCHEDULES}, got {lr_schedule!r}")
    return lr_schedule


def lora_config(rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                targets=DEFAULT_TARGETS) -> LoraConfig:
    return LoraConfig(r=int(rank), lora_alpha=float(alpha if alpha is not None else rank), lora_dropout=float(dropout),
                      target_modules=list(targets), init_lora_weights=True)


def shared_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s module tree that shares its parameters and buffers (no weight memory): adapters added to
    the copy (PEFT replaces the target layers) leave the original untouched."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + int(rank) * 104_729) % (2**63 - 1)


class SubjectLoRAModule(L.LightningModule):
    """LoRA on a copy of `base.unet` (the base itself is left untouched).

    rank, alpha (default = rank), dropout, targets: the LoRA; lr, weight_decay: AdamW; lr_schedule: "constant",
    or "cosine" (the lr decays to 0 at the Trainer's `max_steps`, stepped per optimizer step; constant when the
    Trainer has no `max_steps`); drop: condition-drop probability (the paper's 20%); seed: all per-step randomness.
    """

    def __init__(self, base: ExemplarInpainter, rank: int = 4, alpha: float | None = None, dropout: float = 0.0,
                 targets=DEFAULT_TARGETS, lr: float = 1e-3, weight_decay: float = 0.0, drop: float = 0.2,
                 seed: int = 0, lr_schedule: str = "constant", gradient_checkpointing: bool = False,
                 accumulate: int = 1):
        super().__init__()
        check_lr_schedule(lr_schedule)
        self.save_hyperparameters(ignore=["base"])
        self.vae = base.vae.eval().requires_grad_(False)
        self.image_encoder = base.image_encoder.eval().requires_grad_(False)
        self.unet = shared_copy(base.unet).eval().requires_grad_(False)
        self._base_unet = [base.unet]  # (a list: not a submodule) put back on its device by `restore_shared`
        self.config = lora_config(rank, alpha, dropout, targets)
        with torch.random.fork_rng(devices=[]):  # the LoRA init (A ~ Kaiming, B = 0) is a function of the seed
            torch.manual_seed(seed)
            self.unet.add_adapter(self.config, adapter_name=ADAPTER)
        for p in self.unet.parameters():  # LoRA factors train in fp32 whatever the frozen base's dtype
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.accumulate = int(accumulate)
        # the base's own noise schedule and prediction type (Paint by Example: epsilon; the demo base: v)
        self.noise = DDPMScheduler.from_config(base.scheduler.config)
        if self.noise.config.prediction_type not in PREDICTION_TYPES:  # refused before any training
            raise InvalidArgument(f"unknown prediction_type {self.noise.config.prediction_type!r} in the base's scheduler")
        self.lr, self.weight_decay, self.drop, self.seed = lr, weight_decay, drop, seed
        self.lr_schedule = lr_schedule
        self.strict_loading = False  # checkpoints hold only the LoRA factors (see on_save_checkpoint)
        self._shared_home = None  # [(module, device, dtype)] of the shared VAE and encoder while fitting

    # ------------------------------------------------------------------- the base's shared modules

    def _shared_placement(self) -> list:
        return [(m, next(m.parameters()).device, next(m.parameters()).dtype)
                for m in (self.vae, self.image_encoder, *self._base_unet)]

    def restore_shared(self) -> None:
        """Put the base's VAE, image encoder and UNet weights (shared with this module) back on the device and dtype
        they had when fitting began. Lightning moves the whole module to the training device at the start and to the
        CPU at teardown; without this, the studio's base is left half moved."""
        for m, device, dtype in self._shared_home or ():
            now = next(m.parameters())
            if now.device != device:
                m.to(device=device)
            if now.dtype != dtype:
                m.to(dtype=dtype)
        self._shared_home = None

    def setup(self, stage):
        # called before the strategy moves the module (and on a plain `Trainer.fit(module)` too)
        if self._shared_home is None:
            self._shared_home = self._shared_placement()

    def teardown(self, stage):
        # a finished run: Lightning has already moved the module to the CPU when this hook runs
        self.restore_shared()

    # ------------------------------------------------------------------------------------- the step

    def on_train_start(self):
        self.unet.train()  # LoRA dropout on (the frozen UNet itself has no dropout); VAE and encoder stay eval

    def _micro_step(self, batch_idx: int) -> int:
        """The forward pass's index: the optimizer step without gradient accumulation, else step * k + micro-batch."""
        if self.accumulate == 1:
            return self.global_step
        return self.global_step * self.accumulate + batch_idx % self.accumulate

    def on_train_batch_start(self, batch, batch_idx):
        # LoRA dropout draws from the global generator: pin it to the step too
        torch.manual_seed(_step_seed(self.seed, self._micro_step(batch_idx), self.global_rank) + 1)

    @torch.no_grad()
    def _inputs(self, batch, g: torch.Generator):
        """(UNet input, timesteps, condition, loss target) for `batch`. One full-size float image lives through the two
        VAE passes (the step's high-water mark; masked in place for the second) and none through the UNet's."""
        mask, reference = batch["mask"], batch["reference"]
        b, device = mask.shape[0], mask.device
        scale, dtype = self.vae.config.scaling_factor, self.unet.dtype
        image = signed_target(batch["target"])  # a copy of its own
        latents = self.vae.encode(image.to(dtype)).latent_dist.sample(generator=g) * scale
        hole = mask > 0.5
        masked = self.vae.encode(image.masked_fill_(hole, 0).to(dtype)).latent_dist.sample(generator=g) * scale
        del image
        keep = 1.0 - hole.float()
        cond = self.image_encoder(reference.to(dtype))
        uncond = self.image_encoder.uncond_vector.to(cond.dtype).expand_as(cond)
        dropped = torch.rand(b, 1, 1, generator=g, device=device) < self.drop
        cond = torch.where(dropped, uncond, cond)
        keep_small = F.interpolate(keep, size=latents.shape[-2:]).to(dtype)
        noise = torch.randn(latents.shape, generator=g, device=device, dtype=latents.dtype)
        t = torch.randint(0, self.noise.config.num_train_timesteps, (b,), generator=g, device=device)
        noisy = self.noise.add_noise(latents, noise, t)
        return torch.cat([noisy, masked, keep_small], 1), t, cond, denoising_target(self.noise, latents, noise, t)

    def training_step(self, batch, batch_idx):
        step = self._micro_step(batch_idx)
        device = batch["mask"].device
        g = torch.Generator(device=device).manual_seed(_step_seed(self.seed, step, self.global_rank))
        x, t, cond, target = self._inputs(batch, g)
        pred = self.unet(x, t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred.float(), target.float())
        self.log("loss", loss, prog_bar=True, batch_size=x.shape[0])
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        optimizer.step(closure=optimizer_closure)
        # Free the gradients now: Lightning clears them only after the next step's forward pass (before its backward),
        # so they would otherwise sit through that forward's activations, the training's high-water mark.
        optimizer.zero_grad(set_to_none=True)

    def configure_optimizers(self):
        params = [p for p in self.unet.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        steps = self.trainer.max_steps if self._trainer is not None else -1
        if self.lr_schedule == "constant" or steps <= 0:
            return optimizer
        # Lightning checkpoints the scheduler with the optimizer, so a resumed run decays exactly as an uninterrupted one
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}

    # ------------------------------------------------------------------------------ checkpoints, export

    def on_save_checkpoint(self, checkpoint):
        trainable = {f"unet.{n}" for n, p in self.unet.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """PEFT keys with the `unet.` prefix, as diffusers' `get_peft_model_state_dict` + pipeline save produce."""
        sd = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER)
        return {f"unet.{k}": v.detach().float().cpu().clone() for k, v in sd.items()}


# ------------------------------------------------------------------------------------------ trainer


def accelerator_for(device: str | torch.device) -> tuple[str, int | list[int]]:
    """Lightning's (accelerator, devices) for training where a base lives: "cuda:1" -> ("gpu", [1])."""
    device = torch.device(device)
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    if device.type == "mps":
        return "mps", 1
    return "cpu", 1


class _RichBar(L.pytorch.callbacks.RichProgressBar):
    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def _get_train_description(self, current_epoch: int) -> str:
        return self.label


class _TQDMBar(L.pytorch.callbacks.TQDMProgressBar):
    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def on_train_epoch_start(self, trainer, *args) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.label)


def progress_bar(label: str = "training") -> L.pytorch.callbacks.ProgressBar:
    """Lightning's progress bar (rich when installed, as Lightning picks) labelled `label` instead of the epoch: a
    step-limited run has `max_epochs=-1`, which Lightning 2.6's rich bar shows as "Epoch 0/-2" (Lightning issue
    #21925, fixed after 2.6.6)."""
    from lightning.pytorch.utilities.imports import _RICH_AVAILABLE

    return _RichBar(label) if _RICH_AVAILABLE else _TQDMBar(label)


def make_trainer(steps: int, workdir: str | os.PathLike | None = None, *, every: int = 50, progress: bool = True,
                 strategy="auto", devices: int | str | list[int] = 1, accelerator: str = "cpu", callbacks=(),
                 label: str = "training", **kwargs) -> L.Trainer:
    """A Trainer for `steps` optimizer steps; with `workdir`, a checkpoint (`last.ckpt`) every `every` steps, and
    with `progress`, a progress bar labelled `label`.
    `use_distributed_sampler=False`: `SubjectDataModule`'s sampler splits data by rank itself."""
    callbacks = list(callbacks)
    if progress and not any(isinstance(c, L.pytorch.callbacks.ProgressBar) for c in callbacks):
        callbacks.append(progress_bar(label))
    if workdir is not None:
        callbacks.append(L.pytorch.callbacks.ModelCheckpoint(dirpath=str(workdir), save_last="link", save_top_k=1,
                                                             every_n_train_steps=every))
    return L.Trainer(max_steps=steps, max_epochs=-1, accelerator=accelerator, devices=devices, strategy=strategy,
                     logger=False, enable_model_summary=False, enable_progress_bar=progress,
                     enable_checkpointing=workdir is not None, use_distributed_sampler=False,
                     num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


def fit(module: SubjectLoRAModule, data: L.LightningDataModule, steps: int,
        workdir: str | os.PathLike | None = None, *, resume: bool = True, **trainer_kwargs) -> L.Trainer:
    """Train (or, with `resume` and a `last.ckpt` in `workdir`, continue training) to `steps` steps.

    The module shares the base's frozen VAE and image encoder and puts them back in its `teardown` hook after a
    finished run; an interrupted run moves the module to the CPU after the last hook, so `fit` restores them too."""
    trainer = make_trainer(steps, workdir, **trainer_kwargs)
    last = Path(workdir) / "last.ckpt" if workdir is not None else None
    ckpt = str(last) if resume and last is not None and last.exists() else None
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    finally:
        module.restore_shared()
    return trainer
