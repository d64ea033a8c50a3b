"""Attention processors that capture attention maps and inject source attention into a target branch.

Only the layers that capture or inject are replaced; every other layer keeps its processor (diffusers'
`AttnProcessor2_0`, the SDPA fast path). A replaced layer still computes its output with one
`F.scaled_dot_product_attention` call on the whole batch, exactly as `AttnProcessor2_0` does, so capturing alone
never changes a single bit of the UNet output, and injection stays on the fast path too (the target rows attend
with the source rows' queries and keys). An explicit softmax is computed only for the captured rows, only while
the control is recording:

- self-attention capture: the softmaxed maps A = softmax(Q K^T / sqrt(d)), averaged over heads and layers
  (ViMAEdit's inter-patch relationship matrix), accumulated per batch row; optionally only among a subset of
  positions (`AttentionControl.queries`, e.g. those inside the user's mask: the rows of A for those queries,
  softmaxed over all keys, then restricted to the same key columns), which costs that fraction of the maps;
- cross-attention score capture: the *pre-softmax* scores Q K^T / sqrt(d) (Paint by Example conditions on ONE
  token, so the softmaxed map is identically 1 and carries no location; the scores do);
- self-attention injection (ViMAEdit eq. 5): target row r gets A_src V_tgt, with A_src the map of its source row
  (a layer that captures and injects captures the injected map: the target branch's map there is A_src).

A cross-attention layer may also get an added attention path (ViMAEdit eq. 8, IP-Adapter's decoupled
cross-attention): out = Attention(Q, K, V) + lambda softmax(Q K'^T / sqrt(d)) V', with K', V' the layer's own
key / value projections of an added condition (`AddedCondition`: the subject's image embedding) on the UNet rows
it names; the main condition (K, V) is kept. Paint by Example has no IP-Adapter weights, so the added path shares
the layer's to_k / to_v (the UNet is not changed); at lambda = 0 the layer's output is bit for bit diffusers'.

The batch layout is the sampler's: with classifier-free guidance the UNet sees [uncond rows; cond rows], so a
dual-branch batch [source, target] becomes [src_u, tgt_u, src_c, tgt_c] and the injection pairs are
(0 -> 1), (2 -> 3). `AttentionControl` holds that layout and what was captured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor2_0

from .errors import InvalidArgument

BLOCKS = ("down", "mid", "up")


# ------------------------------------------------------------------------------------------ layers


def layer_level(name: str, n_levels: int) -> int:
    """How many times the latent is downsampled at the attention layer `name` (a UNet processor name)."""
    head = name.split(".")[0]
    if head == "mid_block":
        return n_levels - 1
    k = int(name.split(".")[1])
    return k if head == "down_blocks" else n_levels - 1 - k


def attention_layers(unet, kind: str = "self", blocks=BLOCKS, levels=None) -> list[str]:
    """Processor names of the UNet's self- (attn1) or cross- (attn2) attention layers in `blocks`
    ("down", "mid", "up") at downsampling `levels` (None: all)."""
    if kind not in ("self", "cross"):
        raise InvalidArgument(f"kind must be 'self' or 'cross', got {kind!r}")
    blocks = (blocks,) if isinstance(blocks, str) else tuple(blocks)
    if any(b not in BLOCKS for b in blocks):
        raise InvalidArgument(f"blocks must be among {BLOCKS}, got {blocks!r}")
    n = len(unet.config.block_out_channels)
    leaf = "attn1.processor" if kind == "self" else "attn2.processor"
    names = []
    for name in unet.attn_processors:
        if not name.endswith(leaf) or name.split(".")[0].split("_")[0] not in blocks:
            continue
        if levels is not None and layer_level(name, n) not in levels:
            continue
        names.append(name)
    return names


def level_for(latent_side: int, side: int, n_levels: int) -> int:
    """The downsampling level whose attention maps are at most `side` x `side` (the finest such level)."""
    level = max(0, math.ceil(math.log2(max(1, latent_side) / side)))
    return min(level, n_levels - 1)


# ------------------------------------------------------------------------------------------ control


@dataclass
class AttentionControl:
    """Shared by the processors of one sampler call. `pairs`: (source row, target row) of the UNet batch
    for injection; `capture_rows`: the UNet rows whose maps are captured. The session flips `recording` and
    `injecting` per step and reads `self_maps` / `scores`."""

    pairs: list[tuple[int, int]] = field(default_factory=list)
    capture_rows: list[int] = field(default_factory=list)
    queries: dict = field(default_factory=dict)  # tokens N -> LongTensor of the query positions to capture
    recording: bool = False
    injecting: bool = False
    self_maps: dict = field(default_factory=dict)  # tokens N -> (sum of (R, N, N) maps, count)
    scores: dict = field(default_factory=dict)  # tokens N -> (sum of (R, N, T) scores, count)

    def reset(self) -> None:
        self.self_maps.clear()
        self.scores.clear()

    @staticmethod
    def _add(store: dict, tokens: int, value: torch.Tensor) -> None:
        total, count = store.get(tokens, (0.0, 0))
        store[tokens] = (total + value, count + 1)

    @staticmethod
    def mean(store: dict, tokens: int) -> torch.Tensor | None:
        """The captured maps at `tokens` query positions, averaged over layers (None: nothing captured)."""
        if tokens not in store:
            return None
        total, count = store[tokens]
        return total / count


@dataclass
class AddedCondition:
    """The added cross-attention path's condition: `embeddings` (R, T', D) for the UNet rows `rows` (R of them,
    in the sampler's CFG layout), scaled by `scale` (lambda); the other rows get nothing added."""

    embeddings: torch.Tensor
    rows: list[int]
    scale: float = 1.0

    def __post_init__(self):
        if self.embeddings.ndim != 3 or self.embeddings.shape[0] != len(self.rows):
            raise InvalidArgument(f"added embeddings must be (len(rows), T, D); got {tuple(self.embeddings.shape)}")

    def attend(self, attn, query: torch.Tensor) -> torch.Tensor:
        """lambda softmax(Q K'^T / sqrt(d)) V' for `query` (B, heads, N, d): (B, heads, N, d), zero off `rows`."""
        e = self.embeddings.to(device=query.device, dtype=query.dtype)
        if attn.norm_cross:
            e = attn.norm_encoder_hidden_states(e)
        heads, d = query.shape[1], query.shape[-1]
        k = attn.to_k(e).view(e.shape[0], -1, heads, d).transpose(1, 2)
        v = attn.to_v(e).view(e.shape[0], -1, heads, d).transpose(1, 2)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        added = F.scaled_dot_product_attention(query[self.rows], k, v, dropout_p=0.0, is_causal=False)
        out = torch.zeros_like(query)
        out[self.rows] = self.scale * added
        return out


class ControlledAttnProcessor(AttnProcessor2_0):
    """`AttnProcessor2_0` plus capture (self maps or cross scores), self-attention injection and an added
    cross-attention path."""

    def __init__(self, control: AttentionControl, capture: bool = False, inject: bool = False,
                 added: AddedCondition | None = None):
        super().__init__()
        self.control, self.capture, self.inject, self.added = control, capture, inject, added

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        is_cross = encoder_hidden_states is not None
        batch_size, sequence_length, _ = hidden_states.shape if not is_cross else encoder_hidden_states.shape
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if not is_cross:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        c = self.control
        if self.inject and c.injecting and c.pairs and not is_cross:
            # eq. 5, A_src V_tgt = softmax(Q_src K_src^T / sqrt(d)) V_tgt: the target rows attend with the source
            # rows' queries and keys; still one SDPA call (the fast path), source rows untouched
            query, key = query.clone(), key.clone()
            for src, tgt in c.pairs:
                query[tgt], key[tgt] = query[src], key[src]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)
        if self.added is not None and is_cross:
            out = out + self.added.attend(attn, query)  # eq. 8, on top of the kept condition
        if self.capture and c.recording and c.capture_rows:
            self._capture(attn, query, key, attention_mask, is_cross)

        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def _capture(self, attn, query, key, attention_mask, is_cross):
        """Self-attention: softmaxed maps of the capture rows, mean over heads -- only the query rows listed in
        `control.queries[N]` (if any) and, after the softmax over all keys, only the same key columns;
        cross-attention: the pre-softmax scores (one map per condition token), mean over heads. Explicit, but
        only for the captured rows."""
        c, n = self.control, query.shape[2]
        rows = c.capture_rows
        if rows == list(range(rows[0], rows[0] + len(rows))):
            rows = slice(rows[0], rows[0] + len(rows))  # a view, not a gather
        q, k = query[rows], key[rows]
        if is_cross:
            c._add(c.scores, n, ((q @ k.transpose(-1, -2)) * attn.scale).float().mean(1))
            return
        index = c.queries.get(n)
        if index is not None:
            q = q[:, :, index]
        logits = (q * attn.scale) @ k.transpose(-1, -2)
        if attention_mask is not None:
            mask = attention_mask[rows]
            logits = logits + (mask if index is None or mask.shape[-2] == 1 else mask[:, :, index])
        probs = logits.softmax(dim=-1)
        if index is not None:
            probs = probs[..., index]
        c._add(c.self_maps, n, probs.float().mean(1))


def controlled_processors(unet, control: AttentionControl, capture=(), inject=(), added: AddedCondition | None = None,
                          added_layers=()) -> dict:
    """A full processor dict for `unet.set_attn_processor`: the named layers get a `ControlledAttnProcessor`
    (capturing if in `capture`, injecting if in `inject`, with the added cross-attention path if in
    `added_layers`); every other layer keeps its current processor."""
    capture, inject, added_layers = set(capture), set(inject), set(added_layers) if added is not None else set()
    known = set(unet.attn_processors)
    unknown = (capture | inject | added_layers) - known
    if unknown:
        raise InvalidArgument(f"no attention layer named {sorted(unknown)[0]!r} in this UNet")
    out = {}
    for name, proc in unet.attn_processors.items():
        if name in capture or name in inject or name in added_layers:
            out[name] = ControlledAttnProcessor(control, capture=name in capture, inject=name in inject,
                                                added=added if name in added_layers else None)
        else:
            out[name] = proc
    return out
