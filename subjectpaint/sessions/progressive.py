"""Progressive session: PIXELS (shared/papers/pixels-progressive-editing.txt, Algorithm 1) on the one sampler.

    session = studio.progressive()                  # defaults for every placement: steps, seed, schedule, ...
    out = session.place(mug, room, edit_map)        # builds on the session's current image
    out = session.place(lamp, None, other_map)      # (None: the current image)
    out = session.place_many([(vase, m1), (clock, m2)])   # several subjects, ONE denoising pass
    session.undo(); out.grid().save("steps.png")

Edit maps. Our convention is the SDK's mask convention: 0 = keep, 1 = fully regenerate, values between =
partial edit. The paper's map mu is the other way round (mu > threshold = copy the noised source: lighter =
kept longer), so mu = 1 - edit_map. Any size (scaled to the room), binary or soft; downsampled to the latent
grid as the authors' code does (bilinear, no antialiasing: torchvision Resize(antialias=None)).

Algorithm 1 with N sampler steps i = 0..N-1 is the paper's loop t = T..0 with T = N - 1 (i = T - t):
at step i a latent pixel is copied from the source noised to the current timestep iff mu_d > threshold(i),
threshold(i) = schedule((T - t) / T). Thresholds never decrease, so each pixel is held for a prefix of the
steps: its start step is #{i : mu_d > threshold(i)}, which is exactly the sampler's `LatentStart` (one loop,
no second one). At step 0 (lines 8/10) a pixel not held starts from z_2^T, the surgical latent noised to
the first step with the prior's noise: at every strength, also the maximum (t_ds^max = T, the default), where
the noised latent still keeps a small signal of the exemplar (sqrt(alpha_bar) = 0.076 at DDIM's t = 981,
the first of 50 steps). `init="noise"` starts those pixels from the prior sample itself instead (noise *
init_noise_sigma, as diffusers does for strength 1), at the maximum strength only: an all-ones map then equals
plain exemplar inpainting. `strength` < 1 starts the paper's loop later (t_ds^max = the last round(strength * N) steps):
every pixel is held to the surgical latent until then (z_2 where it starts free, z_1 elsewhere).

Schedules (the authors' code, amazon-science/PIXELS, diffusion_pipe.py, with s = (T - t) / T = i / T):
linear s; cubic s^3; log log1p(i) / log1p(T); sigmoid sigmoid(6 s - 3); or a callable s -> threshold.

Latent surgery (lines 5, 8, 10): z_2 is the VAE latent of the room with each subject's best exemplar crop
fitted (aspect kept, centred) into its mask's box, or a box the user gives.

Several subjects (the appendix's nested lines 10/15): the combined map is the union (max of the edit maps,
i.e. min of the paper's mu), one exemplar token and one adapter per region, applied per region in one pass
(`regions.py`). With `regional_norm` (the default) the UNet's GroupNorm layers take their statistics per region as
well, so each region is normalised about as it is when its subject is placed alone (`RegionalGroupNorm`).

Paste-back: pixels whose edit map is 0 are the input's own, bit for bit (`PasteBack` on the map's support,
not grown by default: `paste_back=PasteBack(dilate=..., feather=...)` grows it as Studio.inpaint does;
`paste_back="map"` blends by the map itself, generated * m + room * (1 - m)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..choices import DEFAULT_SCHEDULE, DEFAULT_SCHEDULER, SCHEDULES
from ..errors import InvalidArgument, InvalidMask
from ..images import ImageInput, load_exemplar, load_image, load_mask, pil_to_tensor, tensor_to_pil
from ..masks import PasteBack, mask_box
from ..result import Placement, image_grid
from ..sampler import AttentionProcessors, LatentStart
from ..workframe import WorkFrame, encode_exemplars
from .regions import RegionalGroupNorm, RegionWeights, regional_processors

INITS = ("surgical", "noise")  # where pixels free at the first step start: z_2 noised (Algorithm 1), or the prior

# ------------------------------------------------------------------------------------------- schedules


def thresholds(schedule: str | Callable, n_steps: int) -> torch.Tensor:
    """(n_steps,) thresholds for steps i = 0..n_steps-1: schedule(s) with s = i / T, T = n_steps - 1."""
    if n_steps < 1:
        raise InvalidArgument(f"steps must be >= 1; got {n_steps}")
    T = n_steps - 1
    s = torch.arange(n_steps, dtype=torch.float32) / max(T, 1)
    if callable(schedule):
        fn = schedule
        out = fn(s)
    elif isinstance(schedule, str) and schedule.lower() in SCHEDULES:
        out = SCHEDULES[schedule.lower()](s, max(T, 1))
    else:
        raise InvalidArgument(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or a callable")
    out = torch.as_tensor(out, dtype=torch.float32)
    if out.shape != s.shape:
        raise InvalidArgument(f"a schedule must return one threshold per step ({n_steps}); got {tuple(out.shape)}")
    if not torch.isfinite(out).all():
        raise InvalidArgument("schedule thresholds must be finite")
    if (out[1:] < out[:-1]).any():
        raise InvalidArgument("schedule thresholds must never decrease (a released pixel is never held again)")
    return out


def start_steps(mu: torch.Tensor, thr: torch.Tensor) -> torch.Tensor:
    """Per latent pixel, the number of leading steps it is held to the source: #{i : mu > thr[i]}."""
    return (mu.unsqueeze(0) > thr.reshape(-1, *([1] * mu.ndim))).sum(0)


