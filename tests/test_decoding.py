"""Row decoding and the growing cache: the fast batch-1 path computes what F.linear and
transformers' DynamicCache compute, and never runs where it must not."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GenerationMixin
from transformers.cache_utils import DynamicCache

from minimind_v.config import MiniMindConfig
from minimind_v.model.decoding import GrowingCache, RowLinear, column_blocks, lookup_draft, row_decoding, same_input
from minimind_v.model.llm import MiniMindForCausalLM


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_position_embeddings=128)
    model = MiniMindForCausalLM(MiniMindConfig(**{**kw, **overrides})).eval()
    with torch.no_grad():  # larger than training's init, so greedy tokens are far from ties
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_column_blocks_hold_the_transposed_weight_in_order(threads):
    w = torch.arange(6 * 4, dtype=torch.float32).reshape(6, 4)  # (out 6, in 4)
    blocks = column_blocks([w], threads)
    # As many blocks as divide 6 and do not exceed the threads; put back side by side, they are w.T.
    assert blocks.shape[0] == {1: 1, 2: 2, 3: 3}[threads]
    assert torch.equal(torch.cat(list(blocks), dim=1), w.T)
    stacked = column_blocks([w[:2], w[2:]], threads)  # two weights read as one
    assert torch.equal(torch.cat(list(stacked), dim=1), w.T)


def test_row_linear_fast_path_only_for_one_row_without_gradients():
    torch.manual_seed(0)
    layer = RowLinear(16, 12, bias=True)
    row, rows = torch.randn(1, 1, 16), torch.randn(3, 16)
    with row_decoding(layer), torch.no_grad():
        assert layer.takes_row_path(row) and not layer.takes_row_path(rows)
        torch.testing.assert_close(layer(row), F.linear(row, layer.weight, layer.bias), rtol=1e-5, atol=1e-6)
        assert torch.equal(layer(rows), F.linear(rows, layer.weight, layer.bias))  # a batch: F.linear itself
    with row_decoding(layer):
        assert not layer.takes_row_path(row)  # gradients on: the ordinary path, so backward works
    with torch.no_grad():
        assert not layer.takes_row_path(row)  # outside the block
        assert torch.equal(layer(row), F.linear(row, layer.weight, layer.bias))


def test_same_input_equals_each_linear():
    torch.manual_seed(0)
    a, b, c = RowLinear(8, 6, bias=False), RowLinear(8, 2, bias=False), RowLinear(8, 4, bias=False)
    x = torch.randn(1, 1, 8)
    with row_decoding(torch.nn.ModuleList([a, b, c])), torch.no_grad():
        fused = same_input(x, a, b, c)
    assert [t.shape[-1] for t in fused] == [6, 2, 4]
    for got, layer in zip(fused, (a, b, c)):
        torch.testing.assert_close(got, F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)


def test_blocks_follow_a_changed_weight():
    torch.manual_seed(0)
    layer = RowLinear(8, 4, bias=False)
    x = torch.randn(1, 8)
    with torch.no_grad():
        with row_decoding(layer):
            layer(x)  # blocks made
        layer.weight.mul_(-2.0)  # an in-place update, as an optimizer step makes
        with row_decoding(layer):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)
        layer.weight = torch.nn.Parameter(torch.randn(4, 8))  # a new tensor altogether
        with row_decoding(layer):
            torch.testing.assert_close(layer(x), F.linear(x, layer.weight), rtol=1e-5, atol=1e-6)


def test_growing_cache_equals_dynamic_cache_step_by_step():
    model = make_model()
    ids = torch.randint(0, 97, (2, 70))  # more than the first buffer (64 positions): it must grow
    growing, dynamic = GrowingCache(model.config.n_layers), DynamicCache(config=model.config)
    with torch.no_grad():
        a = model(ids[:, :40], cache=growing, use_cache=True).logits
        b = model(ids[:, :40], cache=dynamic, use_cache=True).logits
        assert torch.equal(a, b)
        for t in range(40, 70):
            a = model(ids[:, t:t + 1], cache=growing, use_cache=True).logits
            b = model(ids[:, t:t + 1], cache=dynamic, use_cache=True).logits
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert growing.get_seq_length() == dynamic.get_seq_length() == 70
    for g, d in zip(growing.layers, dynamic.layers):
        assert torch.equal(g.keys, d.keys) and torch.equal(g.values, d.values)


def test_growing_cache_survives_a_crop():
    # transformers' crop replaces the keys; the next update must start from them, not from the old buffer.
    model = make_model()
    ids = torch.randint(0, 97, (1, 20))
    cache = GrowingCache(model.config.n_layers)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
        cache.crop(-8)  # drop the last 8 of 20
        again = model(ids[:, 12:13], cache=cache, use_cache=True).logits
        reference = model(ids[:, :13]).logits[:, -1:]
    torch.testing.assert_close(again, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_shipped_generate_makes_the_same_tokens_as_the_transformers_loop(use_moe):
    model = make_model(use_moe=use_moe)
    greedy = dict(max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0, eos_token_id=1)
    for seed in range(3):
        ids = torch.randint(2, 97, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        shipped = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)
        reference = GenerationMixin.generate(model, ids, attention_mask=torch.ones_like(ids), **greedy)
        assert torch.equal(shipped, reference)
    # A left-padded batch (F.linear, an explicit mask) through the same override.
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    assert torch.equal(model.generate(ids, attention_mask=mask, **greedy),
                       GenerationMixin.generate(model, ids, attention_mask=mask, **greedy))


def test_one_new_token_without_padding_needs_no_mask_and_matches_the_written_out_attention():
    model = make_model()
    ids = torch.randint(0, 97, (1, 30))
    with torch.no_grad():
        cache = GrowingCache(model.config.n_layers)
        model(ids[:, :29], cache=cache, use_cache=True)
        assert model._attention_mask(torch.ones(1, 30), 1, 30, 29, ids.device) is None
        fused = model(ids[:, 29:], attention_mask=torch.ones(1, 30), cache=cache, use_cache=True).logits
        eager = model(ids, output_attentions=True).logits[:, -1:]  # the written-out attention, full causal mask
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_lean_one_row_step_equals_the_layers(n_kv_heads):
    """decode_one_row (taken for one token of one sequence inside row_decoding) gives the logits and
    the cache that the layer-by-layer path gives (output_hidden_states forces that path)."""
    model = make_model(n_kv_heads=n_kv_heads)
    ids = torch.randint(0, 97, (1, 40), generator=torch.Generator().manual_seed(3))
    lean, layered = GrowingCache(model.config.n_layers), GrowingCache(model.config.n_layers)
    with row_decoding(model), torch.no_grad():
        model(ids[:, :30], cache=lean, use_cache=True)
        model(ids[:, :30], cache=layered, use_cache=True)
        for t in range(30, 40):
            token = ids[:, t : t + 1]
            assert model._one_row_step(model.tok_embeddings(token), None, lean, False)
            fast = model(token, cache=lean, use_cache=True).logits
            slow = model(token, cache=layered, use_cache=True, output_hidden_states=True).logits
            torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)  # attention written out: rounding differs
        for a, b in zip(lean.layers, layered.layers):
            torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    # ... and against no cache at all: the whole sequence through F.linear and causal attention.
    torch.testing.assert_close(fast, model(ids).logits[:, -1:], rtol=1e-4, atol=1e-4)


def test_lean_step_is_not_taken_where_it_must_not_be():
    model = make_model()
    row = model.tok_embeddings(torch.tensor([[5]])).detach()
    cache = GrowingCache(model.config.n_layers)
    with torch.no_grad():
        assert not model._one_row_step(row, None, cache, False)  # outside row_decoding
        with row_decoding(model):
            assert model._one_row_step(row, None, cache, False)
            assert not model._one_row_step(row, None, cache, True)  # attentions or hidden states asked for
            assert not model._one_row_step(row, None, DynamicCache(), False)
            assert not model._one_row_step(row.expand(2, 1, -1), None, cache, False)  # a batch
            assert not model._one_row_step(row, torch.ones(1, 1, 1, 1, dtype=torch.bool), cache, False)  # padding
    with row_decoding(model):
        assert not model._one_row_step(row, None, cache, False)  # gradients on: training keeps the layers
    moe = make_model(use_moe=True)
    with row_decoding(moe), torch.no_grad():
        assert not moe._one_row_step(row, None, cache, False)


def test_generated_ids_can_be_trained_on():
    """generate runs in inference mode, yet what it returns is a plain tensor: the answer can be fed
    back as training ids (the embedding saves them for backward, which an inference tensor refuses)."""
    model = make_model()
    prompt = torch.randint(0, 97, (1, 5), generator=torch.Generator().manual_seed(1))
    out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert not out.is_inference()
    assert torch.equal(out[:, :5], prompt) and out.shape == (1, 9)
    model.train()
    loss = model(out, labels=out).loss
    loss.backward()  # would raise "Inference tensors cannot be saved for backward" on the raw output
    assert model.tok_embeddings.weight.grad is not None


class RecordingStreamer:
    """What generate tells a streamer: every put (as lists) and whether it ended."""

    def __init__(self):
        self.events = []

    def put(self, value):
        self.events.append(value.tolist())

    def end(self):
        self.events.append("end")


def reference_generate(model, prompt, **kwargs):
    """transformers' own loop: any setting the greedy one-row path does not take sends a request
    there (a repetition penalty of 1 changes no score)."""
    assert model._greedy_one_row_request(prompt, None, {**kwargs, "repetition_penalty": 1.0}) is None
    return model.generate(prompt, repetition_penalty=1.0, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_one_row_gives_what_transformers_loop_gives(seed):
    model = make_model(seed)
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(seed))
    free = reference_generate(model, prompt, max_new_tokens=16, do_sample=False)[0, 9:].tolist()
    assert len(set(free)) > 3  # a varied answer: the cases below can tell paths apart
    eos = free[5]  # stops at its first occurrence
    cases = [dict(max_new_tokens=16), dict(max_new_tokens=16, eos_token_id=eos),
             dict(max_new_tokens=16, eos_token_id=[eos, 96], min_new_tokens=8),
             dict(max_new_tokens=16, suppress_tokens=[free[0], free[1]], eos_token_id=eos),
             dict(max_new_tokens=1), dict(max_new_tokens=16, attention_mask=torch.ones(1, 9, dtype=torch.long))]
    for case in cases:
        lean_streamer, loop_streamer = RecordingStreamer(), RecordingStreamer()
        assert model._greedy_one_row_request(prompt, None, {**case, "do_sample": False}) is not None
        lean = model.generate(prompt, do_sample=False, streamer=lean_streamer, **case)
        loop = reference_generate(model, prompt, do_sample=False, streamer=loop_streamer, **case)
        assert torch.equal(lean, loop), case
        assert lean_streamer.events == loop_streamer.events, case
    assert model.generate(prompt, max_new_tokens=16, eos_token_id=eos)[0, 9:].tolist() == free[:free.index(eos) + 1]


def test_greedy_one_row_is_taken_only_where_it_gives_the_same():
    model = make_model()
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    greedy = dict(max_new_tokens=5, do_sample=False)
    assert model._greedy_one_row_request(prompt, None, greedy) is not None
    assert model._greedy_one_row_request(prompt, None, {**greedy, "attention_mask": torch.ones(1, 9)}) is not None
    refused = [
        (prompt.repeat(2, 1), None, greedy),  # a batch
        (prompt, copy.deepcopy(model.generation_config), greedy),  # the caller's own config
        (prompt, None, {**greedy, "do_sample": True}),
        (prompt, None, {**greedy, "repetition_penalty": 1.3}),
        (prompt, None, {**greedy, "output_scores": True, "return_dict_in_generate": True}),
        (prompt, None, {**greedy, "attention_mask": torch.tensor([[0] + [1] * 8])}),  # padding
        (prompt, None, {**greedy, "cache": GrowingCache(model.config.n_layers)}),  # the caller's cache
        (prompt, None, {"do_sample": False}),  # no max_new_tokens given
        (prompt, None, {**greedy, "max_new_tokens": 0}),
    ]
    for args in refused:
        assert model._greedy_one_row_request(*args) is None, args
    model.generation_config.repetition_penalty = 1.2  # the model's own settings count too
    assert model._greedy_one_row_request(prompt, None, greedy) is None
    moe = make_model(use_moe=True)
    assert moe._greedy_one_row_request(prompt, None, greedy) is None
    written_out = make_model()
    written_out.set_attn_implementation("eager")  # its steps keep the layers' own attention
    assert written_out._greedy_one_row_request(prompt, None, greedy) is None
    assert make_model().train()._greedy_one_row_request(prompt, None, greedy) is None


def test_lookup_draft_takes_what_followed_the_latest_longest_match():
    seq = torch.tensor
    # The last three tokens (1, 2, 3) were seen at the start: what followed them; a later match of
    # the last two (2, 3 -> 6) loses to the longer one.
    assert lookup_draft(seq([1, 2, 3, 7, 8, 9, 2, 3, 6, 1, 2, 3]), 3).tolist() == [7, 8, 9]
    assert lookup_draft(seq([1, 2, 3, 7, 8, 9, 2, 3, 6, 1, 2, 3]), 2).tolist() == [7, 8]
    # (6, 4, 1) never came before; (4, 1) did, twice: the latest, when three tokens are asked for...
    assert lookup_draft(seq([4, 1, 5, 4, 1, 6, 4, 1]), 3).tolist() == [6, 4, 1]
    # ... but only the first is followed by five: that one.
    assert lookup_draft(seq([4, 1, 5, 4, 1, 6, 4, 1]), 5).tolist() == [5, 4, 1, 6, 4]
    assert lookup_draft(seq([4, 1, 5, 4, 1, 6, 4, 1]), 3, ngram=1).tolist() == [6, 4, 1]  # (1) last seen at 4
    assert lookup_draft(seq([7, 7, 7]), 4).tolist() == [7]  # none followed by four: the earliest, followed by one
    assert lookup_draft(seq([7, 7, 7, 7, 7, 7]), 2).tolist() == [7, 7]
    assert lookup_draft(seq([1, 2, 3]), 4).tolist() == []  # the last token is new: no guess
    assert lookup_draft(seq([5]), 4).tolist() == []


def count_passes(model):
    """A list that grows by one at every pass over the decoder's weights (the final norm runs once per pass)."""
    passes = []
    model.norm.register_forward_hook(lambda *args: passes.append(1))
    return passes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prompt_lookup_gives_greedy_answer_and_streamer_calls(seed):
    model = make_model(seed)
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(seed))
    free = reference_generate(model, prompt, max_new_tokens=24, do_sample=False)[0, 9:].tolist()
    eos = free[5]
    cases = [dict(max_new_tokens=24), dict(max_new_tokens=24, eos_token_id=eos),
             dict(max_new_tokens=24, eos_token_id=[eos, 96], min_new_tokens=8),
             dict(max_new_tokens=24, suppress_tokens=[free[0], free[1]], eos_token_id=eos),
             dict(max_new_tokens=1), dict(max_new_tokens=2)]
    for lookahead in (1, 4, 10):
        for case in cases:
            lean_streamer, loop_streamer = RecordingStreamer(), RecordingStreamer()
            lean = model.generate(prompt, do_sample=False, streamer=lean_streamer, prompt_lookup_num_tokens=lookahead,
                                  **case)
            loop = reference_generate(model, prompt, do_sample=False, streamer=loop_streamer, **case)
            assert torch.equal(lean, loop), (lookahead, case)
            assert lean_streamer.events == loop_streamer.events, (lookahead, case)


