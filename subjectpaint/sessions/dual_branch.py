"""Dual-branch placement (ViMAEdit, shared/papers/vimaedit-dual-branch.txt), on the one sampler.

One batched sampler call of two rows that share the initial noise (and every stochastic noise):

- row 0, the SOURCE branch, reconstructs the room: no adapter, an empty edit mask (the UNet sees the whole room
  in its masked-image channels), conditioned on e_src = the image embedding of the room under the mask (the crop
  of the room at the mask's box through the image encoder). `source="inpaint"` (default) starts it from the
  shared noise; `source="inversion"` starts both branches from the room's DDIM inversion (sec. 5.1 runs ViMAEdit
  on inverted noise; here with the inpainting UNet's unmasked input, unguided, and the source row replayed
  unguided so that it retraces the inversion);
- row 1, the TARGET branch, places the subject: its adapter, the user's mask, the source condition e_src kept and
  the subject's image embedding added through an extra cross-attention path scaled by lambda (sec. 4.2, eq. 8:
  lambda softmax(Q K'^T / sqrt(d)) V', IP-Adapter's decoupled cross-attention; Paint by Example has no IP-Adapter
  weights, so K', V' are each layer's own to_k / to_v of the subject's embedding; `guidance="attention"`).
  `guidance="interpolate"` is the other reading: the one condition token e_tgt = e_src + lambda (e_subject -
  e_src) (eq. 7 with the subject's embedding standing in for the prompt difference).

Per step (the hook `DualBranchHook`, visible in the sampler's loop):

1. self-attention injection, source -> target (eq. 5) in the configured layers and step range;
2. editing-area grounding (sec. 4.3): an initial saliency s_c that carries location -- Paint by Example conditions
   on one token, so softmaxed cross-attention is identically 1; we use the target-vs-source noise-prediction
   difference (DiffEdit, "noise", default) or the pre-softmax cross-attention scores ("scores") -- upsampled to
   the self-attention grid and refined with each branch's self-attention Q: s_i = gamma s_{i-1} + (1-gamma) Q s_{i-1}
   (gamma 0.5, N = 5), s = max(s_src, s_tgt) (eq. 10), normalised and thresholded at delta = 0.5 inside the user's
   mask. As P2P's LocalBlend, the maps are those accumulated over the steps so far;
3. spatially adaptive variance (sec. 4.4, eqs. 11-12): a stochastic DDIM step (mu = 1) where s > delta' = 0.8,
   the deterministic one elsewhere, both branches with the same noise;
4. the target's latents outside the grounded mask are the source's (eq. 6).

Steps 3 and 4 start after `blend_start` (0.2) of the steps, as P2P's LocalBlend (start_blend) does: the maps of
the first, almost pure-noise steps locate nothing yet.

Defaults are the paper's (App. C) where it gives them, except the image-embedding guidance (interpolation at
lambda 1.0, measured best for product placement; the paper's eq. 8 form is `guidance="attention"`); the injection
range (decoder self-attention, first half of the steps, as Plug-and-Play), the blend start and the grid sizes
(self-attention at <= 32x32, saliency at <= 16x16 latent cells, the paper's P2 and P1 for SD's 64x64 latents)
are ours.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, field, replace

import PIL.Image
import torch
import torch.nn.functional as F

from ..attention import AddedCondition, AttentionControl, attention_layers, controlled_processors, level_for
from ..errors import InvalidArgument
from ..images import ImageInput, load_exemplar, load_image, load_mask, mask_to_pil, pil_to_tensor, tensor_to_pil
from ..masks import PasteBack, mask_box
from ..result import image_grid
from ..sampler import SamplerHook, make_scheduler
from ..workframe import WorkFrame

SALIENCY = ("noise", "scores")
GUIDANCE = ("attention", "interpolate")  # how the subject's embedding enters the target branch
SOURCES = ("inpaint", "inversion")  # how the source branch reconstructs the room


@dataclass(frozen=True)
class DualBranchSettings:
    """Every knob of the session; the defaults are ViMAEdit's (App. C) where the paper gives them."""

    steps: int | None = None  # None: the studio's default
    guidance_scale: float = 5.0
    scheduler: str = "ddim"
    seed: int | None = 0
    guidance: str = "interpolate"  # "interpolate": the one condition token e_tgt = e_src + lambda (e_subject -
    #   e_src); "attention": e_src kept + lambda x the subject through an added attention path (eq. 8, lambda 0.4
    #   in App. C). The defaults are the best measured for product placement (bench/session_quality.py), not the
    #   paper's: at 1.0 the product is there (exemplar-encoder similarity 78 vs 46 at 0.4 and 57 for the attention
    #   path at 1.0, 14 demo scenes) and the structure is better
    embedding_lambda: float = 1.0
    source: str = "inpaint"  # "inpaint": the room under an empty mask; "inversion": DDIM inversion of the room
    inject: bool = True  # self-attention injection source -> target (eq. 5)
    inject_blocks: tuple = ("up",)  # UNet blocks whose self-attention is injected
    inject_steps: tuple = (0.0, 0.5)  # fraction of the steps [start, end) with injection
    ground: bool = True  # grounding + the per-step latent blend of eq. 6
    blend_start: float = 0.2  # fraction of the steps before the first blend (P2P LocalBlend's start_blend)
    saliency: str = "noise"  # initial saliency: "noise" (target-vs-source eps) or "scores" (pre-softmax CA)
    gamma: float = 0.5  # eq. 9 trade-off
    iterations: int = 5  # eq. 9 N
    threshold: float = 0.5  # delta: grounded mask
    self_attention_side: int = 32  # P2: the finest self-attention grid with at most this side
    saliency_side: int = 16  # P1
    adaptive_variance: bool = True  # stochastic steps where s > variance_threshold (eqs. 11-12)
    variance_threshold: float = 0.8  # delta'
    variance_scale: float = 1.0  # mu_t
    paste_back: PasteBack | bool = True
    resolution: int | None = None
    progress: bool = False

    def __post_init__(self):
        def bad(msg):
            raise InvalidArgument(msg)

        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            bad(f"steps must be an int >= 1, got {self.steps!r}")
        for name in ("guidance_scale", "embedding_lambda", "gamma", "threshold", "variance_threshold", "variance_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"{name} must be a finite number, got {v!r}")
        if self.guidance_scale < 0:
            bad(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.embedding_lambda < 0:
            bad(f"embedding_lambda must be >= 0, got {self.embedding_lambda}")
        if not 0.0 <= self.gamma <= 1.0:
            bad(f"gamma must be in [0, 1], got {self.gamma}")
        if not isinstance(self.iterations, int) or isinstance(self.iterations, bool) or self.iterations < 0:
            bad(f"iterations must be an int >= 0, got {self.iterations!r}")
        if isinstance(self.blend_start, bool) or not isinstance(self.blend_start, (int, float)) \
                or not 0.0 <= self.blend_start <= 1.0:
            bad(f"blend_start must be in [0, 1], got {self.blend_start!r}")
        for name in ("threshold", "variance_threshold"):
            if not 0.0 < getattr(self, name) < 1.0:
                bad(f"{name} must be in (0, 1), got {getattr(self, name)}")
        if self.variance_scale < 0:
            bad(f"variance_scale must be >= 0, got {self.variance_scale}")
        if self.guidance not in GUIDANCE:
            bad(f"guidance must be one of {GUIDANCE}, got {self.guidance!r}")
        if self.source not in SOURCES:
            bad(f"source must be one of {SOURCES}, got {self.source!r}")
        if self.source == "inversion" and str(self.scheduler).lower() != "ddim":
            bad("source='inversion' inverts DDIM: use scheduler='ddim'")
        if self.saliency not in SALIENCY:
            bad(f"saliency must be one of {SALIENCY}, got {self.saliency!r}")
        lo_hi = tuple(self.inject_steps)
        if len(lo_hi) != 2 or not 0.0 <= lo_hi[0] <= lo_hi[1] <= 1.0:
            bad(f"inject_steps must be (start, end) with 0 <= start <= end <= 1, got {self.inject_steps!r}")
        blocks = (self.inject_blocks,) if isinstance(self.inject_blocks, str) else tuple(self.inject_blocks)
        if not blocks or any(b not in ("down", "mid", "up") for b in blocks):
            bad(f"inject_blocks must name UNet blocks among 'down', 'mid', 'up', got {self.inject_blocks!r}")
        for name in ("self_attention_side", "saliency_side"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                bad(f"{name} must be an int >= 1, got {v!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad(f"seed must be a non-negative int or None, got {self.seed!r}")
        if self.adaptive_variance and str(self.scheduler).lower() != "ddim":
            bad("adaptive variance is DDIM's eq. 12: use scheduler='ddim' or adaptive_variance=False")


# ------------------------------------------------------------------------------------------ grounding


def refine(s: torch.Tensor, Q: torch.Tensor, gamma: float = 0.5, iterations: int = 5) -> torch.Tensor:
    """ViMAEdit eq. 9: s_i = gamma s_{i-1} + (1 - gamma) Q s_{i-1}. s: (..., N), Q: (..., N, N) row-stochastic."""
    for _ in range(iterations):
        s = gamma * s + (1.0 - gamma) * (Q @ s.unsqueeze(-1)).squeeze(-1)
    return s


def normalise(s: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """Min-max to [0, 1] over the positions `inside` (same shape, bool); 0 outside."""
    vals = s[inside]
    if vals.numel() == 0:
        return torch.zeros_like(s)
    lo, hi = vals.min(), vals.max()
    out = (s - lo) / (hi - lo).clamp_min(1e-12)
    return torch.where(inside, out.clamp(0, 1), torch.zeros_like(out))


def grid_at(h: int, w: int, level: int) -> tuple[int, int]:
    for _ in range(level):  # diffusers' stride-2 downsampling (padding 1): ceil
        h, w = -(-h // 2), -(-w // 2)
    return h, w


class DualBranchHook(SamplerHook):
    """Injection, grounding, adaptive variance and the source blend of one dual-branch call (rows [src, tgt])."""

    def __init__(self, settings: DualBranchSettings, user_mask: torch.Tensor, do_cfg: bool, scheduler_config,
                 noise_seed: int, subject_embedding: torch.Tensor | None = None):
        self.s = settings
        # the added attention path (eq. 8): the subject's embedding on the target's conditional row only (the
        # unconditional rows get none, as IP-Adapter's zero negative image embedding)
        self.added = None
        if subject_embedding is not None:
            self.added = AddedCondition(subject_embedding.reshape(1, -1, subject_embedding.shape[-1]),
                                        rows=[3] if do_cfg else [1], scale=settings.embedding_lambda)
        self.user_mask = user_mask  # (1, 1, h, w) latent-size, 1 = editable
        self.do_cfg = do_cfg
        self.scheduler_config = scheduler_config
        self.noise_generator = torch.Generator().manual_seed(noise_seed)
        # [src, tgt] -> with CFG [src_u, tgt_u, src_c, tgt_c]: inject into both target rows, capture cond rows
        self.control = AttentionControl(
            pairs=[(0, 1), (2, 3)] if do_cfg else [(0, 1)], capture_rows=[2, 3] if do_cfg else [0, 1]
        )
        self.saliency_sum: torch.Tensor | None = None  # (2, P1) accumulated initial saliency [src, tgt]
        self.q_sum: torch.Tensor | None = None  # (2, P2, P2) accumulated self-attention [src, tgt]
        self.n_seen = self.q_seen = 0
        self.saliency: torch.Tensor | None = None  # (1, 1, h, w) final saliency at latent size
        self.masks: list[torch.Tensor] = []  # grounded latent mask per step
        self._saved = None

    # -------------------------------------------------------------- sampler hook points

    def begin(self, unet, timesteps):
        s = self.s
        h, w = self.user_mask.shape[-2:]
        n_levels = len(unet.config.block_out_channels)
        self.n_steps = len(timesteps)
        self.self_level = level_for(max(h, w), s.self_attention_side, n_levels)
        self.score_level = level_for(max(h, w), s.saliency_side, n_levels)
        self.p2 = grid_at(h, w, self.self_level)
        self.p1 = grid_at(h, w, self.score_level)
        # the refinement runs among the self-attention positions inside the user's mask (eq. 9 restricted to it)
        inside2 = F.interpolate(self.user_mask, size=self.p2, mode="area").flatten() > 0
        self.index = torch.nonzero(inside2).flatten()
        self.control.queries = {self.p2[0] * self.p2[1]: self.index}
        self.start = min(math.ceil(s.blend_start * self.n_steps), self.n_steps - 1)
        capture = attention_layers(unet, "self", levels={self.self_level}) if s.ground else []
        if s.ground and s.saliency == "scores":
            capture += attention_layers(unet, "cross", levels={self.score_level})
        inject = attention_layers(unet, "self", blocks=s.inject_blocks) if s.inject else []
        if s.ground and not attention_layers(unet, "self", levels={self.self_level}):
            raise InvalidArgument(f"this UNet has no self-attention at the {self.p2[0]}x{self.p2[1]} grid")
        added_layers = attention_layers(unet, "cross") if self.added is not None else []
        self._saved = unet.attn_processors
        unet.set_attn_processor(controlled_processors(unet, self.control, capture=capture, inject=inject,
                                                      added=self.added, added_layers=added_layers))
        if s.adaptive_variance:
            self.ddim = make_scheduler("ddim", self.scheduler_config)
            self.ddim.set_timesteps(self.n_steps, device=self.user_mask.device)

    def before_step(self, i, t, latents):
        self.z_t = latents
        c = self.control
        c.reset()
        # the first steps' maps locate nothing yet: they are neither refined nor used (P2P's start_blend); the
        # initial saliency from the noise difference is accumulated from the first step, the maps from `start`
        c.recording = self.s.ground and (i >= self.start or self.s.saliency == "scores")
        lo, hi = self.s.inject_steps
        c.injecting = self.s.inject and lo * self.n_steps <= i < hi * self.n_steps
        return latents

    def after_noise_pred(self, i, t, noise_pred):
        self.eps = noise_pred
        return noise_pred

    def after_step(self, i, t, latents):
        s = self.s
        if not s.ground:
            return latents
        self.accumulate_saliency()
        if i < self.start:
            return latents
        saliency = self.ground_step()
        mask = ((saliency > s.threshold) & (self.user_mask > 0)).to(latents.dtype)
        self.masks.append(mask)
        if s.adaptive_variance and s.variance_scale > 0:
            critical = (saliency > s.variance_threshold) & (self.user_mask > 0)
            if bool(critical.any()):
                noise = torch.randn((1, *latents.shape[1:]), generator=self.noise_generator).to(latents)
                stochastic = self.ddim.step(
                    self.eps, t, self.z_t, eta=s.variance_scale, variance_noise=noise.expand_as(latents)
                ).prev_sample
                latents = torch.where(critical, stochastic, latents)
        target = mask * latents[1:2] + (1 - mask) * latents[0:1]  # eq. 6
        return torch.cat([latents[0:1], target])

    def end(self, unet):
        if self._saved is not None:
            unet.set_attn_processor(self._saved)
            self._saved = None
        self.control.reset()

    # -------------------------------------------------------------- grounding

    def accumulate_saliency(self) -> None:
        """Add this step's initial saliency s_c (P1 grid, [src, tgt], each normalised inside the user's mask)."""
        inside1 = F.interpolate(self.user_mask, size=self.p1, mode="area") > 0
        if self.s.saliency == "noise":
            diff = (self.eps[1:2] - self.eps[0:1]).abs().mean(1, keepdim=True).float()  # (1, 1, h, w)
            diff = F.interpolate(diff, size=self.p1, mode="area")
            s_c = normalise(diff, inside1).expand(2, 1, *self.p1)
        else:
            scores = self.control.mean(self.control.scores, self.p1[0] * self.p1[1])  # (2, N, T)
            scores = scores.mean(-1).reshape(2, 1, *self.p1)
            s_c = torch.cat([normalise(scores[k : k + 1], inside1) for k in range(2)])
        self.saliency_sum = s_c if self.saliency_sum is None else self.saliency_sum + s_c
        self.n_seen += 1

    def ground_step(self) -> torch.Tensor:
        """Refine the accumulated saliency with the accumulated self-attention (eq. 9, positions inside the
        user's mask; outside it the saliency is held at 0) and combine the branches (eq. 10).
        Returns s, (1, 1, h, w) in [0, 1]."""
        h, w = self.user_mask.shape[-2:]
        p2 = self.p2
        Q = self.control.mean(self.control.self_maps, p2[0] * p2[1])  # (2, n, n) among `index`
        self.q_sum = Q if self.q_sum is None else self.q_sum + Q
        self.q_seen += 1
        s0 = F.interpolate(self.saliency_sum / self.n_seen, size=p2, mode="bilinear", align_corners=False)
        s0 = s0.flatten(1)[:, self.index]  # (2, n)
        refined = refine(s0, self.q_sum / self.q_seen, self.s.gamma, self.s.iterations)
        combined = torch.zeros(p2[0] * p2[1], dtype=refined.dtype, device=refined.device)
        combined[self.index] = refined.max(0).values  # eq. 10
        combined = F.interpolate(combined.reshape(1, 1, *p2), size=(h, w), mode="bilinear", align_corners=False)
        self.saliency = normalise(combined, self.user_mask > 0)
        return self.saliency


# ------------------------------------------------------------------------------------------ inversion


@torch.no_grad()
def invert(unet, latents: torch.Tensor, masked_latents: torch.Tensor, embedding: torch.Tensor, steps: int,
           scheduler_config) -> torch.Tensor:
    """DDIM inversion of clean `latents` (1, C, h, w) to the first timestep of a `steps`-step DDIM sampling, with
    the inpainting UNet's unmasked input (the room's `masked_latents`, keep mask 1), conditioned on `embedding`
    (1, T, D), unguided (diffusers' `DDIMInverseScheduler`, as its DiffEdit pipeline inverts)."""
    from diffusers import DDIMInverseScheduler

    known = set(inspect.signature(DDIMInverseScheduler.__init__).parameters)  # e.g. not PNDM's skip_prk_steps
    config = {k: v for k, v in scheduler_config.items() if k in known}
    inverse = DDIMInverseScheduler.from_config({**config, "clip_sample": False})
    inverse.set_timesteps(steps, device=latents.device)
    keep = torch.ones_like(latents[:, :1])
    for t in inverse.timesteps:
        x = torch.cat([inverse.scale_model_input(latents, t), masked_latents, keep], dim=1)
        eps = unet(x, t, encoder_hidden_states=embedding).sample
        latents = inverse.step(eps, t, latents).prev_sample
    return latents


# ------------------------------------------------------------------------------------------ result


@dataclass
class DualBranchPlacement:
    """`image`: the target branch pasted into the room; `source`: the source branch's reconstruction of the
    room; `grounded_mask`: the editing area the session grounded (L, room size, white = edited);
    `branches`: the decoded (2, 3, h, w) [source, target] at the work size, in [0, 1]."""

    image: PIL.Image.Image
    room: PIL.Image.Image
    mask: PIL.Image.Image
    exemplar: PIL.Image.Image
    generated: PIL.Image.Image
    source: PIL.Image.Image
    grounded_mask: PIL.Image.Image | None
    saliency: torch.Tensor | None  # (h, w) latent-size saliency in [0, 1]
    branches: torch.Tensor
    latents: torch.Tensor  # (2, C, h/8, w/8) final [source, target] latents
    seed: int
    info: dict = field(default_factory=dict)

    def grid(self, height: int = 256) -> PIL.Image.Image:
        """room | mask | exemplar | source | grounded mask | result."""
        panels = [("room", self.room), ("mask", self.mask), ("exemplar", self.exemplar), ("source", self.source)]
        if self.grounded_mask is not None:
            panels.append(("grounded", self.grounded_mask))
        panels.append(("result", self.image))
        return image_grid([panels], height=height)

    def save(self, path):
        from ..result import save_image

        return save_image(self.image, path)


# ------------------------------------------------------------------------------------------ session


class DualBranchSession:
    """`studio.dual_branch(**defaults).place(subject, room, mask, **overrides)`."""

    def __init__(self, studio, **defaults):
        self.studio = studio
        try:
            self.settings = DualBranchSettings(**defaults)
        except TypeError as exc:
            raise InvalidArgument(f"unknown dual-branch setting: {exc}") from None

    def place(self, subject, room: ImageInput, mask: ImageInput, **overrides) -> DualBranchPlacement:
        """Place `subject` (a Subject, a registry record or "name@version"; or a plain exemplar image: no adapter)
        into `room` where `mask` is white."""
        try:
            s = replace(self.settings, **overrides)
        except TypeError as exc:
            raise InvalidArgument(f"unknown dual-branch setting: {exc}") from None
        studio, base = self.studio, self.studio.base
        # 1. Check inputs (nothing runs on bad input)
        room_pil = load_image(room, "room")
        mask_t = load_mask(mask, room_pil.size)
        resolved = studio.resolve(subject)  # the exemplar and what carries the adapter, as every entry point
        exemplar = load_exemplar(resolved.exemplar)
        steps = s.steps or studio.default_steps
        seed = s.seed if s.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)))
        frame = WorkFrame.for_base(room_pil.size, base, s.resolution)
        image, work_mask = frame.to_work(pil_to_tensor(room_pil), mask_t)
        image, work_mask = image.to(base.device), work_mask.to(base.device)

        # 2. Embeddings: e_src from the room under the mask; the subject's through the added path (eq. 8) or the
        #    condition token interpolated toward it
        x0, y0, x1, y1 = mask_box(mask_t)
        e_subject, uncond = base.encode_exemplar([exemplar])  # one at a time: batching rounds differently
        e_src, _ = base.encode_exemplar([room_pil.crop((x0, y0, x1, y1))])
        e_subject, e_src = e_subject[0], e_src[0]
        if s.guidance == "interpolate":
            e_tgt, added = torch.lerp(e_src, e_subject, s.embedding_lambda), None  # exactly e_subject at lambda 1
        else:
            e_tgt, added = e_src, e_subject
        embeddings = torch.stack([e_src, e_tgt])

        # 3. One batched call: row 0 source (empty mask, no adapter), row 1 target (user mask, adapter). Both
        #    start from the same noise, or from the room's DDIM inversion (the source row then runs unguided, as
        #    it was inverted: its unconditional embedding is its condition)
        images = torch.cat([image, image])
        masks = torch.cat([torch.zeros_like(work_mask), work_mask])
        factor = base.vae_scale_factor
        latent_mask = F.interpolate(work_mask, size=(image.shape[-2] // factor, image.shape[-1] // factor))
        hook = DualBranchHook(s, latent_mask, s.guidance_scale > 1.0, base.scheduler.config, noise_seed=seed + 7919,
                              subject_embedding=added)
        generators = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
        latents = None
        if s.source == "inversion":
            masked_src = studio.sampler.encode(image, [torch.Generator().manual_seed(seed)])  # row 0's, as the sampler
            z0 = studio.sampler.encode(image, sample=False)
            z_T = invert(base.unet, z0, masked_src, e_src[None], steps, base.scheduler.config)
            latents = torch.cat([z_T, z_T])
            uncond = torch.stack([e_src, uncond[0]])
        studio.sampler.progress = s.progress
        with studio.subjects([None, resolved.subject]):
            out = studio.sampler(
                images, masks, embeddings, uncond=uncond, num_inference_steps=steps,
                guidance_scale=s.guidance_scale, scheduler=s.scheduler, generator=generators, latents=latents,
                hooks=[hook],
            )

        # 4. Back to the room: source, target, grounded mask, paste-back. The target row is decoded alone: a
        #    batched VAE decode rounds differently (~1e-6) from the single-row decode of plain inpainting
        branches = torch.cat([out.images[0:1], studio.sampler.decode(out.latents[1:2])])
        source = tensor_to_pil(frame.from_work(branches[0:1])[0])
        generated = tensor_to_pil(frame.from_work(branches[1:2])[0])
        grounded = saliency = None
        if hook.saliency is not None:
            saliency = hook.saliency[0, 0].cpu()
            size = image.shape[-2:]
            pixel = F.interpolate(hook.saliency, size=size, mode="bilinear", align_corners=False)
            pixel = ((pixel > s.threshold) & (work_mask > 0)).float()
            pixel = frame.from_work(pixel.expand(-1, 3, -1, -1))[0, 0].cpu()
            grounded = mask_to_pil((pixel > 0.5).float())
        paste = s.paste_back if isinstance(s.paste_back, PasteBack) else PasteBack(enabled=bool(s.paste_back))
        info = {k: v for k, v in asdict(s).items() if k not in ("paste_back", "progress")}
        info.update(steps=steps, subject=resolved.name, grounded_steps=len(hook.masks))
        return DualBranchPlacement(
            image=paste.apply(generated, room_pil, mask_t), room=room_pil, mask=mask_to_pil(mask_t),
            exemplar=exemplar, generated=generated, source=source, grounded_mask=grounded, saliency=saliency,
            branches=branches.cpu(), latents=out.latents.cpu(), seed=seed, info=info,
        )

    def __repr__(self) -> str:
        return f"DualBranchSession({self.settings})"
