"""Hot-swap LoRA slots: injected once at a maximum rank; a swap is one in-place tensor copy.

Every target Linear (by default the UNet attention projections to_q, to_k, to_v, to_out.0) is wrapped once in
a `SlotLinear` whose LoRA factors are *views into one buffer* shared by all slots. The buffer is rank-major:
row i holds the i-th rank component of every layer, [A_1[i] | B_1^T[i] | A_2[i] | B_2^T[i] | ...], so the first r
rows are a complete rank-r LoRA. An adapter is laid out once (`Slots.layout`) as its own r rows -- B transposed and
pre-multiplied by the adapter's scale, layers the adapter leaves out zero -- and `activate` is a single `copy_` of
those r rows (plus zeroing the rows a higher-rank predecessor used): a swap moves r/max_rank of the buffer,
whatever the number of layers. Nothing is created or deleted per swap.

Like PEFT's LoRA layer, a slot adds `B(A(x))` to the base output; it does nothing else. `deactivate()` skips the
addition entirely, so the output is the base's bit for bit. A mixed batch (several subjects in one UNet call)
stacks K laid-out adapters into a bank; each row gathers its own factors by index and the delta is one
`bmm` pair per layer (no Python loop over rows). A regional pass (several subjects in ONE image) stacks K adapters
as one rank-K*R factor pair per layer and scales each rank block per token by its region weight
(`Slots.regional`, used by the progressive session's `place_many`).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from adapters_store import adapter_file

from .base import LORA_TARGETS
from .errors import BaseMismatch, InvalidAdapter

DEFAULT_TARGETS = LORA_TARGETS


# ------------------------------------------------------------------------------------------- adapters


@dataclass
class Adapter:
    """LoRA factors keyed by the UNet module path: {path: (A (r, in), B (out, r), scale)}."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    base_fingerprint: str | None = None
    name: str = "adapter"
    metadata: dict = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.factors.values())

    @classmethod
    def from_state_dict(cls, state_dict: dict, metadata: dict | None = None, name: str = "adapter") -> "Adapter":
        """Any LoRA state dict `adapters_store.adapter_file` reads (PEFT / diffusers keys with or without the
        `unet.` prefix, old diffusers, kohya; int8 dequantized), converted once."""
        metadata = dict(metadata or {})
        return cls(adapter_file.lora_factors(state_dict, metadata), metadata.get("base_fingerprint"), name, metadata)

    @classmethod
    def from_file(cls, path, name: str | None = None) -> "Adapter":
        tensors, metadata = adapter_file.read_raw(path)
        return cls.from_state_dict(tensors, metadata, name or str(path))


# ---------------------------------------------------------------------------------------------- slots


class _SlotState:
    """Shared by every slot of one UNet: flipping `active` or setting `rows` is O(1)."""

    active = False
    rows: torch.Tensor | None = None  # (B,) adapter index per batch row (mixed batches)
    regions: "Regional | None" = None  # per-token adapter weights (several subjects in one image)


