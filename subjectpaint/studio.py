"""Studio: holds the base model (and later the registry and adapter slots) and runs placements."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import PIL.Image
import torch
import torch.nn.functional as F

from .base import ExemplarInpainter
from .errors import InvalidArgument
from .images import ImageInput, load_exemplar, load_image, load_mask, mask_to_pil, pil_to_tensor, tensor_to_pil
from .masks import PasteBack
from .result import Placement
from .sampler import Sampler
from .slots import Adapter, Slots


@dataclass
class WorkFrame:
    """How a user's room maps onto the grid the model works on: scaled down to the base's resolution when
    larger (long side), then padded (edge-replicated, mask 0) to a multiple of the size step."""

    original: tuple[int, int]  # (W, H) of the user's room
    scaled: tuple[int, int]  # (w, h) after scaling
    padded: tuple[int, int]  # (w', h') multiples of the size step

    @classmethod
    def fit(cls, size: tuple[int, int], resolution: int, multiple: int) -> "WorkFrame":
        W, H = size
        scale = min(1.0, resolution / max(W, H))
        w, h = max(1, round(W * scale)), max(1, round(H * scale))
        pw, ph = -(-w // multiple) * multiple, -(-h // multiple) * multiple
        return cls((W, H), (w, h), (pw, ph))

    def to_work(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (1, 3, H, W) in [-1, 1], mask (H, W) -> (1, 3, h', w'), (1, 1, h', w') on the work grid."""
        mask = mask[None, None]
        if self.scaled != self.original:
            w, h = self.scaled
            image = F.interpolate(image, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
            mask = (F.interpolate(mask, size=(h, w), mode="area") > 0).float()  # any touched pixel stays editable
        pad = (0, self.padded[0] - self.scaled[0], 0, self.padded[1] - self.scaled[1])
        if any(pad):
            image = F.pad(image, pad, mode="replicate")
            mask = F.pad(mask, pad, value=0.0)
        return image, mask

    def from_work(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h', w') in [0, 1] -> (B, 3, H, W): crop the padding, scale back up."""
        w, h = self.scaled
        images = images[..., :h, :w]
        if self.scaled != self.original:
            W, H = self.original
            images = F.interpolate(images, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
        return images


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

        The third element of a job is an exemplar image, None (unconditional fill) or a Subject: its best
        exemplar crop conditions the row and its adapter is applied to that row only (a mixed-subject batch)."""
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
            subject = exemplar if _is_subject(exemplar) else None
            if subject is not None:
                exemplar = subject.exemplar
            prepared.append((room_pil, mask_t, None if exemplar is None else load_exemplar(exemplar), subject))
        multiple = max(8, self.base.vae_scale_factor)
        frames = [WorkFrame.fit(p[0].size, resolution or self.base.resolution, multiple) for p in prepared]

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
            with self.subjects([prepared[i][3] for i in rows]):
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
                    info={"steps": steps, "guidance_scale": guidance_scale, "scheduler": scheduler or type(self.base.scheduler).__name__,
                          "subject": getattr(subject, "name", None)},
                )
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ sessions

    def progressive(self, **defaults):
        """A PIXELS progressive-editing session (soft edit maps, per-pixel start, several subjects per pass)."""
        from .sessions.progressive import ProgressiveSession

        return ProgressiveSession(self, **defaults)

    def dual_branch(self, **defaults):
        """A ViMAEdit dual-branch session (source/target branches, attention injection, grounding)."""
        from .sessions.dual_branch import DualBranchSession

        return DualBranchSession(self, **defaults)

    # ------------------------------------------------------------------ subjects: registry -> RAM -> slots

    @property
    def slots(self) -> Slots:
        """LoRA slots over the base UNet, injected once (at `max_rank`) on first use."""
        if self._slots is None:
            self._slots = Slots(self.base.unet, max_rank=self.max_rank, fingerprint=self.base.fingerprint())
        return self._slots

    def laid_out(self, source) -> torch.Tensor:
        """An adapter laid out for the slots, through the RAM tier. `source`: a Subject (anything with a
        `record` or an `adapter`), a registry `AdapterRecord`, a "name@version" string, or an `Adapter`."""
        record = getattr(source, "record", None) if not _is_record(source) else source
        if record is None and isinstance(source, str):
            record = self._registry().get(source)
        if record is not None:
            key = f"{record.sha256}:{self.max_rank}"

            def load():
                meta = dict(record.metadata or {})
                if record.alpha is not None:
                    meta.setdefault("lora_alpha", record.alpha)
                meta.setdefault("base_fingerprint", record.base_fingerprint)
                # laid out while the blob's sha256 is checked beside us; a blob that does not verify
                # raises on leaving the block, so its layout never reaches the RAM tier
                with self._registry().verifying(record) as tensors:
                    flat = self.slots.layout(Adapter.from_state_dict(tensors, meta, record.ref))
                return {"flat": flat}

            return self.adapter_cache.get_or_load(key, load)["flat"]
        adapter = getattr(source, "adapter", source)
        if getattr(source, "tensors", None) is not None:  # a Subject held in memory (e.g. Subject.from_file)
            adapter = Adapter.from_state_dict(source.tensors, source.metadata, str(getattr(source, "name", "")))
        if not isinstance(adapter, Adapter):
            raise InvalidArgument(f"cannot find an adapter in {type(source).__name__}")
        return self.slots.layout(adapter)

    def activate(self, subject) -> None:
        """Hot-swap `subject`'s adapter in (None: the base alone). A failed swap keeps the previous one."""
        if subject is None or _adapter_free(subject):
            self.slots.deactivate() if self._slots is not None else None
            return
        self.slots.activate(self.laid_out(subject), name=str(getattr(subject, "name", "adapter")))

    @contextlib.contextmanager
    def subjects(self, subjects: list):
        """Within the block, batch row i of every UNet call uses subjects[i]'s adapter (None: no adapter).
        One subject for all rows is a plain swap; several are a mixed batch gathered per row."""
        unique: list = []
        rows: list[int] = []
        for s in subjects:
            if _adapter_free(s):
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
        """Embeddings (B, 1, D) for PIL exemplars; a None exemplar gets the learned unconditional vector
        (an unconditional fill: the base paints plausible background)."""
        uncond = self.base.image_encoder.uncond_vector.detach()
        given = [e for e in exemplars if e is not None]
        encoded = iter(self.base.encode_exemplar(given)[0]) if given else iter(())
        rows = [next(encoded) if e is not None else uncond[0].to(self.base.device) for e in exemplars]
        return torch.stack(rows), uncond

    def __repr__(self) -> str:
        return f"Studio(base={self.base.name!r}, resolution={self.base.resolution})"




def _is_record(x) -> bool:
    return hasattr(x, "sha256") and hasattr(x, "ref")


def _is_subject(x) -> bool:
    """A Subject (or anything shaped like one): an exemplar crop plus an adapter source."""
    return hasattr(x, "exemplar") and any(hasattr(x, a) for a in ("record", "adapter", "tensors"))


def _adapter_free(x) -> bool:
    return x is None or all(getattr(x, a, None) is None for a in ("record", "adapter", "tensors"))
