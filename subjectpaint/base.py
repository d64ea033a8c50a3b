"""ExemplarInpainter: the Paint-by-Example base (shared/papers/paint-by-example.txt).

VAE + 9-channel UNet (noisy latent 4 + masked-image latent 4 + keep-mask 1) + image encoder
(CLIP CLS -> mapper -> LayerNorm -> Linear, one token, plus the learned unconditional vector) + scheduler.
All networks are diffusers' / transformers' own classes; this module only loads, builds and describes them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import diffusers
from diffusers import AutoencoderKL, PNDMScheduler, SchedulerMixin, UNet2DConditionModel
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
from transformers import CLIPImageProcessor, CLIPVisionConfig

from .errors import InvalidArgument, WeightsNotFound

HUB_ID = "Fantasy-Studio/Paint-by-Example"
DEMO_DIR = Path(__file__).parent / "demo" / "weights"
COMPONENTS = ("vae", "unet", "image_encoder", "scheduler", "feature_extractor")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the UNet attention projections a subject's LoRA adapts
# `fingerprint()` of the shipped demo weights: the "demo" training preset is for this base only
# (tests/test_train_recipe.py checks it against the weights).
DEMO_FINGERPRINT = "f85726da4c1732b756ab9a90f73b6b8b085fb6d7df6bf78995ca21561497fe74"


@dataclass
class ExemplarInpainter:
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    image_encoder: PaintByExampleImageEncoder
    scheduler: object  # any diffusers scheduler; the sampler copies it per call
    feature_extractor: CLIPImageProcessor
    name: str = "custom"

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(
        cls,
        id_or_dir: str | os.PathLike = HUB_ID,
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
    ) -> "ExemplarInpainter":
        """Load the diffusers Paint-by-Example layout from a hub id or a local directory (safetensors only)."""
        source = str(id_or_dir)
        local = Path(source).expanduser()
        if local.is_dir():
            source = str(local)
            missing = [c for c in COMPONENTS if not (local / c).is_dir()]
            if missing:
                raise WeightsNotFound(f"{local} is not a Paint-by-Example directory: missing {', '.join(missing)}/")
            local_files_only = True
        kw = dict(local_files_only=bool(local_files_only))
        try:
            vae = AutoencoderKL.from_pretrained(source, subfolder="vae", use_safetensors=True, torch_dtype=torch_dtype, **kw)
            unet = UNet2DConditionModel.from_pretrained(
                source, subfolder="unet", use_safetensors=True, torch_dtype=torch_dtype, **kw
            )
            # the encoder's config is a CLIPVisionConfig ("clip_vision_model"); read as such, not as the CLIPConfig
            # the class declares (transformers warns about the type mismatch otherwise)
            clip = CLIPVisionConfig.from_pretrained(source, subfolder="image_encoder", **kw)
            encoder = PaintByExampleImageEncoder.from_pretrained(
                source, subfolder="image_encoder", config=clip, use_safetensors=True, dtype=torch_dtype, **kw
            )
            scheduler = load_scheduler(source, **kw)
            features = CLIPImageProcessor.from_pretrained(source, subfolder="feature_extractor", **kw)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise WeightsNotFound(
                f"could not load a Paint-by-Example base from {source!r} (safetensors only; "
                f"a hub id needs network access): {exc}"
            ) from None
        base = cls(vae, unet, encoder, scheduler, features, name=str(id_or_dir))
        return base.to(device=device, dtype=torch_dtype)

    @classmethod
    def demo(cls, device: str | torch.device = "cpu") -> "ExemplarInpainter":
        """The small base trained by this project on procedural scenes, shipped inside the package."""
        if not (DEMO_DIR / "unet").is_dir():
            raise WeightsNotFound(
                f"the demo weights are not in {DEMO_DIR}; train them with `python -m subjectpaint.demo.train`"
            )
        base = cls.from_pretrained(DEMO_DIR, device=device)
        base.name = "subjectpaint-demo"
        return base

    @classmethod
    def tiny(cls, seed: int = 0, image_size: int = 32) -> "ExemplarInpainter":
        """A deterministic random tiny base for tests (same architecture as Paint by Example, shrunk)."""
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=image_size // 2,
            in_channels=9,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=image_size,
        )
        clip = CLIPVisionConfig(
            hidden_size=32,
            projection_dim=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=5,
            image_size=image_size,
            patch_size=4,
        )
        encoder = PaintByExampleImageEncoder(clip, proj_size=32)
        scheduler = pbe_scheduler()
        features = CLIPImageProcessor(crop_size=image_size, size=image_size)
        base = cls(vae, unet, encoder, scheduler, features, name=f"tiny-{seed}")
        return base.to(device="cpu", dtype=torch.float32)

    # ------------------------------------------------------------------ description

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The side the UNet was built for, in pixels (512 for Paint by Example)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    def to(self, device=None, dtype=None) -> "ExemplarInpainter":
        for module in (self.vae, self.unet, self.image_encoder):
            if device is not None:
                module.to(device=device)
            if dtype is not None and module.dtype != dtype:
                module.to(dtype=dtype)
            module.eval().requires_grad_(False)
        self._fingerprint = None
        return self

    def fingerprint(self) -> str:
        """sha256 over the UNet's parameter names, shapes and a strided sample of values (as float16).

        Stable across devices, across fp32/fp16 loads of the same weights and across processes; adapters are
        bound to it. Changing any sampled value, a shape or a name changes it.
        """
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        digest = hashlib.sha256(b"subjectpaint-base-v1")
        digest.update(str(self.unet.config.in_channels).encode())
        for name, param in sorted(self.unet.state_dict().items()):
            flat = param.detach().reshape(-1)
            step = max(1, flat.numel() // 64)
            sample = flat[::step][:64].to(device="cpu", dtype=torch.float16)
            digest.update(name.encode())
            digest.update(str(tuple(param.shape)).encode())
            digest.update(sample.numpy().tobytes())
        self._fingerprint = digest.hexdigest()
        return self._fingerprint

    # ------------------------------------------------------------------ the base's own steps

    @torch.no_grad()
    def encode_exemplar(self, exemplars) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images (or CLIP pixel_values) -> (embeddings (B, 1, D), learned unconditional vector (1, 1, D))."""
        dtype = next(self.image_encoder.parameters()).dtype
        if not isinstance(exemplars, torch.Tensor):
            exemplars = self.feature_extractor(images=exemplars, return_tensors="pt").pixel_values
        pixels = exemplars.to(device=self.device, dtype=dtype)
        embeddings, uncond = self.image_encoder(pixels, return_uncond_vector=True)
        return embeddings, uncond

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the diffusers Paint-by-Example layout (safetensors)."""
        directory = Path(directory)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.image_encoder.save_pretrained(directory / "image_encoder", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")
        self.feature_extractor.save_pretrained(directory / "feature_extractor")

    def to_pipeline(self):
        """The diffusers PaintByExamplePipeline around the same modules (the parity and speed peer)."""
        from diffusers import PaintByExamplePipeline

        pipe = PaintByExamplePipeline(
            vae=self.vae,
            image_encoder=self.image_encoder,
            unet=self.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=self.feature_extractor,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def load_scheduler(source: str, subfolder: str = "scheduler", **kw):
    """The scheduler a diffusers directory (or hub id) names in `scheduler_config.json` (`_class_name`), with its
    whole config, as `DiffusionPipeline.from_pretrained` loads it."""
    config = PNDMScheduler.load_config(source, subfolder=subfolder, **kw)  # any scheduler class reads the raw file
    name = config.get("_class_name", "PNDMScheduler")
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, SchedulerMixin)):
        raise InvalidArgument(f"{source}/{subfolder}: {name!r} is not a diffusers scheduler")
    return cls.from_config(config)


def pbe_scheduler():
    """The scheduler configuration Paint by Example ships (PNDM, scaled-linear betas)."""
    return PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def denoising_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What a UNet sampled under `noise_scheduler`'s config learns to predict from `add_noise(latents, noise, t)`:
    the noise (Paint by Example), v (the demo base) or the clean latents."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, t)
    if kind == "sample":
        return latents
    raise InvalidArgument(f"unknown prediction_type {kind!r} in the scheduler config; one of {PREDICTION_TYPES}")
