"""The embedded demo: a procedural product-in-room scene generator (`subjectpaint.demo.scenes`) whose true
composites make inpainting quality a number, and the small base trained on it. The "demo" training preset's
procedural rooms are `subjectpaint.demo.preset.training_rooms`, declared as an entry point (pyproject.toml)."""

from .scenes import (  # noqa: F401
    EVAL_SEEDS,
    HELDOUT_PRODUCT_SEEDS,
    PATTERNS,
    SHAPES,
    TRAIN_PRODUCT_SEEDS,
    TRAIN_SEEDS,
    Photo,
    Product,
    Scene,
    heldout_scene_seeds,
    make_room,
    make_scene,
    preview,
    product_photos,
    product_split,
    scene_split,
)
