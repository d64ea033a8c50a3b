"""Demo scenes written in the folder layout of a paper's evaluation protocol (`subjectpaint.protocols`), so every
protocol runs offline on the demo base: `subjectpaint eval PROTOCOL DIR --make-demo N`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image

from ..errors import InvalidArgument
from ..protocols import PROTOCOLS
from ..sessions.progressive import edit_map
from .scenes import EVAL_SEEDS, make_scene


def write_demo_dataset(protocol: str, root, n: int = 4, size: int = 64) -> Path:
    """Demo scenes (held-out seeds) in `protocol`'s folder layout under `root`: the instrument for a run offline."""
    root = Path(root)
    if protocol not in PROTOCOLS:
        raise InvalidArgument(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    scenes = [make_scene(s, size) for s in EVAL_SEEDS[:n]]

    def save(img, folder, stem):
        (root / folder).mkdir(parents=True, exist_ok=True)
        img.save(root / folder / f"{stem}.png")

    if protocol == "lora":  # objects = the scenes' products (their exemplars), backgrounds = the scenes' rooms
        for k, sc in enumerate(scenes):
            save(sc.exemplar, f"objects/product{k}", "photo0")
            save(sc.room, "backgrounds", f"room{k}")
            save(sc.mask, "backgrounds/masks", f"room{k}")
        return root
    for k, sc in enumerate(scenes):
        stem = f"scene{k}"
        save(sc.room, "source", stem)
        if protocol == "pixels":
            m = edit_map(sc.mask, blur=2)
            save(PIL.Image.fromarray((m.numpy() * 255).round().astype(np.uint8), "L"), "map", stem)
            save(sc.exemplar, "exemplar", stem)
        else:
            save(sc.mask, "mask", stem)
            save(sc.exemplar, "reference", stem)
            save(sc.silhouette, "silhouette", stem)
        save(sc.composite, "real", stem)
    return root
