import pytest
import torch
from safetensors.torch import save_file

from subjectpaint.base import ExemplarInpainter
from subjectpaint.errors import WeightsNotFound


def test_tiny_is_deterministic_and_seeded():
    a, b, c = ExemplarInpainter.tiny(0), ExemplarInpainter.tiny(0), ExemplarInpainter.tiny(1)
    pa, pb, pc = (next(m.unet.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert a.unet.config.in_channels == 9 and a.image_encoder.uncond_vector.shape == (1, 1, 32)


def test_fingerprint_stable_and_sensitive(tiny_base):
    fp = tiny_base.fingerprint()
    assert fp == ExemplarInpainter.tiny(0).fingerprint()
    assert fp != ExemplarInpainter.tiny(1).fingerprint()
    half = ExemplarInpainter.tiny(0).to(dtype=torch.float16)
    assert half.fingerprint() == fp  # same weights loaded in fp16
    changed = ExemplarInpainter.tiny(0)
    with torch.no_grad():
        changed.unet.conv_in.weight.reshape(-1)[0] += 1.0  # a sampled value
    changed._fingerprint = None
    assert changed.fingerprint() != fp


def test_save_and_load_round_trip_in_diffusers_layout(tmp_path, tiny_base):
    tiny_base.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "image_encoder" / "model.safetensors").is_file()
    loaded = ExemplarInpainter.from_pretrained(tmp_path)
    assert loaded.fingerprint() == tiny_base.fingerprint()
    assert torch.equal(loaded.image_encoder.uncond_vector, tiny_base.image_encoder.uncond_vector)
    assert loaded.resolution == tiny_base.resolution


def test_pickle_weights_are_refused(tmp_path, tiny_base):
    tiny_base.save_pretrained(tmp_path)
    unet_dir = tmp_path / "unet"
    state = tiny_base.unet.state_dict()
    (unet_dir / "diffusion_pytorch_model.safetensors").unlink()
    torch.save(state, unet_dir / "diffusion_pytorch_model.bin")  # a pickle: must never be loaded
    with pytest.raises(WeightsNotFound):
        ExemplarInpainter.from_pretrained(tmp_path)


def test_not_a_pbe_directory(tmp_path):
    save_file({"x": torch.zeros(1)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(WeightsNotFound, match="missing"):
        ExemplarInpainter.from_pretrained(tmp_path)


def test_unreachable_hub_id_is_a_clear_error():
    with pytest.raises(WeightsNotFound, match="Paint-by-Example"):
        ExemplarInpainter.from_pretrained("Fantasy-Studio/Paint-by-Example", local_files_only=True)


def test_studio_load_names_a_tiny_base(tiny_base):
    from subjectpaint.errors import InvalidArgument
    from subjectpaint.studio import Studio

    studio = Studio.load("tiny")
    assert studio.base.fingerprint() == tiny_base.fingerprint() and studio.default_steps == 4
    assert Studio.load("tiny:3").base.fingerprint() == ExemplarInpainter.tiny(3).fingerprint() != tiny_base.fingerprint()
    with pytest.raises(InvalidArgument, match="tiny:SEED"):
        Studio.load("tiny:x")
