"""One answer at a time, at the speed of the memory: the decoder's matrices for a single row,
and a key/value cache that grows in place.

Each step of a batch-1 answer multiplies one token's vector by every weight matrix of the
decoder, so its cost is reading the weights (102 MiB for the ``small`` preset), not arithmetic.
On a CPU, ``F.linear`` on one row (MKL's matrix-vector product of the (out, in) weight) streams
the weights on one core, far below the machine's memory bandwidth; the same product against the
transposed (in, out) weight, cut into one column block per thread and run as one batched
product, streams them on every core. The matrices that read the same input (the query, key and
value projections; SwiGLU's gate and up projections) are read as one: fewer, larger products.
``greedy_one_row`` answers one prompt greedily without transformers' loop around the step (its
logits processors, stopping criteria and input preparation), as ``generate`` computes it;
``generate`` takes it for such requests.
``benchmarks/bench_decode.py`` measures all of it against the bandwidth and the original code.

``row_decoding(model)`` switches this on for the duration of a block (``generate`` uses it): a
``RowLinear`` given exactly one row without gradients uses its blocks, made on first use and
remade when its weight has changed. Batches, training and GPUs keep ``F.linear``.

Once the products are fast, what is left of a step is a few hundred small operations (norms,
rotary positions, the cache, attention, module calls), each a few microseconds. ``decode_one_row``
runs the decoder's layers for that one token with as few of them as the arithmetic allows: each
norm one call, the query and key rotated together with factors made once per step, attention on
one query written out as three small products. It computes what the layers compute
(``tests/test_decoding.py`` compares them).

Past that, a step can only read fewer bytes or keep more tokens per pass. ``greedy_one_row`` with
``lookahead`` (``generate(prompt_lookup_num_tokens=k)``, transformers' name) guesses the next tokens
by copying what followed the answer's last few tokens earlier in the prompt or the answer
(``lookup_draft``), runs the guesses through the model in one pass, and keeps those the model's
own greedy choices confirm: the same answer in fewer passes.
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


def rotation_factors(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One position's cos, sin (head_dim/2,) -> the two factors ``llm.apply_rope`` multiplies the
    pairs and their swapped copies by: (hd/2, 1) and (hd/2, 2)."""
    return cos.unsqueeze(-1), torch.stack((-sin, sin), dim=-1)


