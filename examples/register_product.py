"""Retailer flow: register a product from a few photos as a subject (a LoRA adapter in the registry).

    python examples/register_product.py                  # the demo base shipped in the package
    python examples/register_product.py --tiny --steps 2 # a random tiny base (smoke test, seconds)

The photos here come from the package's procedural product generator; pass your own with --photos.
"""
import argparse
import os

from adapters_store import Registry
from subjectpaint import Studio, Subject
from subjectpaint.base import ExemplarInpainter
from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, product_photos


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", default="blue-mug")
    p.add_argument("--photos", nargs="*", help="product photos (default: 3 generated ones)")
    p.add_argument("--home", default="example-registry", help="registry directory (SQLite + blobs)")
    p.add_argument("--steps", type=int, default=150, help="LoRA training steps")
    p.add_argument("--tiny", action="store_true", help="random tiny base instead of the demo base")
    args = p.parse_args(argv)

    studio = Studio(ExemplarInpainter.tiny(0), default_steps=4) if args.tiny else Studio.load()
    photos = args.photos or [s.image for s in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 3)]
    with Registry(f"sqlite:///{os.path.abspath(args.home)}/registry.db", os.path.join(args.home, "blobs")) as registry:
        subject = Subject.train(photos, args.name, studio, registry=registry, steps=args.steps, detector=None,
                                new_version=True, progress=False)
    print(f"registered {subject.ref}: rank {subject.rank}, {subject.record.byte_size} bytes "
          f"(base {studio.base.name}) in {args.home}")


if __name__ == "__main__":
    main()