def downsample_map(edit_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., H, W) -> (..., h, w), bilinear without antialiasing (the authors' torchvision Resize)."""
    shape = edit_map.shape
    x = edit_map.reshape(-1, 1, *shape[-2:]).float()
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=False)
    return x.reshape(*shape[:-2], *size)


def edit_map(mask: ImageInput, size: tuple[int, int] | None = None, grow: int = 0, blur: int = 0,
             inside: bool = False) -> torch.Tensor:
    """A soft edit map (H, W) in [0, 1] from a mask: grown by `grow` px (Chebyshev) then box-blurred outward by
    `blur` px, keeping the mask itself at 1 (the paper's "growing and blurring" of binary masks).

    `inside=True` puts the ramp inside the mask instead: 1 from `blur` px in, falling linearly towards the mask's
    edge (1 / (blur + 1) on its outermost pixels), 0 outside: nothing outside the mask is touched and the pixels
    near its edge are held to the room longer (`grow` is ignored)."""
    m = load_mask(mask, size or _size_of(mask), binary=False)
    core = (m > 0).float()[None, None]
    if inside:
        depth, inner = core, core
        for _ in range(blur):  # depth: 1 on the mask's edge pixels, +1 per px further in (the image border is no edge)
            inner = 1 - F.max_pool2d(1 - inner, 3, stride=1, padding=1)
            depth = depth + inner
        return torch.minimum(depth[0, 0] / (blur + 1), m)
    if grow:
        core = F.max_pool2d(core, 2 * grow + 1, stride=1, padding=grow)
    soft = core
    if blur:
        ramp = core
        out = core.clone()
        for j in range(1, blur + 1):  # a linear ramp from 1 at the grown edge to 0 at `blur` px out
            ramp = F.max_pool2d(ramp, 3, stride=1, padding=1)
            out = torch.maximum(out, ramp * (1 - j / (blur + 1)))
        soft = out
    return torch.maximum(soft[0, 0], m)


def _size_of(mask) -> tuple[int, int]:
    if hasattr(mask, "shape"):  # tensor / array (H, W)
        return int(mask.shape[-1]), int(mask.shape[-2])
    if isinstance(mask, PIL.Image.Image):
        return mask.size
    try:
        with PIL.Image.open(mask) as im:
            return im.size
    except (OSError, TypeError, ValueError) as exc:
        raise InvalidMask(f"cannot read the mask: {exc}") from None


class HeldStart(LatentStart):
    """`LatentStart` as Algorithm 1 runs it:

    - line 16 denoises every pixel at t = 0, so a pixel held at every step (the sigmoid schedule, one step)
      keeps that last denoised value instead of snapping to the clean source;
    - the source is noised with the prior's own noise (the sampler's first draw from `seed`, as diffusers'
      img2img / inpaint pipelines noise their image), regenerated when needed instead of kept: the map's state
      through the loop is then the source latents and the uint8 start steps only (memory overhead)."""

    def __init__(self, start_step: torch.Tensor, source: torch.Tensor, seed: int):
        super().__init__(start_step=start_step, source=source, seed=int(seed))

    def finish(self, latents):
        self.source = None  # done: free it before the decoder runs
        return latents


