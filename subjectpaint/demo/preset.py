"""The "demo" training preset's data: the procedural rooms a subject is composited onto when it is trained on the
demo base (`trainers.recipe`'s "demo-rooms" background source, found through the entry point pyproject.toml
declares); production code never imports the demo."""

from __future__ import annotations

from .scenes import TRAIN_SEEDS, make_room


def training_rooms(base, recipe) -> list:
    """`recipe.backgrounds` training-split rooms at the base's resolution, a function of the recipe's seed."""
    return [make_room(TRAIN_SEEDS[(recipe.seed * 7919 + k) % len(TRAIN_SEEDS)], base.resolution)
            for k in range(recipe.backgrounds)]