def test_prompt_lookup_reads_the_weights_fewer_times_when_the_answer_repeats():
    """At training's initial scale a model repeats itself; every guess it agrees with saves a pass,
    and the answer stays greedy decoding's."""
    torch.manual_seed(3)
    model = MiniMindForCausalLM(MiniMindConfig(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                               max_position_embeddings=128)).eval()
    prompt = torch.randint(0, 97, (1, 9), generator=torch.Generator().manual_seed(3))
    passes = count_passes(model)
    plain = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    plain_passes = len(passes)
    passes.clear()
    looked_up = model.generate(prompt, max_new_tokens=40, min_new_tokens=40, do_sample=False,
                               prompt_lookup_num_tokens=8)
    answer = plain[0, 9:].tolist()
    assert torch.equal(looked_up, plain)
    assert answer == [prompt[0, -1].item()] * 40  # the prompt's last token, again and again
    assert plain_passes == 40  # the prompt, then one pass per further token
    # With up to 8 guesses, each pass keeps the guesses it agrees with and its own next token. The
    # guesses copy what followed an earlier run of 32s, which grows: 1 (the prompt's pass), then
    # 2, 2, 4, 8, 9, 9 and the last 5 tokens.
    assert len(passes) == 8


def test_growing_cache_keep_forgets_the_end_without_copying():
    cache = GrowingCache(1)
    keys = torch.arange(2 * 5 * 3, dtype=torch.float32).view(1, 2, 5, 3)
    cache.layers[0].update(keys, -keys)
    buffer = cache.layers[0].keys.data_ptr()
    cache.keep(3)
    assert cache.get_seq_length() == 3 and cache.layers[0].keys.data_ptr() == buffer
    new = torch.full((1, 2, 1, 3), 100.0)
    k, v = cache.layers[0].update(new, -new)  # written where the forgotten positions were
    assert k.data_ptr() == buffer
    assert torch.equal(k, torch.cat([keys[..., :3, :], new], dim=2)) and torch.equal(v, -k)
