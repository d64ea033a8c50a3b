"""Dual-branch session (ViMAEdit) on the tiny random base: parity with plain inpainting when its parts are off,
grounding math, adaptive variance, typed errors."""

import types

import numpy as np
import pytest
import torch

from subjectpaint.base import ExemplarInpainter
from subjectpaint.errors import InvalidArgument, InvalidImage, InvalidMask
from subjectpaint.images import load_mask, pil_to_tensor
from subjectpaint.sampler import Sampler
from subjectpaint.attention import AddedCondition, ControlledAttnProcessor, attention_layers, controlled_processors
from subjectpaint.attention import AttentionControl
from subjectpaint.sessions.dual_branch import DualBranchSession, invert, normalise, refine
from subjectpaint.slots import Adapter
from subjectpaint.studio import Studio
from tests.conftest import box_mask_image, random_image

STEPS = 4
OFF = dict(inject=False, adaptive_variance=False, guidance="interpolate", embedding_lambda=1.0, ground=False)


@pytest.fixture(scope="module")
def studio():
    return Studio(ExemplarInpainter.tiny(0))


@pytest.fixture(scope="module")
def job():
    return random_image(48, 32, 1), box_mask_image(48, 32, (10, 8, 30, 24)), random_image(40, 40, 2)


@pytest.fixture(scope="module")
def studio64():
    """The same tiny base in float64: parity is then exact up to ~1e-14 whatever the batch layout."""
    return Studio(ExemplarInpainter.tiny(0).to(dtype=torch.float64))


@pytest.fixture(scope="module")
def subject(studio, job):
    return random_subject(studio, job)


@pytest.fixture(scope="module")
def subject64(studio64, job):
    return random_subject(studio64, job)


def random_subject(studio, job):
    """A Subject-shaped object with a random LoRA adapter for the tiny UNet."""
    g = torch.Generator().manual_seed(5)
    factors = {}
    for name, module in studio.base.unet.named_modules():
        if name.endswith(("to_q", "to_k", "to_v", "to_out.0")) and hasattr(module, "weight"):
            out_f, in_f = module.weight.shape
            factors[name] = (torch.randn(4, in_f, generator=g) * 0.3, torch.randn(out_f, 4, generator=g) * 0.3, 1.0)
    adapter = Adapter(factors, name="random")
    return types.SimpleNamespace(exemplar=job[2], name="random", adapter=adapter, record=None)


def session(studio, **kw):
    return studio.dual_branch(steps=STEPS, resolution=48, **kw)


def plain_images(studio, job, subject=None):
    room, mask, exemplar = job
    emb, unc = studio.base.encode_exemplar([exemplar])
    with studio.subjects([subject]):
        return Sampler(studio.base, progress=False)(
            pil_to_tensor(room), load_mask(mask, room.size)[None, None], emb, uncond=unc,
            num_inference_steps=STEPS, scheduler="ddim", generator=[torch.Generator().manual_seed(3)],
        ).images


def test_session_factory_and_result(studio, job):
    room, mask, exemplar = job
    s = studio.dual_branch(steps=STEPS)
    assert isinstance(s, DualBranchSession)
    before = dict(studio.base.unet.attn_processors)
    out = session(studio).place(exemplar, room, mask)  # a plain PIL exemplar: no adapter
    after = studio.base.unet.attn_processors
    assert all(after[k] is before[k] for k in before)  # processors restored
    assert out.image.size == room.size and out.source.size == room.size
    assert out.grounded_mask.size == room.size and out.grounded_mask.mode == "L"
    grounded = np.asarray(out.grounded_mask) > 127
    user = np.asarray(mask) > 127
    assert grounded.any() and not (grounded & ~user).any()  # grounded inside the user's mask
    assert out.saliency.shape == (16, 24)  # latent size (the tiny VAE downsamples 2x)
    assert 0 <= float(out.saliency.min()) <= float(out.saliency.max()) <= 1
    assert out.info["grounded_steps"] == STEPS - 1  # blend_start 0.2 of 4 steps: from step 1
    # paste-back: far from the mask the result is the room itself
    far = np.ones_like(user)
    far[2:30, 4:36] = False
    assert np.array_equal(np.asarray(out.image)[far], np.asarray(room)[far])
    grid = out.grid(height=64)
    assert grid.height > 64 and grid.width > 5 * 64


