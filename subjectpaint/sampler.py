"""The one denoising loop of the project.

`Sampler.__call__` reads top to bottom like diffusers' pipelines: check inputs, conditioning, timesteps,
latents, mask latents, denoise, decode. With no hooks it is numerically the loop of diffusers'
`PaintByExamplePipeline` (tests/test_parity.py proves it). Sessions extend it only through hooks, which are
called at fixed, visible points of the loop:

    hook.bind(context)                     once, before anything: the call's scheduler, steps, generator (`HookContext`)
    hook.begin(unet, timesteps)            before the first step (install attention processors, ...)
    latents = hook.before_step(i, t, latents)   before the UNet call of step i
    noise_pred = hook.after_noise_pred(i, t, noise_pred)   the (guided) noise prediction, before the step
    latents = hook.after_step(i, t, latents)    after the scheduler step of step i
    latents = hook.finish(latents)          after the last step, before decoding
    hook.end(unet)                          always, also on error (restore processors, ...)

Two hooks ship here: `LatentStart` (per-pixel start step: progressive editing) and `AttentionProcessors`
(attention capture / injection processors, installed for the call and restored after).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field

import diffusers
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from .choices import DEFAULT_SCHEDULER, SCHEDULERS
from .errors import InvalidArgument


def make_scheduler(name_or_scheduler, config):
    """A fresh scheduler: by name (see `SCHEDULERS`) from the base's config, or an instance's own copy."""
    if name_or_scheduler is None:
        name_or_scheduler = DEFAULT_SCHEDULER
    if isinstance(name_or_scheduler, str):
        key = name_or_scheduler.lower()
        if key not in SCHEDULERS:
            raise InvalidArgument(f"unknown scheduler {name_or_scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        class_name, overrides = SCHEDULERS[key]
        cls = getattr(diffusers, class_name)
        if cls is DDIMScheduler and "clip_sample" not in config:
            # DDIM's own default clips the predicted x0 to [-1, 1], which is for pixel-space models; latents are
            # not bounded so (Stable Diffusion's configs say clip_sample false), and a config without the key
            # (Paint by Example's PNDM one) must not switch it on
            overrides = {**overrides, "clip_sample": False}
        return cls.from_config(config, **overrides)
    return name_or_scheduler.__class__.from_config(name_or_scheduler.config)


@dataclass
class SamplerOutput:
    images: torch.Tensor  # (B, 3, H, W) in [0, 1]
    latents: torch.Tensor  # (B, C, h, w) final latents


@dataclass(frozen=True)
class HookContext:
    """What the sampler tells every hook about the call, before the loop (`SamplerHook.bind`)."""

    unet: torch.nn.Module
    scheduler: object  # this call's own scheduler, timesteps set
    timesteps: torch.Tensor
    generator: torch.Generator | list[torch.Generator] | None
    device: torch.device  # of the latents
    dtype: torch.dtype

    @property
    def n_steps(self) -> int:
        return len(self.timesteps)

    def randn(self, shape) -> torch.Tensor:
        """Noise from the call's generator, drawn as the sampler draws its own (same device and dtype)."""
        return randn_tensor(shape, generator=self.generator, device=self.device, dtype=self.dtype)


