"""The interchange file: loads in plain diffusers (UNet and StableDiffusionInpaintPipeline) with the same output as
our in-memory PEFT model, alpha != rank included; truncation and int8 storage."""

import json
import os

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from subjectpaint.base import ExemplarInpainter
from subjectpaint.subject import Subject
from trainers import export
from trainers.lora_module import SubjectLoRAModule

RANK, ALPHA = 4, 12.0  # alpha != rank: the scale 3 must survive every loading path


@pytest.fixture(scope="module")
def trained():
    base = ExemplarInpainter.tiny(0)
    module = SubjectLoRAModule(base, rank=RANK, alpha=ALPHA, seed=1)
    torch.manual_seed(1)
    with torch.no_grad():  # stand-in for training: non-zero B everywhere
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    module.unet.eval()
    meta = export.build_metadata(rank=RANK, alpha=ALPHA, targets=module.config.target_modules,
                                 base_fingerprint=base.fingerprint(), subject="mug")
    tensors = export.fold_scale(module.lora_state_dict(), RANK, ALPHA)
    return base, module, tensors, meta


def inputs(base, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 9, 16, 16, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 1, base.unet.config.cross_attention_dim, generator=g))


@torch.no_grad()
def run(unet, base):
    x, t, c = inputs(base)
    return unet(x, t, encoder_hidden_states=c).sample


def fresh_unet(base):
    unet = UNet2DConditionModel.from_config(base.unet.config)
    unet.load_state_dict(base.unet.state_dict())
    return unet.eval()


