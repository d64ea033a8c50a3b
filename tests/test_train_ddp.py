"""SubjectLoRAModule under DDP: 2 CPU processes (gloo) train one adapter from disjoint data."""

import json

import lightning as L
import pytest
import torch

from subjectpaint.base import ExemplarInpainter
from subjectpaint.demo.scenes import HELDOUT_PRODUCT_SEEDS, Product, make_room, product_photos
from trainers.annotate import foreground_box
from trainers.data import SubjectDataModule
from trainers.lora_module import SubjectLoRAModule, fit


class Record(L.Callback):
    """Each rank writes the sample ids it saw and a digest of its final LoRA weights."""

    def __init__(self, path):
        self.path, self.ids = str(path), []

    def on_train_batch_start(self, trainer, module, batch, i):
        self.ids += batch["index"].tolist()

    def on_train_end(self, trainer, module):
        sd = module.lora_state_dict()
        digest = [float(sd[k].double().sum()) for k in sorted(sd)]
        with open(f"{self.path}/rank{trainer.global_rank}.json", "w") as f:
            json.dump({"ids": self.ids, "digest": digest, "world": trainer.world_size}, f)


@pytest.mark.slow
def test_ddp_two_cpu_processes(tmp_path):
    base = ExemplarInpainter.tiny(0)
    photos = [p.image.resize((32, 32)) for p in product_photos(Product.from_seed(HELDOUT_PRODUCT_SEEDS[0]), 2)]
    data = SubjectDataModule.for_base(base, photos, [foreground_box(p) for p in photos],
                                      backgrounds=[make_room(1, 32)], batch_size=2, seed=1)
    module = SubjectLoRAModule(base, rank=2, lr=1e-2, seed=0)
    init = module.lora_state_dict()
    fit(module, data, 3, progress=False, strategy="ddp_spawn", devices=2, callbacks=[Record(tmp_path)])
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert not set(r0["ids"]) & set(r1["ids"]) and len(r0["ids"]) == len(r1["ids"]) == 6
    assert r0["digest"] == r1["digest"]  # gradients were all-reduced: both ranks hold the same adapter
    out = module.lora_state_dict()  # the main process gets the trained weights back
    assert [float(out[k].double().sum()) for k in sorted(out)] == pytest.approx(r0["digest"], abs=1e-5)
    assert max((out[k] - init[k]).abs().max().item() for k in out) > 0