def decode_one_row(model: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   cache: "GrowingCache") -> torch.Tensor:
    """The dense decoder's layers for one new token of one sequence, inside ``row_decoding``:
    h (1, 1, dim) -> (1, 1, dim) before the final norm, its key and value appended to ``cache``.

    The same arithmetic as ``TransformerBlock.forward`` (norms, products against the same blocks,
    the same rotation formula, the fused attention on the whole cached history), in fewer calls."""
    cfg = model.config
    H, Hkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n_qk, group, dim = (H + Hkv) * hd, H // Hkv, cfg.dim
    c, s = rotation_factors(cos, sin)
    for i, layer in enumerate(model.layers):
        att, ffn = layer.attention, layer.feed_forward
        norm = layer.attention_norm  # F.rms_norm: RMSNorm's arithmetic in one call (equal bit for bit in float32)
        qkv = times_blocks(F.rms_norm(h, (dim,), norm.weight, norm.eps), att.wq.blocks_with(att.wk, att.wv))
        pairs = qkv[..., :n_qk].view(H + Hkv, hd // 2, 2)
        qk = (pairs * c + pairs.flip(-1) * s).view(H + Hkv, 1, hd)  # apply_rope on q and k at once
        keys, values = cache.layers[i].update(qk[H:][None], qkv[..., n_qk:].view(1, Hkv, 1, hd))
        # One query: written out, three small products beat the fused kernel's set-up; each key/value
        # head answers its group of query heads without being repeated.
        q = qk[:H].view(Hkv, group, hd)
        weights = torch.softmax((q @ keys[0].transpose(1, 2)) * hd**-0.5, dim=-1)  # (Hkv, group, S)
        out = (weights @ values[0]).view(1, 1, H * hd)
        h = h + times_blocks(out, att.wo.blocks_with())
        norm = layer.ffn_norm
        gate, up = times_blocks(F.rms_norm(h, (dim,), norm.weight, norm.eps), ffn.w1.blocks_with(ffn.w3)).chunk(2, dim=-1)
        h = h + times_blocks(F.silu(gate) * up, ffn.w2.blocks_with())
    return h


def lookup_draft(sequence: torch.Tensor, length: int, ngram: int = 3) -> torch.Tensor:
    """Prompt lookup: what followed an earlier occurrence of the sequence's last ``ngram`` tokens
    (else of its last ``ngram - 1``, ..., 1): the latest occurrence that ``length`` tokens
    followed, else the earliest (the most tokens). None found: empty.

    A free guess at what comes next: answers repeat their question's words and their own.
    sequence (L,) -> (m,), m <= length."""
    for n in range(min(ngram, len(sequence) - 1), 0, -1):
        windows = sequence[:-1].unfold(0, n, 1)  # every earlier n-gram (the last token's own is left out)
        starts = (windows == sequence[-n:]).all(dim=1).nonzero().view(-1) + n  # where each one's sequel starts
        if len(starts):
            full = starts[starts <= len(sequence) - length]
            start = int(full[-1]) if len(full) else int(starts[0])
            return sequence[start:start + length]
    return sequence[:0]


def greedy_one_row(model: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_token_ids=(),
                   suppress_tokens=(), min_new_tokens: int = 0, streamer=None, lookahead: int = 0,
                   **prompt_inputs) -> torch.Tensor:
    """Greedy answer to one prompt (1, T) -> (1, T + new): what transformers' ``generate`` computes
    for it (the same forward on the prompt, the same one-row step, eos, ``suppress_tokens``,
    ``min_new_tokens``, the streamer told the prompt, each token, the end), without the loop
    around the step: no logits processors, stopping criteria or input preparation per token.
    ``prompt_inputs`` go with the prompt only (its attention mask, its pictures). Called inside
    ``row_decoding`` and inference mode (``MiniMindForCausalLM.generate``).

    ``lookahead`` > 0 guesses up to that many next tokens by prompt lookup (``lookup_draft``) and
    checks them all in one forward: reading the weights once for several rows costs little more
    than for one, and every guess the model agrees with is a step saved. The tokens kept are the
    model's own choices at each position, so the answer is greedy decoding's; only the number of
    passes over the weights changes. A pass checking many guesses costs more than one checking
    few, so it starts with two and, as transformers' "heuristic" schedule for assisted decoding
    does, guesses two more after a pass that kept every guess and one fewer after one that did not."""
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long)
    suppress = torch.tensor(sorted(set(suppress_tokens)), dtype=torch.long)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    cache = GrowingCache(model.config.n_layers)
    logits = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1, **prompt_inputs).logits[0]
    sequence = input_ids[0].clone()  # the prompt and the answer so far: where drafts are looked up
    new, budget = 0, min(lookahead, 2)
    while True:
        scores = logits.float()  # (rows, vocab): row i chooses the answer's token new + i
        if len(suppress):
            scores[:, suppress] = float("-inf")
        if len(eos) and new < min_new_tokens:
            scores[:min_new_tokens - new, eos] = float("-inf")
        choices = scores.argmax(-1)  # (rows,)
        draft = sequence[len(sequence) - len(choices) + 1:]  # the guesses these rows checked
        agreed = int((choices[:-1] == draft).cumprod(0).sum())  # guesses equal to the model's choice, in a row
        if len(draft):  # as transformers' "heuristic" schedule: more guesses after a full hit, fewer after a miss
            budget = min(budget + 2, lookahead) if agreed == len(draft) else max(budget - 1, 1)
        chosen = choices[:agreed + 1]
        ends = torch.isin(chosen, eos).nonzero()
        if len(ends):
            chosen = chosen[:int(ends[0]) + 1]
        chosen = chosen[:max_new_tokens - new]
        sequence = torch.cat([sequence[:len(sequence) - len(draft)], chosen])
        new += len(chosen)
        if cache.get_seq_length() > len(sequence) - 1:  # keys of rejected guesses: dropped
            cache.keep(len(sequence) - 1)
        if streamer is not None:
            for token in chosen:
                streamer.put(token.view(1).cpu())
        if new == max_new_tokens or len(ends):
            break
        guess = lookup_draft(sequence, min(budget, max_new_tokens - new - 1)) if lookahead > 0 else sequence[:0]
        if len(guess) == 0:
            position = len(sequence) - 1
            h = decode_one_row(model, model.tok_embeddings(sequence[-1:].view(1, 1)), model.rope_cos[position],
                               model.rope_sin[position], cache)
            logits = model.output(model.norm(h))[0]
        else:  # the last token and the guesses, one forward: logits at every row
            logits = model(input_ids=torch.cat([sequence[-1:], guess])[None], cache=cache, use_cache=True).logits[0]
            sequence = torch.cat([sequence, guess])
    if streamer is not None:
        streamer.end()
    return sequence[None]


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

    def keep(self, length: int) -> None:
        """Forget every position from ``length`` on (views of the same buffers: nothing copied)."""
        for layer in self.layers:
            layer.keys, layer.values = layer.keys[..., :length, :], layer.values[..., :length, :]
