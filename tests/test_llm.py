"""The MiniMind decoder, checked against properties and against references computed another way."""

import pytest
import torch
from transformers.generation.streamers import BaseStreamer

from minimind_v.config import MiniMindConfig, config_from_preset, swiglu_hidden_dim
from minimind_v.model.llm import MiniMindForCausalLM, apply_rope, rope_tables


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    kw = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_position_embeddings=64)
    model = MiniMindForCausalLM(MiniMindConfig(**{**kw, **overrides})).eval()
    # A larger init than training's 0.02, so random models give varied, non-degenerate tokens.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def test_hidden_dim_rule_and_preset_sizes():
    assert swiglu_hidden_dim(512) == 1408  # 8*512/3 = 1365.3 -> 22 * 64
    assert swiglu_hidden_dim(768) == 2048
    counts = {}
    for name in ("small", "base"):
        with torch.device("meta"):
            model = MiniMindForCausalLM(config_from_preset(name))
        counts[name] = sum(p.numel() for p in model.parameters())
    # The original reports ~27M and ~109M; the tied head is counted once.
    assert 26.5e6 < counts["small"] < 27.5e6
    assert 108e6 < counts["base"] < 110e6


def test_causality():
    model = make_model()
    x = torch.randint(0, 97, (2, 12))
    y = x.clone()
    y[:, 7:] = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_kv_cache_decoding_equals_full_forward():
    model = make_model()
    x = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :4], use_cache=True)
        steps = [out.logits]
        for t in range(4, 10):
            out = model(x[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_moe", [False, True])
def test_generate_with_cache_equals_without(use_moe):
    model = make_model(use_moe=use_moe)
    x = torch.randint(0, 97, (1, 6))
    a = model.generate(x, max_new_tokens=20, do_sample=False, use_cache=True, eos_token_id=None)
    b = model.generate(x, max_new_tokens=20, do_sample=False, use_cache=False, eos_token_id=None)
    assert a.shape == (1, 26)
    assert torch.equal(a, b)
    assert len(set(a[0, 6:].tolist())) > 1  # not a degenerate repeat of one token


def test_batched_left_padded_generation_matches_single():
    model = make_model()
    short, long = torch.randint(3, 97, (1, 4)), torch.randint(3, 97, (1, 7))
    pad = 0
    batch = torch.cat([torch.cat([torch.full((1, 3), pad), short], 1), long])
    mask = (torch.arange(7)[None] >= torch.tensor([[3], [0]])).long()
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=pad)
    together = model.generate(batch, attention_mask=mask, **kw)
    alone_short = model.generate(short, **kw)
    alone_long = model.generate(long, **kw)
    assert torch.equal(together[0, 7:], alone_short[0, 4:])
    assert torch.equal(together[1, 7:], alone_long[0, 7:])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(n_heads=4, n_kv_heads=2)
    mha = make_model(n_heads=4, n_kv_heads=4)
    sd = gqa.state_dict()
    hd = 64 // 4
    for key in list(sd):
        if key.endswith(("attention.wk.weight", "attention.wv.weight")):
            # (n_kv*hd, dim) -> (n_kv, hd, dim) -> each KV head twice -> (n_heads*hd, dim)
            sd[key] = sd[key].view(2, hd, 64).repeat_interleave(2, dim=0).reshape(4 * hd, 64)
    mha.load_state_dict(sd)
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gqa(x).logits, mha(x).logits, atol=1e-5, rtol=1e-5)


