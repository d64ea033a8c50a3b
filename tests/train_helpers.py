"""Fixtures shared by the Subject.train tests: a studio on the tiny base with a registry of its own, and three photos
of one held-out demo product at the tiny base's 32 px."""

import pytest

from adapters_store import Registry
from subjectpaint import Studio
from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, product_photos


@pytest.fixture
def studio(tmp_path, tiny_base):
    registry = Registry(f"sqlite:///{tmp_path}/registry.db", str(tmp_path / "blobs"))
    yield Studio(tiny_base, registry=registry)
    registry.close()


@pytest.fixture(scope="module")
def photos():
    return [p.image.resize((32, 32)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[5]), 3)]
