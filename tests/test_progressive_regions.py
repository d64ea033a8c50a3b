"""Several subjects in one pass: region weights, regional LoRA slots, regional cross-attention."""

import torch
import torch.nn.functional as F

from subjectpaint.base import ExemplarInpainter
from subjectpaint.sessions.regions import (RegionalGroupNorm, RegionWeights, region_weights, regional_group_norm,
                                           regional_processors)
from subjectpaint.slots import Slots

from .test_progressive import random_adapter


def test_region_weights_sum_to_one_and_follow_the_maps():
    maps = torch.zeros(3, 8, 12)
    maps[0, 1:4, 1:4] = 1.0
    maps[1, 4:7, 8:11] = 0.5
    maps[2, 4:7, 9:12] = 0.5  # overlaps region 1: blended 50/50 there
    w = region_weights(maps)
    assert torch.allclose(w.sum(0), torch.ones(8, 12))
    assert w[0, 2, 2] == 1 and w[1, 5, 8] == 1 and w[1, 5, 9] == 0.5 and w[2, 5, 11] == 1
    assert w[0, 0, 0] == 1 and w[2, 7, 11] == 1  # outside every region: the nearest one
    rw = RegionWeights(maps)
    for n, t in rw.by_tokens.items():
        assert t.shape == (n, 3) and torch.allclose(t.sum(1), torch.ones(n))
    assert {96, 24, 6, 2, 1} <= set(rw.by_tokens)  # 8x12, 4x6, 2x3, 1x2, 1x1
    with rw.conditioning():
        assert torch.equal(rw.for_tokens(3), torch.eye(3))


def test_regional_slots_give_each_token_its_regions_adapter():
    base = ExemplarInpainter.tiny(0)
    adapters = [random_adapter(base.unet, s, rank=4) for s in (1, 2)]  # before the slots replace the Linears
    slots = Slots(base.unet, max_rank=8)
    name, layer = next((n, m) for n, m in slots.layers.items() if n.endswith("attn1.to_q"))
    x = torch.randn(2, 6, layer.base.in_features)
    owner = torch.tensor([0, 1, 1, 0, 0, 1])
    weights = torch.nn.functional.one_hot(owner, 2).float()
    singles = []
    for a in adapters:
        slots.activate(a)
        singles.append(layer(x))
    slots.deactivate()
    with slots.regional(adapters, lambda inp: weights):
        got = layer(x)
    want = torch.where((owner == 0)[None, :, None], singles[0], singles[1])
    assert (singles[0] - singles[1]).abs().min() > 1e-4  # the two adapters really differ on this layer
    assert (got - want).abs().max() < 1e-5
    # soft weights blend the deltas linearly; a region without an adapter adds nothing
    half = torch.full((6, 2), 0.5)
    with slots.regional([adapters[0], None], lambda inp: half):
        blended = layer(x)
    plain = layer.base(x)
    assert (blended - (plain + 0.5 * (singles[0] - plain))).abs().max() < 1e-5
    assert torch.equal(layer(x), plain)  # regional mode is gone after the block


def test_regional_cross_attention_with_one_region_everywhere_is_that_exemplar():
    base = ExemplarInpainter.tiny(0)
    unet = base.unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 16, 16, generator=g)
    e = torch.randn(2, 2, 32, generator=g)  # two regions' tokens
    maps = torch.zeros(2, 16, 16)
    maps[1] = 1.0  # region 1 everywhere
    saved = unet.attn_processors
    with torch.no_grad():
        want = unet(x, 500, encoder_hidden_states=e[:, 1:]).sample
        unet.set_attn_processor(regional_processors(unet, RegionWeights(maps)))
        got = unet(x, 500, encoder_hidden_states=e).sample
        maps[1, :, :8], maps[0, :, :8] = 0.0, 1.0  # left half region 0: the output changes
        unet.set_attn_processor(regional_processors(unet, RegionWeights(maps)))
        split = unet(x, 500, encoder_hidden_states=e).sample
    unet.set_attn_processor(saved)
    assert (got - want).abs().max() < 1e-5
    assert (split - want).abs().max() > 1e-3


def test_regional_group_norm_is_group_norm_per_region_blended():
    # written plainly: region k's statistics over its own support and every position outside the other regions;
    # each position normalised by each region's statistics, blended by the region weights
    maps = torch.zeros(3, 16, 16)
    maps[0, 2:6, 2:8], maps[1, 10:14, 2:8], maps[2, 4:12, 10:16] = 1.0, 1.0, 0.6
    weights = RegionWeights(maps)
    norm = torch.nn.GroupNorm(4, 8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.normal_(generator=g), norm.bias.normal_(generator=g)
    for side in (16, 8):
        x = torch.randn(2, 8, side, side, generator=g) * 3 + 1
        inside = F.max_pool2d(maps[None], 16 // side)[0] > 0  # (3, side, side)
        w = weights.for_tokens(side * side).t().reshape(3, side, side)
        want = torch.zeros_like(x)
        for k in range(3):
            others = torch.stack([inside[j] for j in range(3) if j != k]).any(0)
            keep = inside[k] | ~others
            xs = x.reshape(2, 4, 2, side, side)
            sel = xs[..., keep]  # (2, 4, 2, n)
            mean = sel.mean((2, 3))[:, :, None, None, None]
            var = sel.var((2, 3), unbiased=False)[:, :, None, None, None]
            normed = ((xs - mean) / torch.sqrt(var + norm.eps)).reshape(x.shape)
            want += w[k] * (normed * norm.weight[None, :, None, None] + norm.bias[None, :, None, None])
        got = regional_group_norm(norm, weights, x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        assert (got - norm(x)).abs().max() > 1e-2  # and it is not the plain GroupNorm


def test_regional_group_norm_hook_with_one_region_is_the_unet_and_restores_it():
    base = ExemplarInpainter.tiny(0)
    unet = base.unet
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 16, 16, generator=g)
    e = torch.randn(2, 1, 32, generator=g)
    hook = RegionalGroupNorm(RegionWeights(torch.ones(1, 16, 16)))
    with torch.no_grad():
        want = unet(x, 500, encoder_hidden_states=e).sample
        hook.begin(unet, None)
        got = unet(x, 500, encoder_hidden_states=e).sample
        hook.end(unet)
        after = unet(x, 500, encoder_hidden_states=e).sample
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and not any("forward" in m.__dict__ for m in norms)
    assert (got - want).abs().max() < 1e-4 and torch.equal(after, want)