def test_rope_matches_complex_rotation_and_depends_on_relative_position():
    hd, T = 16, 40
    cos, sin = rope_tables(hd, T)
    x = torch.randn(1, 1, T, hd)
    # Reference: treat adjacent pairs as complex numbers and multiply by e^{i * pos * freq}.
    freqs = 1.0 / 1e4 ** (torch.arange(0, hd, 2).float() / hd)
    rot = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    ref = torch.view_as_real(torch.view_as_complex(x.view(1, 1, T, hd // 2, 2)) * rot).flatten(-2)
    torch.testing.assert_close(apply_rope(x, cos, sin), ref, atol=1e-5, rtol=1e-5)

    q, k = torch.randn(hd), torch.randn(hd)

    def score(m, n):
        qm = apply_rope(q.view(1, 1, 1, hd), cos[m : m + 1], sin[m : m + 1])
        kn = apply_rope(k.view(1, 1, 1, hd), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    for shift in (1, 7, 20):
        torch.testing.assert_close(score(12, 5), score(12 + shift, 5 + shift), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(12, 5), score(12, 6), atol=1e-3)


def test_fused_and_eager_attention_agree_with_mask_and_cache():
    model = make_model()
    x = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        fused = model(x, attention_mask=mask).logits
        eager = model(x, attention_mask=mask, output_attentions=True)
        plain_fused, plain_eager = model(x).logits, model(x, output_attentions=True)
    torch.testing.assert_close(fused[1], eager.logits[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[0, 3:], eager.logits[0, 3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain_fused, plain_eager.logits, atol=1e-5, rtol=1e-5)
    attn = plain_eager.attentions
    assert len(attn) == 2 and attn[0].shape == (2, 4, 10, 10)
    torch.testing.assert_close(attn[0].sum(-1), torch.ones(2, 4, 10))
    assert torch.all(attn[0].triu(1) == 0)  # nothing attends to the future
    assert torch.all(eager.attentions[0][0, :, 3:, :3] == 0)  # nothing attends to padding


def test_moe_routing_weights_and_aux_loss_and_reference():
    model = make_model(use_moe=True, n_routed_experts=4, num_experts_per_tok=2)
    moe = model.layers[0].feed_forward
    x = torch.randn(3, 5, 64)
    idx, weight, _ = moe.gate(x.view(-1, 64))
    torch.testing.assert_close(weight.sum(-1), torch.ones(15))
    assert idx.shape == (15, 2) and torch.all(idx[:, 0] != idx[:, 1])
    # Reference: a loop over tokens, each summing its chosen experts by hand.
    with torch.no_grad():
        got = moe(x).view(-1, 64)
        flat = x.view(-1, 64)
        for t in range(15):
            ref = moe.shared_experts(flat[t])
            for j in range(2):
                ref = ref + weight[t, j] * moe.experts[int(idx[t, j])](flat[t])
            torch.testing.assert_close(got[t], ref, atol=1e-4, rtol=1e-4)
    model.train()
    ids = torch.randint(0, 97, (2, 8))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0
    out.loss.backward()
    assert model.layers[0].feed_forward.gate.weight.grad.abs().sum() > 0


def test_tied_weights_survive_save_and_load(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = MiniMindForCausalLM.from_pretrained(tmp_path)
    assert loaded.output.weight is loaded.tok_embeddings.weight
    x = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits)
        loaded.tok_embeddings.weight[5] += 1.0
    assert torch.equal(loaded.output.weight[5], loaded.tok_embeddings.weight[5])


def test_loss_only_on_labelled_positions():
    model = make_model()
    x = torch.randint(0, 97, (2, 10))
    labels = x.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        loss = model(x, labels=labels).loss
        logits = model(x).logits
    ref = torch.nn.functional.cross_entropy(logits[:, 5:-1].reshape(-1, 97), x[:, 6:].reshape(-1))
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_loss_and_gradients_equal_each_sequence_alone(side):
    # Right padding lets training drop the mask (plain causal attention, padding never read);
    # left padding must keep it. Either way: the per-sequence answer, summed by hand.
    model = make_model().train()
    long, short = torch.randint(1, 97, (1, 12)), torch.randint(1, 97, (1, 7))
    lab_long, lab_short = long.clone(), short.clone()
    lab_long[:, :4], lab_short[:, :2] = -100, -100
    pad = torch.zeros(1, 5, dtype=torch.long)
    ignore = torch.full((1, 5), -100)
    ones, zeros = torch.ones(1, 7, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)
    if side == "right":
        short_row, short_labels, short_mask = torch.cat([short, pad], 1), torch.cat([lab_short, ignore], 1), torch.cat([ones, zeros], 1)
    else:
        short_row, short_labels, short_mask = torch.cat([pad, short], 1), torch.cat([ignore, lab_short], 1), torch.cat([zeros, ones], 1)
    ids, labels = torch.cat([long, short_row]), torch.cat([lab_long, short_labels])
    mask = torch.cat([torch.ones(1, 12, dtype=torch.long), short_mask])
    if side == "left":  # left padding needs its positions to start at each sequence's first token
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        loss = model(ids, attention_mask=mask, labels=labels, position_ids=positions, use_cache=False).loss
    else:
        loss = model(ids, attention_mask=mask, labels=labels, use_cache=False).loss
    batched = torch.autograd.grad(loss, list(model.parameters()))
    n_long, n_short = int((lab_long[:, 1:] != -100).sum()), int((lab_short[:, 1:] != -100).sum())
    alone = (model(long, labels=lab_long, use_cache=False).loss * n_long
             + model(short, labels=lab_short, use_cache=False).loss * n_short) / (n_long + n_short)
    reference = torch.autograd.grad(alone, list(model.parameters()))
    torch.testing.assert_close(loss, alone, atol=1e-5, rtol=1e-5)
    for got, want in zip(batched, reference):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_sampling_options():
    model = make_model()
    x = torch.randint(3, 97, (1, 5))
    kw = dict(max_new_tokens=12, eos_token_id=None)
    greedy = model.generate(x, do_sample=False, **kw)
    assert torch.equal(model.generate(x, do_sample=True, top_k=1, **kw), greedy)
    assert torch.equal(model.generate(x, do_sample=True, top_p=1e-6, **kw), greedy)
    torch.manual_seed(3)
    s1 = model.generate(x, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3, **kw)
    torch.manual_seed(3)
    s2 = model.generate(x, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, repetition_penalty=1.3, **kw)
    assert torch.equal(s1, s2) and not torch.equal(s1, greedy)
    # Stop on end-of-sequence: declare the third greedy token to be EOS.
    eos = int(greedy[0, 7])
    assert eos not in greedy[0, 5:7].tolist()
    stopped = model.generate(x, do_sample=False, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert stopped.shape[1] == 8 and int(stopped[0, -1]) == eos


def test_streamer_receives_every_generated_token():
    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens, self.ended = [], False

        def put(self, value):
            self.tokens.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    model = make_model()
    x = torch.randint(3, 97, (1, 5))
    streamer = Collect()
    out = model.generate(x, do_sample=False, max_new_tokens=6, eos_token_id=None, streamer=streamer)
    assert streamer.ended
    assert streamer.tokens[0] == x[0].tolist()  # the prompt comes first
    assert sum(streamer.tokens[1:], []) == out[0, 5:].tolist()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(dim=100, n_heads=16), "divisible by n_heads"),
        (dict(dim=64, n_heads=4, n_kv_heads=3), "must divide n_heads"),
    ],
)
def test_bad_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MiniMindConfig(**kwargs)


def test_unknown_preset_and_too_long_prompt():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*small"):
        config_from_preset("huge")
    model = make_model(max_position_embeddings=16)
    with pytest.raises(ValueError, match="longer than the model's maximum length"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_tiny_decoder_memorises_repeated_text():
    """Training must work: a tiny model learns a sentence by heart within seconds."""
    torch.manual_seed(0)
    text = "the red circle sits above the blue square. "
    ids = torch.tensor([1] + list(text.encode()) * 2)[None]  # bytes as tokens; 1 = <s>
    config = MiniMindConfig(vocab_size=259, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                            max_position_embeddings=128)
    model = MiniMindForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    losses = []
    for _ in range(150):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]
    model.eval()
    prompt = ids[:, :9]
    out = model.generate(prompt, max_new_tokens=ids.shape[1] - 9, do_sample=False, eos_token_id=None)
    assert bytes(out[0, 1:].tolist()).decode() == text * 2


def test_rope_equals_the_written_out_rotation_bit_for_bit():
    # The package's form ((x1, x2) * cos + (x2, x1) * (-sin, sin)) against the textbook one,
    # pair by pair: the same products and sums, so the same bits (training numbers cannot move).
    cos, sin = rope_tables(16, 64)
    x = torch.randn(3, 4, 64, 16, generator=torch.Generator().manual_seed(0))
    c, s = cos[None, None], sin[None, None]

    def written_out(x):
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)

    assert torch.equal(apply_rope(x, c, s), written_out(x))
    # Half precision in, rotation in fp32, half out: the same as rotating the rounded input.
    assert torch.equal(apply_rope(x.half(), c, s), written_out(x.half().float()).half())
