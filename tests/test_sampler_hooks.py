"""The sampler's extension points: per-pixel start steps and attention processors."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from subjectpaint.images import load_mask, pil_to_tensor
from subjectpaint.sampler import AttentionProcessors, LatentStart, Sampler, SamplerHook


def run(base, scene, hooks=(), steps=4, scheduler="ddim"):
    room, mask, exemplar = scene
    emb, unc = base.encode_exemplar([exemplar])
    return Sampler(base, progress=False)(
        pil_to_tensor(room),
        load_mask(mask, room.size)[None, None],
        emb,
        uncond=unc,
        num_inference_steps=steps,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(0),
        hooks=list(hooks),
    )


@pytest.mark.parametrize("scheduler", ["ddim", "euler"])
def test_start_at_step_zero_everywhere_is_plain_sampling(tiny_base, scene, scheduler):
    plain = run(tiny_base, scene, scheduler=scheduler)
    source = torch.randn_like(plain.latents)
    start = LatentStart(torch.zeros(1, 1, *plain.latents.shape[-2:], dtype=torch.long), source)
    hooked = run(tiny_base, scene, [start], scheduler=scheduler)
    assert torch.equal(hooked.latents, plain.latents)


def test_never_started_pixels_keep_the_source_and_started_ones_move(tiny_base, scene):
    plain = run(tiny_base, scene)
    h, w = plain.latents.shape[-2:]
    source = torch.randn_like(plain.latents)
    start = torch.zeros(1, 1, h, w, dtype=torch.long)
    start[..., : h // 2, :] = 99  # top half never starts
    start[..., h // 2 :, : w // 2] = 2  # bottom-left starts at step 2 of 4
    out = run(tiny_base, scene, [LatentStart(start, source)]).latents
    top = (slice(None), slice(None), slice(0, h // 2))
    assert torch.equal(out[top], source[top])
    assert not torch.allclose(out[..., h // 2 :, :], source[..., h // 2 :, :])
    # late-starting pixels end closer to the source than pixels denoised from the start
    late = (out[..., h // 2 :, : w // 2] - source[..., h // 2 :, : w // 2]).abs().mean()
    early = (out[..., h // 2 :, w // 2 :] - source[..., h // 2 :, w // 2 :]).abs().mean()
    assert late < early


class Counting(AttnProcessor2_0):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
        self.calls += 1
        return super().__call__(attn, hidden_states, encoder_hidden_states, **kw)


def test_attention_processors_are_used_for_the_call_and_restored(tiny_base, scene):
    before = dict(tiny_base.unet.attn_processors)
    plain = run(tiny_base, scene)
    counter = Counting()
    hooked = run(tiny_base, scene, [AttentionProcessors(counter)])
    n_layers = len(before)
    assert counter.calls == n_layers * 4  # every attention layer, every step (CFG rows share one call)
    assert torch.allclose(hooked.latents, plain.latents, atol=1e-6)
    after = tiny_base.unet.attn_processors
    assert all(after[k] is before[k] for k in before)


def test_hooks_are_ended_even_when_the_loop_fails(tiny_base, scene):
    before = dict(tiny_base.unet.attn_processors)

    class Boom(SamplerHook):
        def before_step(self, i, t, latents):
            if i == 1:
                raise RuntimeError("boom")
            return latents

    with pytest.raises(RuntimeError, match="boom"):
        run(tiny_base, scene, [AttentionProcessors(Counting()), Boom()])
    after = tiny_base.unet.attn_processors
    assert all(after[k] is before[k] for k in before)