# ------------------------------------------------------------------------------------------- results


@dataclass
class Step:
    """One placement of the session: what it started from, the edit map, the subjects, the result."""

    before: PIL.Image.Image
    edit_map: PIL.Image.Image
    surgical: PIL.Image.Image
    exemplars: list
    names: list
    image: PIL.Image.Image


@dataclass
class ProgressivePlacement(Placement):
    """A `Placement` plus the edit map, the surgical image and the session's steps so far (for the grid).
    `images` is the decoder output (1, 3, H, W) in [0, 1] at the room's size, before paste-back."""

    edit_map: PIL.Image.Image | None = None
    surgical: PIL.Image.Image | None = None
    images: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    steps: list = field(default_factory=list)

    def grid(self, height: int = 128) -> PIL.Image.Image:
        """One row per step: before | edit map | exemplar(s) | surgery | after."""
        return steps_grid(self.steps or [], height)


def steps_grid(steps: list, height: int = 128) -> PIL.Image.Image:
    rows = []
    for n, st in enumerate(steps, 1):
        row = [(f"{n}: before", st.before), ("edit map", st.edit_map)]
        row += [(str(name or "exemplar")[:14], ex) for name, ex in zip(st.names, st.exemplars)]
        row += [("surgery", st.surgical), (f"{n}: after", st.image)]
        rows.append(row)
    if not rows:
        raise InvalidArgument("no steps to show yet")
    return image_grid(rows, height=height)


# ------------------------------------------------------------------------------------------- session


