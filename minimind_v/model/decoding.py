"""One answer at a time, at the speed of the memory: the decoder's matrices for a single row,
and a key/value cache that grows in place.

Each step of a batch-1 answer multiplies one token's vector by every weight matrix of the
decoder, so its cost is reading the weights (102 MiB for the ``small`` preset), not arithmetic.
On a CPU, ``F.linear`` on one row (MKL's matrix-vector product of the (out, in) weight) streams
the weights on one core, far below the machine's memory bandwidth; the same product against the
transposed (in, out) weight, cut into one column block per thread and run as one batched
product, streams them on every core. The matrices that read the same input (the query, key and
value projections; SwiGLU's gate and up projections) are read as one: fewer, larger products.
``benchmarks/bench_decode.py`` measures all of it against the bandwidth and the original code.

``row_decoding(model)`` switches this on for the duration of a block (``generate`` uses it): a
``RowLinear`` given exactly one row without gradients uses its blocks, made on first use and
remade when its weight has changed. Batches, training and GPUs keep ``F.linear``.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer


def column_blocks(weights: list[torch.Tensor], threads: int) -> torch.Tensor:
    """[(out_i, in)] -> (blocks, in, sum(out_i) / blocks): the weights stacked along their outputs,
    transposed, in one contiguous block per thread (as many as divide the outputs evenly)."""
    weight = torch.cat([w.detach() for w in weights]) if len(weights) > 1 else weights[0].detach()
    out_features = weight.shape[0]
    blocks = max(b for b in range(1, max(threads, 1) + 1) if out_features % b == 0)
    return weight.reshape(blocks, out_features // blocks, -1).transpose(1, 2).contiguous()


def times_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """One row x (..., in) times the blocks (b, in, out / b): (..., out), one block per thread."""
    out = torch.bmm(x.reshape(1, 1, -1).expand(blocks.shape[0], 1, -1), blocks)  # (b, 1, out / b)
    return out.reshape(*x.shape[:-1], -1)


class RowLinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict keys) with a fast path for one row,
    taken only inside ``row_decoding``."""

    row_decoding: int = 0  # inside row_decoding: that block's number (weights cannot change within it)

    def takes_row_path(self, x: torch.Tensor) -> bool:
        return bool(self.row_decoding) and x.numel() == self.in_features and not torch.is_grad_enabled()

    def blocks_with(self, *others: RowLinear) -> torch.Tensor:
        """The column blocks of this weight stacked with ``others``' (same input), kept on this
        module; checked once per ``row_decoding`` block, and remade when a weight has changed
        (an in-place update bumps its version) or the thread count has."""
        kept = self.__dict__.setdefault("_row_blocks", {})
        entry = kept.get(len(others))
        if entry is not None and entry[0] == self.row_decoding:
            return entry[2]
        layers = (self, *others)
        threads = torch.get_num_threads()
        key = (threads, *((l.weight.data_ptr(), l.weight._version, l.weight.dtype) for l in layers))
        blocks = entry[2] if entry is not None and entry[1] == key else column_blocks([l.weight for l in layers], threads)
        kept[len(others)] = self.row_decoding, key, blocks
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.takes_row_path(x):
            return F.linear(x, self.weight, self.bias)
        out = times_blocks(x, self.blocks_with())
        return out if self.bias is None else out + self.bias


def same_input(x: torch.Tensor, *linears: RowLinear) -> tuple[torch.Tensor, ...]:
    """Each of ``linears`` applied to ``x``: for one row inside ``row_decoding``, as one product
    against their stacked weights; otherwise one ``F.linear`` each."""
    first = linears[0]
    if not first.takes_row_path(x) or any(l.bias is not None for l in linears):
        return tuple(l(x) for l in linears)
    out = times_blocks(x, first.blocks_with(*linears[1:]))
    return out.split([l.out_features for l in linears], dim=-1)


_blocks_entered = itertools.count(1)


@contextmanager
def row_decoding(model: nn.Module):
    """Within the block, every CPU ``RowLinear`` of ``model`` takes the one-row path."""
    number = next(_blocks_entered)
    layers = [m for m in model.modules() if isinstance(m, RowLinear) and m.weight.device.type == "cpu"]
    for layer in layers:
        layer.row_decoding = number
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_decoding = 0


class GrowingLayer(DynamicLayer):
    """transformers' ``DynamicLayer`` whose keys and values are views of a buffer with room to
    spare: a new token is written in place, where ``torch.cat`` copies the whole history at every
    step. The buffer doubles when full."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        buffers = getattr(self, "_buffers_kv", None)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # lazy_initialization leaves them 1-d, empty
        # Anything that replaced the keys (crop, reorder, reset) took them off the buffer: start a new one.
        if buffers is not None and (self.keys.data_ptr() != buffers[0].data_ptr()
                                    or self.keys.shape[:2] != buffers[0].shape[:2]):
            buffers = None
        needed = length + key_states.shape[-2]
        if buffers is None or needed > buffers[0].shape[-2]:
            capacity = max(needed, 2 * length, 64)
            grown = []
            for old, new in ((self.keys, key_states), (self.values, value_states)):
                buffer = new.new_empty(*new.shape[:2], capacity, new.shape[-1])
                if length:
                    buffer[..., :length, :] = old
                grown.append(buffer)
            buffers = self._buffers_kv = tuple(grown)
        buffers[0][..., length:needed, :] = key_states
        buffers[1][..., length:needed, :] = value_states
        self.keys, self.values = buffers[0][..., :needed, :], buffers[1][..., :needed, :]
        return self.keys, self.values


class GrowingCache(DynamicCache):
    """A ``DynamicCache`` of ``GrowingLayer``s: the cache ``generate`` and the model use."""

    def __init__(self, n_layers: int):
        super().__init__()
        self.layers = [GrowingLayer() for _ in range(n_layers)]
        self.layer_class_to_replicate = None
