"""Hot-swap slots: swaps are exact, failed swaps change nothing, mixed batches equal single runs."""

import copy
import json

import numpy as np
import pytest
import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from subjectpaint.base import ExemplarInpainter
from subjectpaint.errors import BaseMismatch, InvalidAdapter
from subjectpaint.images import load_mask, pil_to_tensor
from subjectpaint.sampler import Sampler
from subjectpaint.slots import Adapter, Slots

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def peft_adapter(unet, seed, r, alpha):
    """A random PEFT LoRA on a copy of `unet`: (the PEFT model, interchange state dict, metadata)."""
    model = copy.deepcopy(unet)
    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, init_lora_weights=False))
    sd = {"unet." + k: v for k, v in get_peft_model_state_dict(model).items()}
    meta = {"lora_adapter_metadata": json.dumps({"unet.r": r, "unet.lora_alpha": alpha, "unet.target_modules": TARGETS})}
    return model, sd, meta


def unet_out(unet, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 9, 16, 16, generator=g)
    c = torch.randn(batch, 1, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700] * (batch // 2)), encoder_hidden_states=c).sample


@pytest.fixture
def fresh():
    return ExemplarInpainter.tiny(0)


@pytest.fixture(scope="module")
def adapters():
    unet = ExemplarInpainter.tiny(0).unet
    return {name: peft_adapter(unet, seed, r, alpha) for name, seed, r, alpha in
            [("a", 1, 4, 8), ("b", 2, 8, 8), ("c", 3, 16, 4), ("d", 4, 2, 2)]}


def test_swap_equals_fresh_model_peft_and_plain_diffusers(fresh, adapters, tmp_path):
    base_out = unet_out(fresh.unet)
    slots = Slots(fresh.unet, max_rank=16, fingerprint=fresh.fingerprint())
    slots.activate(Adapter.from_state_dict(adapters["a"][1], adapters["a"][2], "a"))
    slots.activate(Adapter.from_state_dict(adapters["b"][1], adapters["b"][2], "b"))
    swapped = unet_out(fresh.unet)

    other = ExemplarInpainter.tiny(0)
    Slots(other.unet, max_rank=16).activate(Adapter.from_state_dict(adapters["b"][1], adapters["b"][2]))
    assert (swapped - unet_out(other.unet)).abs().max() <= 1e-6  # A -> B == only B
    assert (swapped - unet_out(adapters["b"][0])).abs().max() <= 1e-5  # == PEFT in memory

    path = tmp_path / "b.safetensors"
    save_file(adapters["b"][1], str(path), metadata=adapters["b"][2])
    plain = ExemplarInpainter.tiny(0).unet
    plain.load_lora_adapter(str(path), prefix="unet", use_safetensors=True)
    assert (swapped - unet_out(plain)).abs().max() <= 1e-5  # == plain diffusers with the file loaded

    slots.deactivate()
    assert torch.equal(unet_out(fresh.unet), base_out)  # bit for bit


def test_alpha_is_honoured(fresh, adapters):
    # rank 16, alpha 4: scale 0.25; ignoring the metadata would give scale 1
    slots = Slots(fresh.unet, max_rank=16)
    slots.activate(Adapter.from_state_dict(adapters["c"][1], adapters["c"][2]))
    assert (unet_out(fresh.unet) - unet_out(adapters["c"][0])).abs().max() <= 1e-5
    wrong = Adapter.from_state_dict(adapters["c"][1], {})
    slots.activate(wrong)
    assert (unet_out(fresh.unet) - unet_out(adapters["c"][0])).abs().max() > 1e-3


def test_a_swap_moves_only_the_adapters_rank_rows_and_clears_a_higher_rank_predecessor(fresh, adapters):
    slots = Slots(fresh.unet, max_rank=16, fingerprint=fresh.fingerprint())
    c = Adapter.from_state_dict(adapters["c"][1], adapters["c"][2], "c")  # rank 16
    d = Adapter.from_state_dict(adapters["d"][1], adapters["d"][2], "d")  # rank 2
    laid_d = slots.layout(d)
    assert laid_d.shape == (2, slots.width)  # rank rows only, not max_rank
    slots.activate(c)
    slots.activate(laid_d)
    assert not slots.flat[2:].any()  # c's rows 2..15 are gone
    other = ExemplarInpainter.tiny(0)
    Slots(other.unet, max_rank=16).activate(d)
    assert torch.equal(unet_out(fresh.unet), unet_out(other.unet))  # c -> d == only d, bit for bit
    with pytest.raises(InvalidAdapter):
        slots.activate(torch.zeros(17, slots.width))  # more rows than the slots have
    with pytest.raises(InvalidAdapter):
        slots.activate(torch.zeros(2, slots.width - 1))
    with pytest.raises(InvalidAdapter):
        slots.layout(Adapter({}, name="empty"))


def test_failed_swaps_leave_the_previous_adapter_bit_for_bit(fresh, adapters):
    slots = Slots(fresh.unet, max_rank=8, fingerprint=fresh.fingerprint())
    slots.activate(Adapter.from_state_dict(adapters["a"][1], adapters["a"][2], "a"))
    before = unet_out(fresh.unet)

    too_big = Adapter.from_state_dict(adapters["c"][1], adapters["c"][2], "c")  # rank 16 > 8
    other_base = Adapter.from_state_dict(adapters["b"][1], adapters["b"][2], "b")
    other_base.base_fingerprint = ExemplarInpainter.tiny(1).fingerprint()
    bad_shape = Adapter.from_state_dict(adapters["b"][1], adapters["b"][2], "b")
    path = next(iter(bad_shape.factors))
    a, b, s = bad_shape.factors[path]
    bad_shape.factors[path] = (a[:, :-1], b, s)  # one input feature short
    unknown = Adapter.from_state_dict(adapters["b"][1], adapters["b"][2], "b")
    unknown.factors["down_blocks.9.attn.to_q"] = unknown.factors.pop(path)
    nan = Adapter.from_state_dict(adapters["b"][1], adapters["b"][2], "b")
    nan.factors[path] = (a.clone().fill_(float("nan")), b, s)

    for adapter, error in [(too_big, InvalidAdapter), (other_base, BaseMismatch), (bad_shape, InvalidAdapter),
                           (unknown, InvalidAdapter), (nan, InvalidAdapter)]:
        with pytest.raises(error):
            slots.activate(adapter)
        assert slots.active_name == "a"
        assert torch.equal(unet_out(fresh.unet), before)


def test_old_diffusers_and_kohya_keys_convert_to_the_same_adapter(adapters):
    sd, meta = adapters["d"][1], adapters["d"][2]  # rank 2, alpha 2: scale 1, alpha implicit in old formats
    reference = Adapter.from_state_dict(sd, meta)
    old = {k.replace("lora_A", "lora.down").replace("lora_B", "lora.up"): v for k, v in sd.items()}
    kohya = {}
    for k, v in sd.items():
        path = k[len("unet."):].rsplit(".lora_", 1)[0]
        name = "lora_unet_" + path.replace(".", "_")
        kohya[name + (".lora_down.weight" if ".lora_A." in k else ".lora_up.weight")] = v
        kohya[name + ".alpha"] = torch.tensor(2.0)
    for converted in (Adapter.from_state_dict(old, {}), Adapter.from_state_dict(kohya, {})):
        assert converted.factors.keys() == reference.factors.keys()
        for key, (a, b, s) in reference.factors.items():
            a2, b2, s2 = converted.factors[key]
            assert torch.equal(a, a2) and torch.equal(b, b2) and s == s2


def test_mixed_batch_of_four_subjects_equals_four_single_runs(fresh, adapters, scene):
    room, mask, exemplar = scene
    subjects = [Adapter.from_state_dict(sd, meta, n) for n, (_, sd, meta) in adapters.items()]
    slots = Slots(fresh.unet, max_rank=16)
    emb, unc = fresh.encode_exemplar([exemplar] * 4)
    image = pil_to_tensor([room] * 4)
    m = load_mask(mask, room.size)[None, None].repeat(4, 1, 1, 1)

    def sample(rows_image, rows_mask, rows_emb, generators):
        return Sampler(fresh, progress=False)(rows_image, rows_mask, rows_emb, uncond=unc, num_inference_steps=3,
                                              scheduler="ddim", generator=generators).latents

    generators = lambda: [torch.Generator().manual_seed(i) for i in range(4)]  # noqa: E731
    with slots.mixed(subjects, torch.arange(4)):
        mixed = sample(image, m, emb, generators())
    # Each single-subject run keeps the batch shape (4 rows, one subject), so both sides use the same kernels:
    # batch 4 vs batch 1 alone differs by ~2.5e-5 after 3 steps on this random model, adapters or not.
    for i, adapter in enumerate(subjects):
        slots.activate(adapter)
        single = sample(image, m, emb, generators())
        assert (mixed[i] - single[i]).abs().max() <= 1e-5
    slots.deactivate()
    # and the rows really differ by subject
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3


# ------------------------------------------------------------------------ through the Studio


def _subject(name, adapter=None, record=None, seed=0):
    from types import SimpleNamespace

    from tests.conftest import random_image

    return SimpleNamespace(name=name, exemplar=random_image(32, 32, 50 + seed), adapter=adapter, record=record)


def test_studio_mixed_subject_batch_matches_single_placements(adapters, scene):
    from subjectpaint.studio import Studio

    room, mask, exemplar = scene
    studio = Studio(ExemplarInpainter.tiny(0))
    s1 = _subject("one", Adapter.from_state_dict(adapters["a"][1], adapters["a"][2]), seed=1)
    s2 = _subject("two", Adapter.from_state_dict(adapters["b"][1], adapters["b"][2]), seed=2)
    kw = dict(steps=3, scheduler="ddim", seed=5, paste_back=False, progress=False, resolution=48)
    batch = studio.inpaint_many([(room, mask, s1), (room, mask, s2), (room, mask, exemplar)], **kw)
    for i, job in enumerate([s1, s2, exemplar]):
        single = studio.inpaint(room, mask, job, **{**kw, "seed": 5 + i})
        diff = np.abs(np.asarray(single.image, dtype=int) - np.asarray(batch[i].image, dtype=int)).max()
        assert diff <= 1
    # the adapter matters: the same exemplar without the adapter paints something else
    plain = studio.inpaint(room, mask, s1.exemplar, **kw)
    assert np.abs(np.asarray(plain.image, dtype=int) - np.asarray(batch[0].image, dtype=int)).max() > 2
    assert studio.slots.active_name is None and not studio.slots.state.active  # nothing left active


def test_registry_to_ram_to_slots_and_a_corrupt_blob_keeps_the_previous_adapter(adapters, tmp_path):
    from adapters_store.registry import Registry

    from subjectpaint.errors import AdapterCorrupt
    from subjectpaint.studio import Studio

    base = ExemplarInpainter.tiny(0)
    registry = Registry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    rec_a = registry.register("mug", adapters["a"][1], adapters["a"][2], base.fingerprint())
    rec_b = registry.register("vase", adapters["b"][1], adapters["b"][2], base.fingerprint())
    studio = Studio(base, registry=registry)
    studio.activate(_subject("mug", record=rec_a))
    out_a = unet_out(base.unet)
    assert (out_a - unet_out(adapters["a"][0])).abs().max() <= 1e-5  # registry round trip keeps alpha
    studio.activate(_subject("mug", record=rec_a))
    assert studio.adapter_cache.stats().hits == 1  # second activation from RAM

    blob = next(p for p in (tmp_path / "blobs").rglob("*") if p.is_file() and rec_b.sha256 in p.name)
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(AdapterCorrupt, match="vase@1"):
        studio.activate(_subject("vase", record=rec_b))
    assert studio.slots.active_name == "mug" and torch.equal(unet_out(base.unet), out_a)