class ProgressiveSession:
    """PIXELS placements on a Studio's base; each placement builds on the session's current image."""

    def __init__(
        self,
        studio,
        *,
        room: ImageInput | None = None,
        schedule: str | Callable = DEFAULT_SCHEDULE,
        strength: float = 1.0,
        steps: int | None = None,
        guidance_scale: float = 5.0,
        scheduler: str | None = None,
        seed: int | None = None,
        paste_back: PasteBack | bool | str = True,
        resolution: int | None = None,
        regional_norm: bool = True,
        init: str = "surgical",
        progress: bool = True,
    ):
        self.studio = studio
        self.defaults = dict(schedule=schedule, strength=strength, steps=steps, guidance_scale=guidance_scale,
                             scheduler=scheduler, seed=seed, paste_back=paste_back, resolution=resolution,
                             regional_norm=regional_norm, init=init, progress=progress)
        self._check_options(self.defaults)
        self.room: PIL.Image.Image | None = None  # the image the session started from
        self.history: list[Step] = []
        if room is not None:
            self.reset(room)

    # ------------------------------------------------------------------ state

    @property
    def image(self) -> PIL.Image.Image | None:
        """The current image: the last placement's result, or the room the session started from."""
        return self.history[-1].image if self.history else self.room

    def reset(self, room: ImageInput | None = None) -> None:
        """Forget every step; start again from `room` (default: the same room)."""
        self.room = load_image(room, "room") if room is not None else self.room
        self.history = []

    def undo(self) -> PIL.Image.Image:
        """Drop the last placement; returns the image the session is back to."""
        if not self.history:
            raise InvalidArgument("nothing to undo")
        self.history.pop()
        return self.image

    def grid(self, height: int = 128) -> PIL.Image.Image:
        return steps_grid(self.history, height)

    # ------------------------------------------------------------------ placing

    def place(self, subject, room: ImageInput | None = None, mask: ImageInput | None = None, *, box=None,
              **options) -> ProgressivePlacement:
        """Place `subject` (a Subject, a registry record or "name@version", or a plain exemplar image) with `mask` (binary mask or soft edit map,
        0 keep .. 1 regenerate). `room` None (or the session's own room again) builds on the current image;
        another room starts the session over from it. `box` (x0, y0, x1, y1): where the exemplar is pasted for
        the latent surgery (default: the map's box). Options override the session defaults."""
        return self.place_many([(subject, mask, box)], room, **options)

    def place_many(self, regions: list, room: ImageInput | None = None, **options) -> ProgressivePlacement:
        """Several subjects in ONE denoising pass: `regions` is [(subject, mask) or (subject, mask, box), ...];
        each region has its own edit map, exemplar token and adapter."""
        opts = {**self.defaults, **options}
        unknown = set(options) - set(self.defaults)
        if unknown:
            raise InvalidArgument(f"unknown option(s): {', '.join(sorted(unknown))}")
        self._check_options(opts)
        studio, base = self.studio, self.studio.base

        # 1. Check every input before any work (a bad input changes nothing, not even the history)
        start, restart = self._start_image(room)
        prepared, names = self._prepare_regions(regions, start.size)
        maps = torch.stack([m for _, _, m, _ in prepared])  # (K, H, W) edit maps at the room's size
        union = maps.amax(0)
        steps = int(opts["steps"] or studio.default_steps)
        n_iter = _loop_length(base, opts["scheduler"], steps)  # the sampler's iterations (PNDM: steps + 1)
        thresholds(opts["schedule"], n_iter)
        if restart:
            self.reset(start)

        # 2. Latent surgery: every exemplar fitted into its box
        surgical = start.copy()
        for subject, exemplar, m, box in prepared:
            _paste_fitted(surgical, exemplar, box)

        # 3. The work grid (the base's resolution), maps on it and on the latent grid
        frame = WorkFrame.for_base(start.size, base, opts["resolution"])
        image_w = _to_work(frame, pil_to_tensor(start), "image").to(base.device)
        maps_w = _to_work(frame, maps[:, None], "map")[:, 0]  # (K, h', w')
        union_w = maps_w.amax(0)
        latent_size = (image_w.shape[-2] // base.vae_scale_factor, image_w.shape[-1] // base.vae_scale_factor)
        # mu_d from the map edge-replicated into the padding (like the image), so padding never leaks into it
        mu = 1.0 - downsample_map(_to_work(frame, union[None, None], "map", pad="replicate")[0, 0], latent_size)
        mu = mu * _inside(frame, latent_size, base.vae_scale_factor)  # padding runs free, as in Studio.inpaint

        # 4. Per-pixel start steps (Algorithm 1, lines 9/14) and the source each held pixel follows
        n_loop = max(1, round(opts["strength"] * n_iter))
        skip = n_iter - n_loop
        local = thresholds(opts["schedule"], n_loop)
        held = start_steps(mu, local)  # leading held steps of the paper's loop
        z1 = studio.sampler.encode(image_w, sample=False)
        if opts["init"] == "noise" and skip == 0:  # pixels free at step 0 start from the prior itself
            start_step, source = held, z1
        else:  # lines 8/10: they start from the surgical latent z_2 noised to their first step
            z2 = studio.sampler.encode(_to_work(frame, pil_to_tensor(surgical), "image").to(base.device), sample=False)
            source = torch.where((mu > local[0]).to(z1.device)[None, None], z1, z2)
            del z2
            start_step = skip + held.clamp_min(1)
        start_step = start_step.to(torch.uint8 if n_iter < 255 else torch.int32)  # small: it lives all loop long
        seed = int(opts["seed"]) if opts["seed"] is not None else int(torch.randint(0, 2**31 - 1, ()))
        hook = HeldStart(start_step[None, None], source, seed)
        del mu, held, z1, source  # the loop keeps only start_step and the source

        # 5. Conditioning: one exemplar token per region
        embeddings, uncond = encode_exemplars(base, [e for _, e, _, _ in prepared])
        k = len(prepared)
        embeddings = embeddings.reshape(1, k, -1)
        uncond = uncond.reshape(1, 1, -1).repeat(1, k, 1)
        subjects = [s for s, _, _, _ in prepared]

        # 6. Denoise: one pass; K > 1: regional cross-attention and regional LoRA deltas
        generator = [torch.Generator().manual_seed(seed)]  # seed None: a drawn seed, reported in the result
        hooks = [hook]
        studio.sampler.progress = bool(opts["progress"])
        call = dict(uncond=uncond, num_inference_steps=steps, guidance_scale=opts["guidance_scale"],
                    scheduler=opts["scheduler"], generator=generator, hooks=hooks)
        support_w = (union_w > 0).float()[None, None].to(base.device)
        if k == 1:
            with studio.subjects(subjects):
                out = studio.sampler(image_w, support_w, embeddings, **call)
        else:
            weights = RegionWeights(downsample_map_area(maps_w, latent_size)).to(base.device, base.dtype)
            hooks.append(AttentionProcessors(regional_processors(base.unet, weights)))
            if opts["regional_norm"]:
                hooks.append(RegionalGroupNorm(weights))
            with self._regional_adapters(subjects, weights):
                out = studio.sampler(image_w, support_w, embeddings, **call)

        # 7. Back to the room's size; paste-back outside the map
        images = frame.from_work(out.images.cpu())
        generated = tensor_to_pil(images[0])
        final = _paste_back(opts["paste_back"], generated, start, union)
        map_pil = PIL.Image.fromarray((union.clamp(0, 1) * 255).round().byte().numpy(), "L")
        self.history.append(Step(start, map_pil, surgical, [e for _, e, _, _ in prepared], names, final))
        return ProgressivePlacement(
            image=final, room=start, mask=map_pil, exemplar=prepared[0][1], generated=generated,
            seed=seed, edit_map=map_pil, surgical=surgical, images=images, latents=out.latents.cpu(),
            steps=list(self.history),
            info={"steps": steps, "guidance_scale": opts["guidance_scale"], "scheduler": opts["scheduler"] or DEFAULT_SCHEDULER,
                  "schedule": opts["schedule"] if isinstance(opts["schedule"], str) else "callable",
                  "strength": opts["strength"], "init": opts["init"], "subjects": names,
                  "start_step": start_step.cpu()},
        )

    # ------------------------------------------------------------------ helpers

    def _start_image(self, room) -> tuple[PIL.Image.Image, bool]:
        """(the image to build on, whether the session starts over from it)."""
        current = self.image
        if room is not None:
            room_pil = load_image(room, "room")
            if current is None or not (_same_image(room_pil, self.room) or _same_image(room_pil, current)):
                return room_pil, True
        if current is None:
            raise InvalidArgument("the session has no room yet: pass one to place() or progressive(room=...)")
        return current, False

    def _prepare_regions(self, regions, size) -> list:
        if not regions:
            raise InvalidArgument("place_many needs at least one (subject, mask) region")
        prepared, names = [], []
        for region in regions:
            if not isinstance(region, (tuple, list)) or len(region) not in (2, 3):
                raise InvalidArgument("each region is (subject, mask) or (subject, mask, box)")
            subject, mask, box = (*region, None) if len(region) == 2 else region
            if mask is None:
                raise InvalidMask("an edit map (mask) is required")
            m = load_mask(mask, size, what="edit map", binary=False)
            if not bool((m > 0).any()):
                raise InvalidMask("the edit map is empty (all 0): nothing to edit")
            resolved = self.studio.resolve(subject)  # the exemplar and what carries the adapter, as every entry point
            if resolved.exemplar is None:
                raise InvalidArgument("a subject (or an exemplar image) is required for every region")
            exemplar = load_exemplar(resolved.exemplar)
            box = mask_box(m) if box is None else _check_box(box, size)
            prepared.append((resolved.subject, exemplar, m, box))
            names.append(resolved.name)
        return prepared, names

    @staticmethod
    def _check_options(opts) -> None:
        paste = opts["paste_back"]
        if not isinstance(paste, (bool, PasteBack)) and paste != "map":
            raise InvalidArgument(f"paste_back must be a bool, 'map' or a PasteBack; got {paste!r}")
        if not 0.0 < float(opts["strength"]) <= 1.0:
            raise InvalidArgument(f"strength must be in (0, 1]; got {opts['strength']}")
        if opts["init"] not in INITS:
            raise InvalidArgument(f"init must be one of {INITS}; got {opts['init']!r}")
        if not isinstance(opts["regional_norm"], bool):
            raise InvalidArgument(f"regional_norm must be a bool; got {opts['regional_norm']!r}")
        if opts["steps"] is not None and int(opts["steps"]) < 1:
            raise InvalidArgument(f"steps must be >= 1; got {opts['steps']}")
        schedule = opts["schedule"]
        if not callable(schedule) and not (isinstance(schedule, str) and schedule.lower() in SCHEDULES):
            raise InvalidArgument(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)} or a callable")

    def _regional_adapters(self, subjects, weights):
        import contextlib

        if all(s is None for s in subjects):
            return contextlib.nullcontext()
        flats = [None if s is None else self.studio.laid_out(s) for s in subjects]
        return self.studio.slots.regional(flats, weights)