class SlotLinear(nn.Module):
    """base(x) + B(A(x)); A and B^T are views into the shared buffer's rows. Scale is folded into B."""

    def __init__(self, base: nn.Linear, state: _SlotState, A: torch.Tensor, Bt: torch.Tensor, columns):
        super().__init__()
        self.base, self.state = base, state
        self.A, self.Bt = A, Bt  # (R, in), (R, out) views, not parameters: swapping never touches the graph
        self.columns = columns  # (a0, a1, b0, b1): this layer's columns in a laid-out row, for the bank views
        self.bank_A: torch.Tensor | None = None
        self.bank_Bt: torch.Tensor | None = None

    @property
    def weight(self):  # attention processors read the projection's weight dtype / device
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        state = self.state
        if state.rows is not None:
            rows = state.rows
            if x.shape[0] != rows.shape[0]:  # classifier-free guidance doubled the batch: [uncond; cond]
                rows = rows.repeat(x.shape[0] // rows.shape[0])
            a, bt = self.bank_A[rows], self.bank_Bt[rows]  # (N, R, in), (N, R, out)
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            delta = torch.bmm(torch.bmm(flat, a.transpose(1, 2)), bt)
            return out + delta.reshape(out.shape)
        if state.regions is not None:
            return out + state.regions.delta(self, x)
        if state.active:
            # the same bmm pair at the same (max) rank as the mixed path (A, B broadcast over rows), so a mixed
            # batch and a single-subject batch round identically; rows past the adapter's rank are zero
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            n = flat.shape[0]
            delta = torch.bmm(torch.bmm(flat, self.A.t().expand(n, -1, -1)), self.Bt.expand(n, -1, -1))
            return out + delta.reshape(out.shape)
        return out


class Slots:
    """LoRA slots over a UNet. `activate(adapter)` / `deactivate()` / `with slots.mixed(adapters, rows)`."""

    def __init__(self, unet: nn.Module, max_rank: int = 16, targets=DEFAULT_TARGETS, fingerprint: str | None = None):
        self.unet, self.max_rank, self.targets = unet, int(max_rank), tuple(targets)
        self.fingerprint = fingerprint
        self.state = _SlotState()
        self.active_name: str | None = None
        modules = [(n, m) for n, m in unet.named_modules() if isinstance(m, nn.Linear) and _is_target(n, self.targets)]
        if not modules:
            raise InvalidAdapter(f"no Linear modules match the targets {self.targets}")
        param = next(unet.parameters())
        self.shapes: dict[str, tuple[int, int]] = {}
        self.columns: dict[str, tuple[int, int, int, int]] = {}
        width = 0
        for name, lin in modules:
            out_f, in_f = lin.weight.shape
            self.shapes[name] = (in_f, out_f)
            self.columns[name] = (width, width + in_f, width + in_f, width + in_f + out_f)
            width += in_f + out_f
        self.width = width
        self.flat = torch.zeros(self.max_rank, width, device=param.device, dtype=param.dtype)
        self._used = 0  # rows of `flat` that may be non-zero
        self.layers: dict[str, SlotLinear] = {}
        for name, lin in modules:
            a0, a1, b0, b1 = self.columns[name]
            slot = SlotLinear(lin, self.state, self.flat[:, a0:a1], self.flat[:, b0:b1], self.columns[name])
            parent_name, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent_name) if parent_name else unet, child, slot)
            self.layers[name] = slot

    # ------------------------------------------------------------------ layout (once per adapter)

    def layout(self, adapter: Adapter) -> torch.Tensor:
        """Check every name, shape, rank and the base fingerprint, then lay the adapter out as its own rank rows
        of the slots' buffer: (rank, width), A as is, B transposed and scaled, layers it leaves out (and rank
        components a lower-rank layer lacks) zero. Raises before anything is touched."""
        if adapter.base_fingerprint and self.fingerprint and adapter.base_fingerprint != self.fingerprint:
            raise BaseMismatch(
                f"adapter {adapter.name!r} was trained for base {adapter.base_fingerprint[:12]}..., "
                f"this base is {self.fingerprint[:12]}..."
            )
        if not adapter.factors:
            raise InvalidAdapter(f"adapter {adapter.name!r} has no LoRA factors")
        for path, (a, b, _) in adapter.factors.items():
            if path not in self.shapes:
                raise InvalidAdapter(f"adapter {adapter.name!r} targets {path!r}, which has no slot in this UNet")
            in_f, out_f = self.shapes[path]
            r = a.shape[0]
            if r > self.max_rank:
                raise InvalidAdapter(f"adapter {adapter.name!r} has rank {r} > the slots' max rank {self.max_rank}")
            if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
                raise InvalidAdapter(
                    f"adapter {adapter.name!r}: {path} factors {tuple(a.shape)}/{tuple(b.shape)} do not fit "
                    f"a {in_f}->{out_f} projection"
                )
        rank = adapter.rank
        laid = torch.empty(rank, self.width, device=self.flat.device, dtype=self.flat.dtype)
        for path, (a0, _, _, b1) in self.columns.items():
            if path not in adapter.factors:
                laid[:, a0:b1] = 0
        for path, (a, b, scale) in adapter.factors.items():
            a0, a1, b0, b1 = self.columns[path]
            r = a.shape[0]
            laid[:r, a0:a1] = a
            laid[:r, b0:b1] = (b.float() * scale).t()
            if r < rank:
                laid[r:, a0:b1] = 0
        # NaN/inf propagate into the sum: one reduction over the laid-out rows instead of two checks per target
        # (the exact check runs only when the sum is not finite, e.g. a sum that overflowed)
        if not torch.isfinite(laid.sum()) and not torch.isfinite(laid).all():
            bad = [p for p, (a, b, sc) in adapter.factors.items()
                   if not (a.isfinite().all() and b.isfinite().all() and math.isfinite(sc))]
            raise InvalidAdapter(f"adapter {adapter.name!r}: {', '.join(bad[:3]) or 'its scale'} has non-finite values")
        return laid

    def _check_laid(self, laid: torch.Tensor) -> None:
        if laid.ndim != 2 or laid.shape[1] != self.width or not 1 <= laid.shape[0] <= self.max_rank:
            raise InvalidAdapter(f"a laid-out adapter is (rank <= {self.max_rank}, {self.width}); "
                                 f"got {tuple(laid.shape)}")

    def _bank(self, laid: list[torch.Tensor | None]) -> torch.Tensor:
        """(K, max_rank, width): the adapters' rows, zero-padded (to the max rank, as the active slots compute);
        None is no adapter (all zero)."""
        for t in laid:
            if t is not None:
                self._check_laid(t)
        bank = self.flat.new_zeros(len(laid), self.max_rank, self.width)
        for k, t in enumerate(laid):
            if t is not None:
                bank[k, : t.shape[0]] = t
        return bank

    # ------------------------------------------------------------------ swap

    def activate(self, adapter: Adapter | torch.Tensor, name: str | None = None) -> None:
        """Make `adapter` (an Adapter, or a tensor from `layout`) the active one: one in-place copy of its rows."""
        laid = adapter if isinstance(adapter, torch.Tensor) else self.layout(adapter)
        self._check_laid(laid)
        r = laid.shape[0]
        self.flat[:r].copy_(laid, non_blocking=True)
        if self._used > r:  # the previous adapter's extra rank rows
            self.flat[r:self._used].zero_()
        self._used = r
        self.state.active = True
        self.active_name = name or getattr(adapter, "name", "adapter")

    def deactivate(self) -> None:
        self.state.active = False
        self.active_name = None

    @contextlib.contextmanager
    def mixed(self, adapters: list[Adapter | torch.Tensor], rows: torch.Tensor):
        """Within the block, batch row i uses adapters[rows[i]] (-1: none). Adapters are stacked once."""
        laid = [a if isinstance(a, torch.Tensor) else self.layout(a) for a in adapters]
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.flat.device)
        if rows.ndim != 1 or (rows >= len(laid)).any() or (rows < -1).any():
            raise InvalidAdapter(f"rows must index the {len(laid)} adapters (or -1 for none)")
        bank = self._bank(laid + [None])  # the last entry: no adapter
        rows = torch.where(rows < 0, torch.full_like(rows, len(laid)), rows)
        for slot in self.layers.values():
            a0, a1, b0, b1 = slot.columns
            slot.bank_A, slot.bank_Bt = bank[:, :, a0:a1], bank[:, :, b0:b1]
        self.state.rows = rows
        try:
            yield
        finally:
            self.state.rows = None
            for slot in self.layers.values():
                slot.bank_A = slot.bank_Bt = None

    @contextlib.contextmanager
    def regional(self, adapters: list[Adapter | torch.Tensor | None], weights):
        """Within the block, every token of every row gets sum_k w_k(token) * B_k A_k x: K adapters blended by
        spatial weights (several subjects in one image, one UNet call). `weights(x)` returns (N, K) weights for
        an input x of N tokens (rows of weights sum to 1); None in `adapters` is a region without an adapter."""
        if not adapters:
            raise InvalidAdapter("regional mode needs at least one region")
        laid = [a if a is None or isinstance(a, torch.Tensor) else self.layout(a) for a in adapters]
        self.state.regions = Regional(self._bank(laid), weights)
        try:
            yield self.state.regions
        finally:
            self.state.regions = None