def test_target_equals_plain_inpainting_with_its_parts_off(studio64, job, subject64):
    """Must-show 1: injection off, adaptive variance off, lambda 1 (and no per-step blend): the target branch is
    plain exemplar inpainting with the same seed, scheduler and steps -- also with an adapter in a mixed batch
    (source row without it). In float64, so the two-row batch and the one-row reference differ by rounding only."""
    studio, subject = studio64, subject64
    room, mask, _ = job
    for subj in (None, subject):
        reference = plain_images(studio, job, subj)
        given = subj if subj is not None else job[2]
        out = session(studio, seed=3, **OFF).place(given, room, mask)
        assert out.branches[1].dtype == torch.float64
        assert (out.branches[1] - reference[0]).abs().max() <= 1e-5
        plain = studio.inpaint(room, mask, given, steps=STEPS, scheduler="ddim", seed=3, resolution=48, progress=False)
        assert np.array_equal(np.asarray(out.image), np.asarray(plain.image))
    with_adapter = session(studio, seed=3, **OFF).place(subject, room, mask).branches[1]
    without = session(studio, seed=3, **OFF).place(job[2], room, mask).branches[1]
    assert (with_adapter - without).abs().max() > 1e-3  # the adapter did act on the target row


@pytest.mark.parametrize("part", [dict(inject=True), dict(embedding_lambda=0.4), dict(ground=True),
                                  dict(guidance="attention"), dict(source="inversion")])
def test_each_part_changes_the_target(studio, job, part):
    room, mask, exemplar = job
    base = session(studio, seed=3, **OFF).place(exemplar, room, mask).branches[1]
    changed = session(studio, seed=3, **{**OFF, **part}).place(exemplar, room, mask).branches[1]
    assert (changed - base).abs().max() > 1e-3


def test_source_branch_is_shared_noise_reconstruction(studio, job):
    """The source row is the same for any subject: no adapter, e_src, an empty mask."""
    room, mask, exemplar = job
    a = session(studio, seed=3, inject=False, ground=False, adaptive_variance=False).place(exemplar, room, mask)
    b = session(studio, seed=3, inject=False, ground=False, adaptive_variance=False).place(random_image(40, 40, 9), room, mask)
    assert torch.equal(a.branches[0], b.branches[0])
    assert not torch.equal(a.branches[1], b.branches[1])


def test_grounding_blends_source_outside_the_grounded_mask(studio, job):
    room, mask, exemplar = job
    out = session(studio, seed=3, adaptive_variance=False).place(exemplar, room, mask)
    # the last blend (eq. 6): target latents equal the source's wherever the last grounded mask is 0
    user = torch.nn.functional.interpolate(load_mask(mask, room.size)[None, None], size=(16, 24))[0, 0]
    latent_mask = (out.saliency > 0.5) & (user > 0)
    src, tgt = out.latents[0], out.latents[1]
    assert torch.equal(tgt[:, ~latent_mask], src[:, ~latent_mask])
    assert not torch.equal(tgt[:, latent_mask], src[:, latent_mask])


def test_adaptive_variance_zero_scale_is_deterministic_and_nonzero_differs(studio, job):
    room, mask, exemplar = job
    off = session(studio, seed=3, adaptive_variance=False).place(exemplar, room, mask)
    zero = session(studio, seed=3, variance_scale=0.0).place(exemplar, room, mask)
    on = session(studio, seed=3).place(exemplar, room, mask)
    assert torch.equal(off.latents, zero.latents)
    assert (on.latents - off.latents).abs().max() > 1e-3
    again = session(studio, seed=3).place(exemplar, room, mask)
    assert torch.equal(on.latents, again.latents)  # seeded: the stochastic steps repeat


