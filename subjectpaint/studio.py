"""Studio: holds the base model, the registry handle and the adapter slots; runs placements and makes sessions.

Subjects and adapters come in through one resolver (`subjectpaint.sources`); the sessions use the studio only
through `resolve`, `subjects`, `laid_out`, `slots`, `sampler`, `base` and `default_steps`, and never import it."""

from __future__ import annotations

import contextlib
import os

import torch

from . import sources
from .base import ExemplarInpainter
from .errors import InvalidArgument
from .images import ImageInput, load_exemplar, load_image, load_mask, mask_to_pil, pil_to_tensor, tensor_to_pil
from .masks import PasteBack
from .result import Placement
from .choices import DEFAULT_SCHEDULER
from .sampler import Sampler
from .sessions.dual_branch import DualBranchSession
from .sessions.progressive import ProgressiveSession
from .slots import Slots
from .workframe import WorkFrame, encode_exemplars

__all__ = ["Studio", "WorkFrame"]


class Studio:
    """The entry point: `Studio.load()` then `studio.inpaint(room, mask, exemplar)`."""

    def __init__(self, base: ExemplarInpainter, registry=None, default_steps: int = 50, max_rank: int = 16,
                 cache_bytes: int = 1 << 30):
        from adapters_store.cache import AdapterCache

        self.base = base
        self.registry = registry
        self.default_steps = default_steps
        self.sampler = Sampler(base)
        self.max_rank = max_rank
        self.adapter_cache = AdapterCache(cache_bytes)  # the RAM tier: adapters laid out for the slots
        self._slots: Slots | None = None

    @classmethod
    def load(
        cls,
        id_or_dir: str | os.PathLike | None = None,
        *,
        registry=None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
    ) -> "Studio":
        """No argument: the demo base shipped in the package. "tiny" or "tiny:SEED": a random tiny base (tests,
        benchmarks, smoke runs; 4 steps by default). Otherwise a hub id or a local diffusers Paint-by-Example
        directory (safetensors only), e.g. "Fantasy-Studio/Paint-by-Example"."""
        if id_or_dir is None:
            return cls(ExemplarInpainter.demo(device=device), registry=registry, default_steps=25)
        if isinstance(id_or_dir, str) and id_or_dir.partition(":")[0] == "tiny":
            seed = id_or_dir.partition(":")[2] or "0"
            if not seed.isdigit():
                raise InvalidArgument(f"a tiny base is 'tiny' or 'tiny:SEED' (SEED an int >= 0), got {id_or_dir!r}")
            tiny = ExemplarInpainter.tiny(int(seed)).to(device=device, dtype=torch_dtype)
            return cls(tiny, registry=registry, default_steps=4)
        return cls(ExemplarInpainter.from_pretrained(id_or_dir, torch_dtype=torch_dtype, device=device), registry)

    def save(self, directory: str | os.PathLike) -> None:
        """Write the base in the diffusers Paint-by-Example layout (its scheduler class and config included)."""
        self.base.save_pretrained(directory)

    # ------------------------------------------------------------------ one-shot exemplar inpainting

    def inpaint(
        self,
        room: ImageInput,
        mask: ImageInput,
        exemplar: ImageInput,
        *,
        steps: int | None = None,
        guidance_scale: float = 5.0,
        scheduler: str | None = None,
        seed: int | None = None,
        paste_back: PasteBack | bool = True,
        resolution: int | None = None,
        progress: bool = True,
    ) -> Placement:
        """Paint `exemplar` into `room` where `mask` is white (exemplar None: unconditional fill).
        Returns a `Placement`."""
        return self.inpaint_many(
            [(room, mask, exemplar)],
            steps=steps,
            guidance_scale=guidance_scale,
            scheduler=scheduler,
            seed=seed,
            paste_back=paste_back,
            resolution=resolution,
            progress=progress,
        )[0]

    def inpaint_many(
        self,
        jobs: list[tuple[ImageInput, ImageInput, ImageInput]],
        *,
        steps: int | None = None,
        guidance_scale: float = 5.0,
        scheduler: str | None = None,
        seed: int | None = None,
        paste_back: PasteBack | bool = True,
        resolution: int | None = None,
        progress: bool = True,
        seeds: list[int] | None = None,
    ) -> list[Placement]:
        """Several (room, mask, exemplar) jobs in one batched denoising pass when their work sizes agree
        (otherwise grouped by size). Row i uses generator seed `seed + i`, or `seeds[i]` when given (a server
        batching independent requests: each row's result is then the same as that request run alone).

        The third element of a job is an exemplar image, None (unconditional fill) or a subject (a Subject, a
        registry record or a "name@version" string; see `subjectpaint.sources`): its exemplar crop conditions the
        row and its adapter is applied to that row only (a mixed-subject batch)."""
        paste = paste_back if isinstance(paste_back, PasteBack) else PasteBack(enabled=bool(paste_back))
        steps = steps or self.default_steps
        if not jobs:
            raise InvalidArgument("inpaint_many needs at least one (room, mask, exemplar) job")
        if seeds is not None:
            if len(seeds) != len(jobs) or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds):
                raise InvalidArgument("seeds must be a list of ints, one per job")
            if seed is not None:
                raise InvalidArgument("pass seed or seeds, not both")
        row_seed = (lambda i: seeds[i]) if seeds is not None else (lambda i: None if seed is None else seed + i)
        # 1. Validate every input before any work (bad input -> typed error, nothing done)
        prepared = []
        for room, mask, exemplar in jobs:
            room_pil = load_image(room, "room")
            mask_t = load_mask(mask, room_pil.size)
            subject = self.resolve(exemplar)
            exemplar = None if subject.exemplar is None else load_exemplar(subject.exemplar)
            prepared.append((room_pil, mask_t, exemplar, subject))
        frames = [WorkFrame.for_base(p[0].size, self.base, resolution) for p in prepared]

        # 2. Group rows by work size and run each group as one batch
        results: list[Placement | None] = [None] * len(prepared)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, frame in enumerate(frames):
            groups.setdefault(frame.padded, []).append(i)
        self.sampler.progress = progress
        for rows in groups.values():
            work = [frames[i].to_work(pil_to_tensor(prepared[i][0]), prepared[i][1]) for i in rows]
            images = torch.cat([w[0] for w in work]).to(self.base.device)
            masks = torch.cat([w[1] for w in work]).to(self.base.device)
            embeddings, uncond = self.encode_exemplars([prepared[i][2] for i in rows])
            generator = None if row_seed(0) is None else [torch.Generator().manual_seed(row_seed(i)) for i in rows]
            with self.subjects([prepared[i][3].subject for i in rows]):
                out = self.sampler(
                    images,
                    masks,
                    embeddings,
                    uncond=uncond,
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    scheduler=scheduler,
                    generator=generator,
                )
            # 3. Back to each room's own size, then paste-back outside the mask
            for j, i in enumerate(rows):
                room_pil, mask_t, exemplar_pil, subject = prepared[i]
                generated = tensor_to_pil(frames[i].from_work(out.images[j : j + 1])[0])
                results[i] = Placement(
                    image=paste.apply(generated, room_pil, mask_t),
                    room=room_pil,
                    mask=mask_to_pil(mask_t),
                    exemplar=exemplar_pil,
                    generated=generated,
                    seed=row_seed(i),
                    info={"steps": steps, "guidance_scale": guidance_scale,
                          "scheduler": scheduler or type(self.base.scheduler).__name__, "subject": subject.name},
                )
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ sessions

    def progressive(self, **defaults):
        """A PIXELS progressive-editing session (soft edit maps, per-pixel start, several subjects per pass)."""
        return ProgressiveSession(self, **defaults)

    def dual_branch(self, **defaults):
        """A ViMAEdit dual-branch session (source/target branches, attention injection, grounding)."""
        return DualBranchSession(self, **defaults)

    # ------------------------------------------------------------------ subjects: registry -> RAM -> slots

    @property
    def slots(self) -> Slots:
        """LoRA slots over the base UNet, injected once (at `max_rank`) on first use."""
        if self._slots is None:
            self._slots = Slots(self.base.unet, max_rank=self.max_rank, fingerprint=self.base.fingerprint())
        return self._slots

    def resolve(self, subject) -> sources.Resolved:
        """A placement's subject resolved against this studio's registry (`subjectpaint.sources.resolve`): its
        exemplar, what carries its adapter, its name. Every entry point (inpaint, the sessions) goes through it."""
        return sources.resolve(subject, self._registry)

    def laid_out(self, source) -> torch.Tensor:
        """An adapter laid out for the slots, through the RAM tier when it has a registry record. `source`: any
        adapter source (`subjectpaint.sources`): a Subject, a registry record, a "name@version" string, an
        `Adapter`, LoRA tensors."""
        source = sources.looked_up(source, self._registry)

        def load():
            # a registry blob is laid out while its sha256 is checked beside us; one that does not verify raises on
            # leaving the block, so its layout never reaches the RAM tier
            with sources.opened(source, self._registry) as adapter:
                return {"flat": self.slots.layout(adapter)}

        key = sources.cache_key(source)
        if key is None:
            return load()["flat"]
        return self.adapter_cache.get_or_load(f"{key}:{self.max_rank}", load)["flat"]

    def activate(self, subject) -> None:
        """Hot-swap `subject`'s adapter in (None, or no adapter: the base alone). A failed swap keeps the previous
        one."""
        source = sources.adapter_source(subject)
        if source is None:
            self.slots.deactivate() if self._slots is not None else None
            return
        self.slots.activate(self.laid_out(source), name=str(getattr(subject, "name", None) or "adapter"))

    @contextlib.contextmanager
    def subjects(self, subjects: list):
        """Within the block, batch row i of every UNet call uses subjects[i]'s adapter (None: no adapter).
        One subject for all rows is a plain swap; several are a mixed batch gathered per row."""
        unique: list = []
        rows: list[int] = []
        for s in map(sources.adapter_source, subjects):
            if s is None:
                rows.append(-1)
                continue
            index = next((j for j, u in enumerate(unique) if u is s), None)
            if index is None:
                unique.append(s)
                index = len(unique) - 1
            rows.append(index)
        if not unique:
            yield
        elif len(unique) == 1 and -1 not in rows:
            self.activate(unique[0])
            try:
                yield
            finally:
                self.slots.deactivate()
        else:
            with self.slots.mixed([self.laid_out(s) for s in unique], torch.tensor(rows)):
                yield

    def _registry(self):
        if self.registry is None:
            from adapters_store.registry import Registry

            self.registry = Registry()
        return self.registry

    def encode_exemplars(self, exemplars: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, 1, D) for PIL exemplars; None gets the learned unconditional vector (`workframe`)."""
        return encode_exemplars(self.base, exemplars)

    def __repr__(self) -> str:
        return f"Studio(base={self.base.name!r}, resolution={self.base.resolution})"