# ------------------------------------------------------------------------------------------- small helpers


def downsample_map_area(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, H, W) -> (K, h, w) coverage (area average): the region weights' input."""
    return F.interpolate(maps[:, None].float(), size=size, mode="area")[:, 0]


def _to_work(frame, x: torch.Tensor, kind: str, pad: str | None = None) -> torch.Tensor:
    """(B, C, H, W) image in [-1, 1] or soft maps in [0, 1] onto the work grid (the maps stay soft)."""
    return frame.image_to_work(x) if kind == "image" else frame.map_to_work(x, pad or "constant")


def _loop_length(base, scheduler, steps: int) -> int:
    """How many iterations the sampler's loop runs for `steps` (its scheduler's timesteps)."""
    from ..sampler import make_scheduler

    sched = make_scheduler(scheduler if scheduler is not None else base.scheduler, base.scheduler.config)
    sched.set_timesteps(steps)
    return len(sched.timesteps)


def _inside(frame, latent_size, factor) -> torch.Tensor:
    """(h, w) 1 on latent pixels covering the room, 0 on the work frame's padding."""
    inside = torch.zeros(latent_size)
    w, h = frame.scaled
    inside[: math.ceil(h / factor), : math.ceil(w / factor)] = 1.0
    return inside


def _paste_back(paste, generated: PIL.Image.Image, room: PIL.Image.Image, edit: torch.Tensor) -> PIL.Image.Image:
    """True: the generated image on the map's support, the room elsewhere. "map": blended by the map itself
    (alpha = edit map). A PasteBack: as Studio.inpaint (grown, feathered around the support). False: none."""
    if isinstance(paste, str):
        if paste != "map":
            raise InvalidArgument(f"paste_back must be a bool, 'map' or a PasteBack; got {paste!r}")
        gen = np.asarray(generated.convert("RGB"), dtype=np.float32)
        inp = np.asarray(room.convert("RGB"), dtype=np.float32)
        a = edit.clamp(0, 1).numpy()[..., None].astype(np.float32)
        out = np.where(a > 0, np.rint(a * gen + (1.0 - a) * inp), inp)
        return PIL.Image.fromarray(out.clip(0, 255).astype(np.uint8))
    paste = paste if isinstance(paste, PasteBack) else PasteBack(enabled=bool(paste), dilate=0, feather=0)
    return paste.apply(generated, room, edit)