class SamplerHook:
    """Base class of the sampler's extension points; every method is optional."""

    def bind(self, context: HookContext) -> None:
        """Called once per call, before `begin`: take what the hook needs from the call (scheduler, steps, ...)."""

    def begin(self, unet, timesteps) -> None: ...

    def before_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def after_noise_pred(self, i: int, t, noise_pred: torch.Tensor) -> torch.Tensor:
        return noise_pred

    def after_step(self, i: int, t, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def finish(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def end(self, unet) -> None: ...


@dataclass
class LatentStart(SamplerHook):
    """Per-pixel start of denoising: latent pixel p follows the source latent, noised to the current
    timestep, for every step i < start_step[p]; from step start_step[p] on it is denoised freely
    (0 = from the first step; >= the number of steps = never, the clean source is kept).

    start_step: (B, 1, h, w) integer steps; source: (B, C, h, w) clean latents; noise: the noise the source is
    noised with (default: drawn from the sampler's generator at `bind`), or `seed`: that noise regenerated from a
    generator seeded so whenever it is needed instead of kept (memory).
    """

    start_step: torch.Tensor
    source: torch.Tensor
    noise: torch.Tensor | None = None
    seed: int | None = None
    scheduler: object = field(default=None, repr=False)  # set at `bind`
    n_steps: int = field(default=0, repr=False)

    def bind(self, context):
        self.scheduler, self.n_steps = context.scheduler, context.n_steps
        if self.noise is None and self.seed is None:
            self.noise = context.randn(self.source.shape)
        self.start_step = self.start_step.to(context.device)
        self.source = self.source.to(device=context.device, dtype=context.dtype)
        if self.noise is None:  # a seed of its own: drawn once here, not at every step
            g = [torch.Generator(device=self.source.device).manual_seed(self.seed)]
            self.noise = randn_tensor(self.source.shape, generator=g, device=self.source.device, dtype=self.source.dtype)

    def source_noise(self) -> torch.Tensor:
        return self.noise

    def begin(self, unet, timesteps):
        # the last step any pixel is held, read once here: testing `held.any()` at every step would synchronise
        # with the device inside the loop
        self.held_until = int(self.start_step.max())

    def before_step(self, i, t, latents):
        if i >= self.held_until:
            return latents
        held = self.start_step > i
        noised = self.scheduler.add_noise(self.source, self.source_noise(), torch.as_tensor(t).reshape(1))
        return torch.where(held, noised.to(latents.dtype), latents)

    def finish(self, latents):
        return torch.where(self.start_step >= self.n_steps, self.source.to(latents.dtype), latents)


class AttentionProcessors(SamplerHook):
    """Install attention processors for one call (a dict name -> processor, or one for all layers)."""

    def __init__(self, processors):
        self.processors = processors
        self._saved = None

    def begin(self, unet, timesteps):
        self._saved = unet.attn_processors
        unet.set_attn_processor(self.processors)

    def end(self, unet):
        if self._saved is not None:
            unet.set_attn_processor(self._saved)
            self._saved = None


_STEP_POINTS = ("before_step", "after_noise_pred", "after_step")


def _overriding(hooks, point: str) -> list:
    """The hooks whose `point` method does something (is not SamplerHook's pass-through): only they are called in
    the loop, so a hook that does nothing at a point costs nothing there."""
    return [h for h in hooks if getattr(type(h), point, None) is not getattr(SamplerHook, point)]


class Sampler:
    """Exemplar inpainting: CFG with the learned unconditional vector, any diffusers scheduler, hooks."""

    def __init__(self, base, progress: bool = True):
        self.base = base
        self.progress = progress

    @torch.no_grad()
    def __call__(
        self,
        image: torch.Tensor,
        mask: torch.Tensor,
        embeddings: torch.Tensor,
        *,
        uncond: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.0,
        scheduler=None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        masked_image_latents: torch.Tensor | None = None,
        hooks: list[SamplerHook] | tuple = (),
        unet_kwargs: dict | None = None,
    ) -> SamplerOutput:
        """image: (B, 3, H, W) in [-1, 1]; mask: (B or 1, 1, H, W), 1 = regenerate; embeddings: (B or 1, T, D).

        uncond: the unconditional embedding (default: the image encoder's learned `uncond_vector`).
        """
        base = self.base
        device, dtype = base.device, embeddings.dtype

        # 1. Check inputs
        batch, height, width = self.check_inputs(image, mask, embeddings, num_inference_steps, guidance_scale)
        do_cfg = guidance_scale > 1.0

        # 2. Conditioning: [uncond..., cond...] as diffusers does
        cond = self.prepare_conditioning(embeddings, uncond, batch, do_cfg, device, dtype)

        # 3. Timesteps
        scheduler = make_scheduler(scheduler if scheduler is not None else base.scheduler, base.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = scheduler.timesteps

        # 4. Initial latents
        latents = self.prepare_latents(batch, height, width, dtype, device, generator, latents, scheduler)

        # 5. Mask and masked-image latents (the 5 extra UNet input channels)
        keep, masked_latents = self.prepare_mask_latents(
            image, mask, batch, height, width, dtype, device, generator, masked_image_latents
        )
        if do_cfg:
            keep, masked_latents = torch.cat([keep] * 2), torch.cat([masked_latents] * 2)

        # 6. Denoise
        step_kwargs = self.prepare_step_kwargs(scheduler, generator, eta)
        context = HookContext(base.unet, scheduler, timesteps, generator, latents.device, latents.dtype)
        for hook in hooks:
            hook.bind(context)
        before_step, after_noise_pred, after_step = (_overriding(hooks, point) for point in _STEP_POINTS)
        step_timesteps = self.prepare_step_timesteps(scheduler, timesteps)
        with self._hooks_installed(hooks, timesteps):
            for i, t in enumerate(tqdm(timesteps, disable=not self.progress, desc="denoising", leave=False)):
                for hook in before_step:
                    latents = hook.before_step(i, t, latents)
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = scheduler.scale_model_input(model_input, t)
                model_input = torch.cat([model_input, masked_latents, keep], dim=1)
                noise_pred = base.unet(
                    model_input, t, encoder_hidden_states=cond, cross_attention_kwargs=unet_kwargs
                ).sample
                if do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                for hook in after_noise_pred:
                    noise_pred = hook.after_noise_pred(i, t, noise_pred)
                latents = scheduler.step(noise_pred, step_timesteps[i], latents, **step_kwargs).prev_sample
                for hook in after_step:
                    latents = hook.after_step(i, t, latents)
            for hook in hooks:
                latents = hook.finish(latents)

        # 7. Decode
        return SamplerOutput(images=self.decode(latents), latents=latents)

    # ------------------------------------------------------------------ steps

    def check_inputs(self, image, mask, embeddings, num_inference_steps, guidance_scale):
        if image.ndim != 4 or image.shape[1] != 3:
            raise InvalidArgument(f"image must be (B, 3, H, W); got {tuple(image.shape)}")
        batch, _, height, width = image.shape
        factor = self.base.vae_scale_factor
        if height % factor or width % factor:
            raise InvalidArgument(f"height and width must be multiples of {factor}; got {height}x{width}")
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != image.shape[-2:]:
            raise InvalidArgument(f"mask must be (B, 1, {height}, {width}); got {tuple(mask.shape)}")
        if mask.shape[0] not in (1, batch) or embeddings.shape[0] not in (1, batch):
            raise InvalidArgument("mask and embeddings batch must be 1 or the image batch")
        if num_inference_steps < 1:
            raise InvalidArgument(f"num_inference_steps must be >= 1; got {num_inference_steps}")
        if guidance_scale < 0:
            raise InvalidArgument(f"guidance_scale must be >= 0; got {guidance_scale}")
        return batch, height, width

    def prepare_conditioning(self, embeddings, uncond, batch, do_cfg, device, dtype):
        cond = embeddings.to(device=device, dtype=dtype)
        if cond.shape[0] == 1 and batch > 1:
            cond = cond.repeat(batch, 1, 1)
        if not do_cfg:
            return cond
        if uncond is None:
            uncond = self.base.image_encoder.uncond_vector
        uncond = uncond.to(device=device, dtype=dtype)
        uncond = uncond.repeat(batch, 1, 1) if uncond.shape[0] == 1 else uncond
        return torch.cat([uncond, cond])

    def prepare_latents(self, batch, height, width, dtype, device, generator, latents, scheduler):
        factor = self.base.vae_scale_factor
        shape = (batch, self.base.vae.config.latent_channels, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * scheduler.init_noise_sigma

    def prepare_mask_latents(self, image, mask, batch, height, width, dtype, device, generator, masked_latents):
        """The UNet's extra channels: the KEEP mask (1 - edit mask, as Paint by Example was trained) at latent
        size (nearest), and the VAE latent of the image with the edit region zeroed."""
        factor = self.base.vae_scale_factor
        keep = 1.0 - (mask > 0.5).float()
        if masked_latents is None:
            masked = image.float() * keep
            masked_latents = self.encode(masked.to(device=device, dtype=dtype), generator)
        keep = F.interpolate(keep, size=(height // factor, width // factor)).to(device=device, dtype=dtype)
        if keep.shape[0] < batch:
            keep = keep.repeat(batch // keep.shape[0], 1, 1, 1)
        if masked_latents.shape[0] < batch:
            masked_latents = masked_latents.repeat(batch // masked_latents.shape[0], 1, 1, 1)
        return keep, masked_latents.to(device=device, dtype=dtype)

    def encode(self, image: torch.Tensor, generator=None, sample: bool = True) -> torch.Tensor:
        """VAE latents of images in [-1, 1], scaled by the VAE's scaling factor (in the VAE's dtype and device)."""
        vae = self.base.vae
        image = image.to(device=vae.device, dtype=vae.dtype)
        if isinstance(generator, list):
            dists = [vae.encode(image[i : i + 1]).latent_dist for i in range(image.shape[0])]
            out = torch.cat([d.sample(g) if sample else d.mode() for d, g in zip(dists, generator)])
        else:
            dist = vae.encode(image).latent_dist
            out = dist.sample(generator) if sample else dist.mode()
        return vae.config.scaling_factor * out

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.base.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)

    @staticmethod
    def prepare_step_timesteps(scheduler, timesteps):
        """The timesteps as Python numbers for `scheduler.step`, read once before the loop: a scheduler indexes its
        tables with the timestep, and indexing with a device tensor synchronises with the device at every step (the
        values and so the results are the same). Schedulers that track a step index start it at 0 instead of
        searching the timesteps for the first one (another per-call synchronisation)."""
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)
        return timesteps.tolist()

    @staticmethod
    def prepare_step_kwargs(scheduler, generator, eta):
        params = set(inspect.signature(scheduler.step).parameters)
        kwargs = {}
        if "eta" in params:
            kwargs["eta"] = eta
        if "generator" in params:
            kwargs["generator"] = generator
        return kwargs

    # ------------------------------------------------------------------ hooks

    @contextlib.contextmanager
    def _hooks_installed(self, hooks, timesteps):
        unet = self.base.unet
        started = []
        try:
            for hook in hooks:
                hook.begin(unet, timesteps)
                started.append(hook)
            yield
        finally:
            for hook in reversed(started):
                hook.end(unet)