def test_metadata_keys(trained, tmp_path):
    base, module, tensors, meta = trained
    path = export.write_file(tmp_path / "a.safetensors", export.cast(tensors, torch.float16), meta)
    with safe_open(path, "pt") as f:
        md = f.metadata()
        assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())  # fp16 by default
        assert all(k.startswith("unet.") for k in f.keys())
    for key in ("rank", "alpha", "target_modules", "base_fingerprint", "subject", "trainer_version", "created",
                "lora_adapter_metadata"):
        assert key in md
    assert json.loads(md["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert md["base_fingerprint"] == base.fingerprint() and float(md["train_alpha"]) == ALPHA
    config = json.loads(md["lora_adapter_metadata"])
    assert config["unet.r"] == RANK and config["unet.lora_alpha"] == float(md["alpha"])


@pytest.mark.parametrize("with_metadata", [False, True])
def test_plain_diffusers_unet_loads_the_same_adapter(trained, tmp_path, with_metadata):
    base, module, tensors, meta = trained
    path = export.write_file(tmp_path / "a.safetensors", export.cast(tensors, torch.float32), meta)
    ours = run(module.unet, base)
    unet = fresh_unet(base)
    # bare path: diffusers infers the config from shapes; use_safetensors=True: it reads lora_adapter_metadata
    unet.load_lora_adapter(path, prefix="unet", **({"use_safetensors": True} if with_metadata else {}))
    assert (run(unet, base) - ours).abs().max().item() <= 1e-5
    assert (run(base.unet, base) - ours).abs().max().item() > 1e-2  # the adapter matters


def test_stable_diffusion_inpaint_pipeline_load_lora_weights(trained, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    base, module, tensors, meta = trained
    path = export.write_file(tmp_path / "a.safetensors", export.cast(tensors, torch.float32), meta)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "mug</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    text = CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=base.unet.config.cross_attention_dim,
                                        intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                                        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pipe = StableDiffusionInpaintPipeline(vae=base.vae, text_encoder=text, tokenizer=tokenizer,
                                          unet=fresh_unet(base), scheduler=base.scheduler, safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name="a.safetensors")
    assert (run(pipe.unet, base) - run(module.unet, base)).abs().max().item() <= 1e-5


def test_subject_applied_matches_diffusers_and_restores_the_unet(trained, tmp_path):
    base, module, tensors, meta = trained
    path = export.write_file(tmp_path / "a.safetensors", export.cast(tensors, torch.float16), meta)
    subject = Subject.from_file(path)
    before = run(base.unet, base)
    keys = set(base.unet.state_dict())
    unet = fresh_unet(base)
    unet.load_lora_adapter(path, prefix="unet")
    with subject.applied(base):
        inside = run(base.unet, base)
    assert (inside - run(unet, base)).abs().max().item() <= 1e-5  # same fp16 file, same output
    assert (inside - run(module.unet, base)).abs().max().item() <= 1e-3  # fp16 storage vs fp32 training
    assert set(base.unet.state_dict()) == keys and torch.equal(run(base.unet, base), before)


def test_truncation_keeps_energy_and_loads_in_diffusers(trained, tmp_path):
    base, module, tensors, meta = trained
    exact, m1 = export.truncate(tensors, meta, 1.0)
    p1 = export.write_file(tmp_path / "t1.safetensors", exact, m1)
    u1 = fresh_unet(base)
    u1.load_lora_adapter(p1, prefix="unet")
    assert (run(u1, base) - run(module.unet, base)).abs().max().item() <= 1e-5

    low, m2 = export.truncate(tensors, meta, 0.6)
    ranks = {k: v.shape[0] for k, v in low.items() if k.endswith("lora_A.weight")}
    assert min(ranks.values()) < RANK and max(ranks.values()) <= RANK
    for key in ranks:  # kept energy >= 60% of each module's delta
        stem = key[: -len(".lora_A.weight")]
        full = tensors[f"{stem}.lora_B.weight"] @ tensors[f"{stem}.lora_A.weight"]
        cut = low[f"{stem}.lora_B.weight"] @ low[f"{stem}.lora_A.weight"]
        assert cut.norm() ** 2 >= 0.6 * full.norm() ** 2 - 1e-6
        assert (full - cut).norm() < full.norm()
    p2 = export.write_file(tmp_path / "t2.safetensors", low, m2)
    ours = Subject.from_file(p2)
    u2 = fresh_unet(base)
    u2.load_lora_adapter(p2, prefix="unet", use_safetensors=True)  # rank_pattern from the metadata
    u3 = fresh_unet(base)
    u3.load_lora_adapter(p2, prefix="unet")  # ranks inferred from the shapes
    with ours.applied(base):
        inside = run(base.unet, base)
    assert (run(u2, base) - inside).abs().max().item() <= 1e-5
    assert (run(u3, base) - inside).abs().max().item() <= 1e-5


def test_int8_storage_is_smaller_and_close(trained, tmp_path):
    base, module, tensors, meta = trained
    q, mq = export.quantize_int8(tensors, meta)
    assert all(v.dtype == torch.int8 for k, v in q.items() if k.endswith(".weight"))
    p16 = export.write_file(tmp_path / "f16.safetensors", export.cast(tensors), meta)
    p8 = export.write_file(tmp_path / "i8.safetensors", q, mq)
    assert os.path.getsize(p8) < os.path.getsize(p16)
    back, md = export.read_file(p8)
    assert md["quantization"].startswith("int8")
    for k, v in tensors.items():
        assert back[k].dtype == torch.float32
        err = (back[k] - v).abs().max()
        assert err <= v.abs().max() / 127 + 1e-6
    with Subject.from_file(p8).applied(base):
        out = run(base.unet, base)
    ref = run(module.unet, base)
    assert (out - ref).abs().max() < 0.05 * (ref - run(base.unet, base)).abs().max() + 1e-4


def test_corrupt_or_incomplete_files_are_refused(trained, tmp_path):
    base, module, tensors, meta = trained
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 32)
    with pytest.raises(export.AdapterFileError):
        export.read_file(bad)
    half = {k: v for k, v in tensors.items() if "lora_B" not in k}
    with pytest.raises(export.AdapterFileError):
        export.write_file(tmp_path / "half.safetensors", half, meta)
    assert not (tmp_path / "half.safetensors").exists()
    with pytest.raises(export.AdapterFileError):
        export.write_file(tmp_path / "nometa.safetensors", tensors, {"rank": "4"})


def test_conv_and_ff_targets_round_trip(tmp_path):
    """LoRA on 1x1/3x3 convs and feed-forward layers too (4-D factors): file, truncation and int8 all load."""
    base = ExemplarInpainter.tiny(0)
    targets = ("to_q", "to_v", "proj_in", "ff.net.2", "conv1")
    module = SubjectLoRAModule(base, rank=3, alpha=6, targets=targets, seed=2)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in module.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    module.unet.eval()
    tensors = export.fold_scale(module.lora_state_dict(), 3, 6)
    assert any(v.dim() == 4 for v in tensors.values())
    meta = export.build_metadata(rank=3, alpha=6, targets=targets, base_fingerprint=base.fingerprint())
    ours = run(module.unet, base)
    for name, kw in (("plain", {"dtype": torch.float32}), ("svd", {"dtype": torch.float32, "energy": 1.0})):
        stored, md = export.compress(tensors, meta, **kw)
        path = export.write_file(tmp_path / f"{name}.safetensors", stored, md)
        unet = fresh_unet(base)
        unet.load_lora_adapter(path, prefix="unet")
        assert (run(unet, base) - ours).abs().max().item() <= 1e-5, name
    stored, md = export.compress(tensors, meta, int8=True)
    path = export.write_file(tmp_path / "q.safetensors", stored, md)
    with Subject.from_file(path).applied(base):
        out = run(base.unet, base)
    assert (out - ours).abs().max() < 0.05 * (ours - run(base.unet, base)).abs().max()
