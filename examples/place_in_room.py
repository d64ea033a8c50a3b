"""App flow with the SDK: load a registered subject and place it into a room, with both sessions.

    python examples/register_product.py && python examples/place_in_room.py
    python examples/place_in_room.py --tiny --steps 2    # (after register_product.py --tiny)
"""
import argparse
import os

from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import ExemplarInpainter
from subjectpaint.demo.scenes import EVAL_SEEDS, make_scene


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="blue-mug")
    p.add_argument("--home", default="example-registry")
    p.add_argument("--out", default="example-out")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the base's)")
    p.add_argument("--tiny", action="store_true", help="random tiny base instead of the demo base")
    args = p.parse_args(argv)

    studio = Studio(ExemplarInpainter.tiny(0), default_steps=4) if args.tiny else Studio.load()
    scene = make_scene(EVAL_SEEDS[0], studio.base.resolution)  # a room and where the product goes
    os.makedirs(args.out, exist_ok=True)
    with Registry(f"sqlite:///{os.path.abspath(args.home)}/registry.db", os.path.join(args.home, "blobs")) as registry:
        studio.registry = registry
        subject = Subject.load(args.name, studio)
        for label, session in (("progressive", studio.progressive(steps=args.steps, seed=0, progress=False)),
                               ("dual", studio.dual_branch(steps=args.steps, seed=0, progress=False))):
            placed = session.place(subject, scene.room, scene.mask)
            path = os.path.join(args.out, f"placed_{label}.png")
            placed.image.save(path)
            print(f"{label}: wrote {path} ({placed.image.size[0]}x{placed.image.size[1]})")


if __name__ == "__main__":
    main()