class Regional:
    """K laid-out adapters as one rank-K*R LoRA per layer, the rank blocks scaled per token:
    delta = ((x A_all^T) * w.repeat_interleave(R)) B_all^T = sum_k w_k B_k A_k x."""

    def __init__(self, bank: torch.Tensor, weights):
        self.bank, self.weights = bank, weights
        self.k, self.rank = bank.shape[0], bank.shape[1]
        self._factors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def factors(self, slot: "SlotLinear") -> tuple[torch.Tensor, torch.Tensor]:
        key = id(slot)
        if key not in self._factors:
            a0, a1, b0, b1 = slot.columns
            n = self.k * self.rank
            a = self.bank[:, :, a0:a1].reshape(n, -1)  # (K*R, in)
            bt = self.bank[:, :, b0:b1].reshape(n, -1)  # (K*R, out)
            self._factors[key] = (a.t().contiguous(), bt.contiguous())
        return self._factors[key]

    def delta(self, slot: "SlotLinear", x: torch.Tensor) -> torch.Tensor:
        a, bt = self.factors(slot)
        w = self.weights(x).to(x.dtype)  # (N, K) or (B, N, K)
        h = torch.matmul(x, a)  # (..., N, K*R)
        h = h * w.repeat_interleave(self.rank, dim=-1)
        return torch.matmul(h, bt)


def _is_target(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)
