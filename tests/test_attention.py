"""Attention processors: capture is free of side effects, injection is A_src V_tgt, the rest keeps SDPA."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from subjectpaint.attention import (
    AttentionControl,
    ControlledAttnProcessor,
    attention_layers,
    controlled_processors,
    layer_level,
    level_for,
)
from subjectpaint.base import ExemplarInpainter
from subjectpaint.errors import InvalidArgument


@pytest.fixture(scope="module")
def unet():
    return ExemplarInpainter.tiny(0).unet


def unet_inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 9, 16, 24, generator=g), torch.randn(batch, 1, 32, generator=g)


def run(unet, processors=None, batch=4):
    x, c = unet_inputs(batch)
    saved = unet.attn_processors
    if processors is not None:
        unet.set_attn_processor(dict(processors))  # diffusers consumes the dict it is given
    try:
        with torch.no_grad():
            return unet(x, 500, encoder_hidden_states=c).sample
    finally:
        unet.set_attn_processor(saved)


def test_layer_selection_by_kind_block_and_level(unet):
    self_all = attention_layers(unet, "self")
    assert self_all and all(n.endswith("attn1.processor") for n in self_all)
    assert all(n.endswith("attn2.processor") for n in attention_layers(unet, "cross"))
    up = attention_layers(unet, "self", blocks="up")
    assert up and all(n.startswith("up_blocks") for n in up)
    n_levels = len(unet.config.block_out_channels)  # tiny: levels 0 (16x24) and 1 (8x12)
    fine = attention_layers(unet, "self", levels={0})
    assert fine and all(layer_level(n, n_levels) == 0 for n in fine)
    assert "mid_block.attentions.0.transformer_blocks.0.attn1.processor" in attention_layers(unet, "self", levels={1})
    assert level_for(64, 32, 4) == 1 and level_for(16, 32, 3) == 0 and level_for(64, 16, 4) == 2
    with pytest.raises(InvalidArgument):
        attention_layers(unet, "both")
    with pytest.raises(InvalidArgument):
        attention_layers(unet, "self", blocks=("left",))
    with pytest.raises(InvalidArgument):
        controlled_processors(unet, AttentionControl(), capture=["nope.processor"])


def test_only_controlled_layers_are_replaced_the_rest_keep_sdpa(unet):
    control = AttentionControl(capture_rows=[2, 3])
    names = attention_layers(unet, "self", levels={0})
    procs = controlled_processors(unet, control, capture=names)
    for name, proc in procs.items():
        if name in names:
            assert isinstance(proc, ControlledAttnProcessor)
        else:
            assert type(proc) is AttnProcessor2_0


def test_capture_changes_no_bit_and_maps_are_row_stochastic(unet):
    plain = run(unet)
    control = AttentionControl(capture_rows=[2, 3], recording=True)
    selfs = attention_layers(unet, "self", levels={0})
    crosses = attention_layers(unet, "cross", levels={0})
    captured = run(unet, controlled_processors(unet, control, capture=selfs + crosses))
    assert torch.equal(captured, plain)
    maps = control.mean(control.self_maps, 16 * 24)
    assert maps.shape == (2, 384, 384)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 384), atol=1e-5)
    assert control.self_maps[384][1] == len(selfs)  # averaged over every captured layer
    scores = control.mean(control.scores, 384)
    assert scores.shape == (2, 384, 1)  # one condition token: softmax over it would be 1 everywhere
    assert scores[0].std() > 1e-3  # ... the pre-softmax scores vary with position


def test_not_recording_captures_nothing(unet):
    control = AttentionControl(capture_rows=[2, 3], recording=False)
    run(unet, controlled_processors(unet, control, capture=attention_layers(unet, "self")))
    assert not control.self_maps


def test_injection_is_source_attention_times_target_values():
    torch.manual_seed(0)
    from diffusers.models.attention_processor import Attention

    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 10, 16)  # rows [source, target]
    control = AttentionControl(pairs=[(0, 1)], injecting=True)
    attn.set_processor(ControlledAttnProcessor(control, inject=True))
    with torch.no_grad():
        out = attn(x)
        q = attn.to_q(x).view(2, 10, 2, 8).transpose(1, 2)
        k = attn.to_k(x).view(2, 10, 2, 8).transpose(1, 2)
        v = attn.to_v(x).view(2, 10, 2, 8).transpose(1, 2)
        a_src = (q[0] @ k[0].transpose(-1, -2) * attn.scale).softmax(-1)
        expected = attn.to_out[0]((a_src @ v[1]).transpose(0, 1).reshape(10, 16))
        attn.set_processor(AttnProcessor2_0())
        plain = attn(x)
    assert torch.allclose(out[1], expected, atol=1e-6)
    assert torch.equal(out[0], plain[0])  # the source row is untouched, bit for bit
    assert not torch.allclose(out[1], plain[1], atol=1e-4)


def test_injection_off_is_bit_exact_and_on_changes_only_target_rows(unet):
    plain = run(unet)
    control = AttentionControl(pairs=[(0, 1), (2, 3)], injecting=False)
    procs = controlled_processors(unet, control, inject=attention_layers(unet, "self", blocks="up"))
    assert torch.equal(run(unet, procs), plain)
    control.injecting = True
    injected = run(unet, procs)
    assert torch.equal(injected[[0, 2]], plain[[0, 2]])
    assert not torch.allclose(injected[[1, 3]], plain[[1, 3]], atol=1e-4)


def test_capture_among_a_subset_of_positions_is_the_full_map_restricted(unet):
    names = attention_layers(unet, "self", levels={0})
    full = AttentionControl(capture_rows=[2, 3], recording=True)
    run(unet, controlled_processors(unet, full, capture=names))
    index = torch.tensor([5, 30, 31, 200, 383])
    part = AttentionControl(capture_rows=[2, 3], recording=True, queries={384: index})
    run(unet, controlled_processors(unet, part, capture=names))
    expected = full.mean(full.self_maps, 384)[:, index][:, :, index]
    assert torch.allclose(part.mean(part.self_maps, 384), expected, atol=1e-6)