def test_refine_is_eq9():
    s = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    assert torch.equal(refine(s, torch.eye(4)[None]), s)  # no relations: unchanged
    assert torch.equal(refine(s, torch.full((1, 4, 4), 0.25), gamma=1.0), s)  # gamma 1: unchanged
    uniform = refine(s, torch.full((1, 4, 4), 0.25), gamma=0.5, iterations=1)
    assert torch.allclose(uniform, torch.tensor([[0.625, 0.125, 0.125, 0.125]]))
    chain = torch.tensor([[[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]]])
    out = refine(s, chain, gamma=0.5, iterations=5)  # saliency spreads to related patches only
    assert out[0, 1] > 0.4 and out[0, 2] == 0 and out[0, 3] == 0
    inside = torch.tensor([True, True, False, True])
    assert torch.equal(normalise(torch.tensor([2.0, 4.0, 9.0, 3.0]), inside), torch.tensor([0.0, 1.0, 0.0, 0.5]))


@pytest.mark.parametrize("bad", [
    dict(embedding_lambda=-0.1), dict(guidance="prompt"), dict(source="noise"),
    dict(source="inversion", scheduler="pndm", adaptive_variance=False),
    dict(gamma=1.5), dict(iterations=-1), dict(threshold=0.0), dict(threshold=1.0),
    dict(variance_threshold=2.0), dict(variance_scale=-1.0), dict(saliency="cross"), dict(inject_steps=(0.6, 0.2)),
    dict(inject_blocks=("left",)), dict(blend_start=1.5), dict(steps=0), dict(seed=-1), dict(scheduler="euler"), dict(guidance_scale=float("nan")),
    dict(no_such_setting=1),
])
def test_bad_parameters_are_typed_errors(studio, job, bad):
    room, mask, exemplar = job
    with pytest.raises(InvalidArgument):
        studio.dual_branch(**bad)
    with pytest.raises(InvalidArgument):
        session(studio).place(exemplar, room, mask, **bad)


def test_bad_inputs_are_typed_errors(studio, job):
    room, mask, exemplar = job
    with pytest.raises(InvalidMask):
        session(studio).place(exemplar, room, box_mask_image(48, 32, (0, 0, 0, 0)))
    with pytest.raises(InvalidImage):
        session(studio).place(random_image(8, 8, 0).point(lambda _: 7), room, mask)
    assert session(studio, scheduler="euler", adaptive_variance=False).place(exemplar, room, mask).image.size == room.size


def test_scores_saliency_grounds_inside_the_mask_and_differs_from_noise(studio, job):
    room, mask, exemplar = job
    scores = session(studio, seed=3, saliency="scores").place(exemplar, room, mask)
    noise = session(studio, seed=3, saliency="noise").place(exemplar, room, mask)
    grounded = np.asarray(scores.grounded_mask) > 127
    assert grounded.any() and not (grounded & ~(np.asarray(mask) > 127)).any()
    assert not torch.equal(scores.saliency, noise.saliency)


# ------------------------------------------------------------------------------------------ added attention path


def test_added_path_is_lambda_softmax_qk_v_on_top_of_the_condition():
    """Eq. 8: out = to_out(softmax(Q K^T) V + lambda softmax(Q K'^T) V'), K', V' the layer's projections of the
    added condition, on the named rows only."""
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8).eval()
    x, cond, extra = torch.randn(3, 10, 16), torch.randn(3, 1, 12), torch.randn(1, 3, 12)
    added = AddedCondition(extra, rows=[2], scale=0.7)
    with torch.no_grad():
        attn.set_processor(ControlledAttnProcessor(AttentionControl(), added=added))
        out = attn(x, encoder_hidden_states=cond)
        attn.set_processor(AttnProcessor2_0())
        plain = attn(x, encoder_hidden_states=cond)
        q = attn.to_q(x[2]).view(10, 2, 8).transpose(0, 1)
        k, v = (f(cond[2]).view(1, 2, 8).transpose(0, 1) for f in (attn.to_k, attn.to_v))
        k2, v2 = (f(extra[0]).view(3, 2, 8).transpose(0, 1) for f in (attn.to_k, attn.to_v))
        main = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1) @ v
        side = (q @ k2.transpose(-1, -2) * attn.scale).softmax(-1) @ v2
        expected = attn.to_out[0]((main + 0.7 * side).transpose(0, 1).reshape(10, 16))
    assert torch.allclose(out[2], expected, atol=1e-6)
    assert torch.equal(out[:2], plain[:2])  # other rows: untouched, bit for bit
    assert not torch.allclose(out[2], plain[2], atol=1e-3)


