"""What a placement returns, and the before/after grids users look at."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import PIL.Image
import PIL.ImageDraw


@dataclass
class Placement:
    """One placed image. `image` is the final result (paste-back applied); `generated` is the raw decoder output
    at the input's size; `mask` is the binary edit mask used (white = edited)."""

    image: PIL.Image.Image
    room: PIL.Image.Image
    mask: PIL.Image.Image
    exemplar: PIL.Image.Image | None
    generated: PIL.Image.Image
    seed: int | None = None
    info: dict = field(default_factory=dict)

    def grid(self, height: int = 256) -> PIL.Image.Image:
        """before | mask | exemplar | after, each scaled to `height` px tall, labelled."""
        panels = [("before", self.room), ("mask", self.mask), ("exemplar", self.exemplar), ("after", self.image)]
        return image_grid([[(label, img) for label, img in panels if img is not None]], height=height)

    def save(self, path: str | os.PathLike) -> Path:
        return save_image(self.image, path)


def image_grid(rows: list[list[tuple[str, PIL.Image.Image]]], height: int = 256, pad: int = 4) -> PIL.Image.Image:
    """Rows of labelled panels -> one RGB image; each panel scaled (nearest when enlarging) to `height`."""
    label_h = 14
    rendered = []
    for row in rows:
        panels = []
        for label, img in row:
            img = img.convert("RGB")
            w = max(1, round(img.width * height / img.height))
            resample = PIL.Image.NEAREST if height >= img.height else PIL.Image.LANCZOS
            panels.append((label, img.resize((w, height), resample)))
        rendered.append(panels)
    width = max(sum(p.width for _, p in row) + pad * (len(row) + 1) for row in rendered)
    total_h = len(rendered) * (height + label_h + pad) + pad
    canvas = PIL.Image.new("RGB", (width, total_h), (255, 255, 255))
    draw = PIL.ImageDraw.Draw(canvas)
    y = pad
    for row in rendered:
        x = pad
        for label, panel in row:
            draw.text((x + 2, y), label, fill=(0, 0, 0))
            canvas.paste(panel, (x, y + label_h))
            x += panel.width + pad
        y += height + label_h + pad
    return canvas


def save_image(image: PIL.Image.Image, path: str | os.PathLike) -> Path:
    """Write atomically (temp file in the same directory, fsync, rename): a failure leaves no partial file."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = PIL.Image.registered_extensions().get(path.suffix.lower(), "PNG")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # mode 0666 less the umask, as any file a user writes
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format=fmt)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
