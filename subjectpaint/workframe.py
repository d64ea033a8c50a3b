"""What every placement does before the sampler: the room onto the model's work grid (`WorkFrame`) and the
exemplars into condition rows (`encode_exemplars`). Shared by `Studio.inpaint_many` and the sessions."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


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

    @classmethod
    def for_base(cls, size: tuple[int, int], base, resolution: int | None = None) -> "WorkFrame":
        """The frame of a room of `size` on `base` (at `resolution`, default the base's own)."""
        return cls.fit(size, resolution or base.resolution, max(8, base.vae_scale_factor))

    def to_work(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (1, 3, H, W) in [-1, 1], mask (H, W) -> (1, 3, h', w'), (1, 1, h', w') on the work grid; a work
        pixel the mask touches at all stays editable."""
        return self.image_to_work(image), (self.map_to_work(mask[None, None]) > 0).float()

    def image_to_work(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 3, h', w'): bicubic (antialiased) down, edge-replicated padding."""
        if self.scaled != self.original:
            w, h = self.scaled
            image = F.interpolate(image, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(-1, 1)
        return self._pad(image, "replicate")

    def map_to_work(self, maps: torch.Tensor, pad: str = "constant") -> torch.Tensor:
        """(B, C, H, W) soft maps in [0, 1] -> (B, C, h', w'): area-averaged down, padded with 0 ("constant") or
        edge-replicated ("replicate")."""
        if self.scaled != self.original:
            w, h = self.scaled
            maps = F.interpolate(maps, size=(h, w), mode="area")
        return self._pad(maps, pad)

    def _pad(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        pad = (0, self.padded[0] - self.scaled[0], 0, self.padded[1] - self.scaled[1])
        if not any(pad):
            return x
        return F.pad(x, pad, mode="replicate") if mode == "replicate" else F.pad(x, pad, value=0.0)

    def from_work(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, h', w') in [0, 1] -> (B, 3, H, W): crop the padding, scale back up."""
        w, h = self.scaled
        images = images[..., :h, :w]
        if self.scaled != self.original:
            W, H = self.original
            images = F.interpolate(images, size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1)
        return images


def encode_exemplars(base, exemplars: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, 1, D) for PIL exemplars on `base`, and its learned unconditional vector; a None exemplar
    gets that vector (an unconditional fill: the base paints plausible background)."""
    uncond = base.image_encoder.uncond_vector.detach()
    given = [e for e in exemplars if e is not None]
    encoded = iter(base.encode_exemplar(given)[0]) if given else iter(())
    rows = [next(encoded) if e is not None else uncond[0].to(base.device) for e in exemplars]
    return torch.stack(rows), uncond