def _paste_fitted(canvas: PIL.Image.Image, exemplar: PIL.Image.Image, box) -> None:
    """Paste `exemplar` into `box` of `canvas`, as large as fits with its aspect ratio kept, centred."""
    x0, y0, x1, y1 = box
    bw, bh = x1 - x0, y1 - y0
    scale = min(bw / exemplar.width, bh / exemplar.height)
    w, h = max(1, round(exemplar.width * scale)), max(1, round(exemplar.height * scale))
    fitted = exemplar.convert("RGB").resize((w, h), PIL.Image.BICUBIC)
    canvas.paste(fitted, (x0 + (bw - w) // 2, y0 + (bh - h) // 2))


def _check_box(box, size) -> tuple[int, int, int, int]:
    try:
        x0, y0, x1, y1 = (int(v) for v in box)
    except (TypeError, ValueError):
        raise InvalidArgument(f"box must be (x0, y0, x1, y1); got {box!r}") from None
    W, H = size
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    if x1 <= x0 or y1 <= y0:
        raise InvalidArgument(f"box {tuple(box)} is empty inside a {W}x{H} room")
    return x0, y0, x1, y1


def _same_image(a: PIL.Image.Image, b: PIL.Image.Image) -> bool:
    return a is b or (a.size == b.size and a.mode == b.mode and a.tobytes() == b.tobytes())