def test_added_path_at_lambda_zero_is_the_plain_unet(studio):
    """Must-show: the lambda-scaled path on every cross-attention layer, lambda = 0, is the plain UNet bit for bit;
    lambda > 0 changes only the row it is given."""
    unet = studio.base.unet
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(4, 9, 16, 24, generator=g), torch.randn(4, 1, 32, generator=g)
    e = torch.randn(1, 1, 32, generator=g)

    def run(scale):
        saved = unet.attn_processors
        if scale is not None:
            added = AddedCondition(e, rows=[3], scale=scale)
            unet.set_attn_processor(controlled_processors(unet, AttentionControl(), added=added,
                                                          added_layers=attention_layers(unet, "cross")))
        try:
            with torch.no_grad():
                return unet(x, 500, encoder_hidden_states=c).sample
        finally:
            unet.set_attn_processor(saved)

    plain = run(None)
    assert torch.equal(run(0.0), plain)
    guided = run(0.5)
    assert torch.equal(guided[:3], plain[:3])
    assert (guided[3] - plain[3]).abs().max() > 1e-3


def test_attention_guidance_at_lambda_zero_is_the_source_condition(studio, job):
    """In the session: the added path at lambda 0 gives the target what interpolation at lambda 0 gives it (the
    source condition alone), and the subject then changes nothing; at lambda > 0 it does."""
    room, mask, exemplar = job
    kw = dict(seed=3, inject=False, ground=False, adaptive_variance=False)
    a = session(studio, guidance="attention", embedding_lambda=0.0, **kw).place(exemplar, room, mask)
    b = session(studio, guidance="interpolate", embedding_lambda=0.0, **kw).place(exemplar, room, mask)
    assert torch.equal(a.branches, b.branches)
    c = session(studio, guidance="attention", embedding_lambda=1.0, **kw).place(exemplar, room, mask)
    assert torch.equal(c.branches[0], a.branches[0])  # the source row never sees the subject
    assert (c.branches[1] - a.branches[1]).abs().max() > 1e-3


def test_inversion_is_ddim_run_backwards(studio):
    """One-step check of the inversion against DDIM's formula written out: z_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps,
    x0 = (z_prev - sqrt(1 - a_prev) eps) / sqrt(a_prev), eps the UNet's at t; and the room's inversion lands far
    from its latent (it is noise-like), deterministic."""
    from subjectpaint.sampler import make_scheduler

    base = studio.base
    g = torch.Generator().manual_seed(1)
    z0, masked = torch.randn(1, 4, 16, 24, generator=g), torch.randn(1, 4, 16, 24, generator=g)
    e = torch.randn(1, 1, 32, generator=g)
    zT = invert(base.unet, z0, masked, e, 1, base.scheduler.config)
    ddim = make_scheduler("ddim", base.scheduler.config)
    ddim.set_timesteps(1)
    t = ddim.timesteps[0]
    with torch.no_grad():
        eps = base.unet(torch.cat([z0, masked, torch.ones_like(z0[:, :1])], 1), t, encoder_hidden_states=e).sample
    a_t, a_prev = ddim.alphas_cumprod[t], ddim.final_alpha_cumprod  # the step before the first: alpha 1 ("t = -1")
    x0 = (z0 - (1 - a_prev) ** 0.5 * eps) / a_prev**0.5
    expected = a_t**0.5 * x0 + (1 - a_t) ** 0.5 * eps
    assert torch.allclose(zT, expected, atol=1e-5)
    assert torch.equal(invert(base.unet, z0, masked, e, 1, base.scheduler.config), zT)
