# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 2: the tokenizer and the decoder
#
# ```
# ... prompt ─decoder─▶ answer   ◀── this chapter
# ```
#
# Before the model can read pictures it must read words. This chapter builds the language half of
# MiniMind-V: a **tokenizer** that turns text into ids, the chat format that marks who speaks, and
# the **MiniMind decoder**, a small Llama-style transformer that predicts the next token. We then
# pretrain the decoder on the shapes world's text alone, so that it speaks the world's language
# before it ever sees a picture.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)

from minimind_v.chapters import open_chapter, read_metrics, plot_loss, save_figure
from minimind_v.recipe import run_stage, stage_commands, stage_dir, world_texts

R, RUN, NPROC = open_chapter(QUICK, NPROC, needs=['world'])
WORLD = stage_dir(RUN, "world")

# %% [markdown]
# ## The tokenizer
#
# MiniMind uses a byte-level BPE with a vocabulary of 6400: every text is first seen as bytes (so
# nothing is ever unknown), then the most frequent neighbouring pairs are merged into new tokens,
# again and again, until the vocabulary is full. We train one on every caption, question and
# answer of the world, each behind its role name as the chat format below writes it. The world
# only has a few hundred distinct words, so the training runs out of pairs worth merging long
# before 6400; the vocabulary is as large as the text needs.
#
# Four special tokens come first: `<unk>` = 0, `<s>` = 1 (a message begins), `</s>` = 2 (it
# ends) and `<|image|>` = 3, the placeholder that will stand for a picture in chapter 4.

# %%
from minimind_v.tokenizer import SPECIAL_TOKENS, load_tokenizer, render_chat

TOKENIZER_DIR = stage_dir(RUN, "tokenizer")
texts = world_texts(WORLD)
print(f"{len(texts)} training texts, e.g. {texts[0]!r}")
# run_stage calls train_tokenizer(texts, out_dir=TOKENIZER_DIR, vocab_size=R.vocab_size) unless
# a tokenizer trained with the same settings on the same world is there.
run_stage(RUN, R, "tokenizer")
tokenizer = load_tokenizer(TOKENIZER_DIR)
print(f"vocabulary: {len(tokenizer)} tokens (asked for at most {R.vocab_size})")
print("special tokens:", {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS})

# %% [markdown]
# A caption as the tokenizer sees it. `Ġ` is how a byte-level BPE writes a leading space: in
# this world most words became single tokens, space included.

# %%
import matplotlib.pyplot as plt

from minimind_v.data.datasets import read_records
from minimind_v.viz import plot_token_strip

caption = read_records(WORLD / "pretrain_data.json")[0]["conversations"][1]["value"]
ids = tokenizer(caption, add_special_tokens=False).input_ids
print(repr(caption))
print("tokens:", tokenizer.convert_ids_to_tokens(ids))
print("ids:   ", ids)
assert tokenizer.decode(ids) == caption  # byte-level BPE decodes back exactly

fig = plot_token_strip(tokenizer, ids, title=f"a caption: {len(caption)} characters -> {len(ids)} tokens")
save_figure(fig, "02_caption_tokens.png")
plt.show()

# %% [markdown]
# ## The chat format
#
# Every message is wrapped as `<s>role\n ... </s>\n`, and a prompt ends with `<s>assistant\n`, the
# cue for the model to answer. The model learns where an answer ends by predicting `</s>`, which
# is also where generation stops. The tokenizer was trained on the turns as they appear here,
# role name first, so `user` and `assistant` are one token each; a BPE that never saw them would
# spell `assistant` in nine pieces, in every turn of every training sample.

# %%
messages = [{"role": "user", "content": "What colour is the circle?"},
            {"role": "assistant", "content": "red"}]
chat = render_chat(messages)
print(repr(chat))
assert chat == tokenizer.apply_chat_template(messages, tokenize=False)  # the same format, two ways
prompt = render_chat(messages[:1], add_generation_prompt=True)
print(repr(prompt))
prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
fig = plot_token_strip(tokenizer, prompt_ids, title="a chat prompt, ready for the answer")
save_figure(fig, "02_chat_tokens.png")
plt.show()

# %% [markdown]
# ## The decoder
#
# MiniMind is a stack of identical blocks between a token embedding and an output head. Every
# position carries one vector of width `dim` through the stack (the *residual stream*), and each
# block adds to it twice:
#
# ```
# x = x + attention(RMSNorm(x))      # gather from the earlier positions
# x = x + feed_forward(RMSNorm(x))   # work on each position alone
# ```
#
# After the last block, one more RMSNorm and the output head, which **shares its matrix with the
# token embedding** (tied weights). The sections below write each mechanism out in a few lines:
# RMSNorm, rotary positions, the causal mask, attention with grouped queries, SwiGLU. Each is
# checked against the package's module with this model's weights, on the chat of the last section.
# The reader's versions are for reading; the training uses the package.
#
# The book's default is the `tiny` preset; the original MiniMind-V comes in `small` and `base`.
# `small` and `base` share each key/value head between two query heads. `tiny` gives each of its
# four query heads a key/value head of its own (a group size of one, which is plain multi-head
# attention): its cache is small anyway, and the heads are free to look for different things.

# %%
from minimind_v.config import config_from_preset
from minimind_v.model.llm import MiniMindForCausalLM

config = config_from_preset(R.preset, vocab_size=len(tokenizer))
model = MiniMindForCausalLM(config)
print(model.layers[0])  # one block of the stack
print(f"{config.n_layers} blocks; dim {config.dim}; {config.n_heads} query heads and {config.n_kv_heads} "
      f"key/value heads of {config.head_dim}; feed-forward width {config.hidden_dim}")

# %% [markdown]
# The model is untrained: its weights are random (standard deviation 0.02), which is all the checks
# need. Their input is the chat of the last section, embedded: `x` is what the first block reads.

# %%
import math

import torch

x_ids = torch.tensor([tokenizer(chat, add_special_tokens=False).input_ids])  # (1, T)
B, T = x_ids.shape
with torch.no_grad():
    x = model.tok_embeddings(x_ids)  # (1, T) -> (1, T, dim)
block = model.layers[0]
print("x:", tuple(x.shape))

# %% [markdown]
# ### RMSNorm
#
# Before each half of a block, every vector is divided by its root-mean-square, so it reaches the
# layer with an RMS of 1 whatever its size in the residual stream, then multiplied feature by
# feature by a learned gain (`weight`, ones at the start). Unlike LayerNorm it does not subtract
# the mean and has no bias: one statistic per vector instead of two, and it trains as well. `eps`
# guards against a vector of zeros. Our embeddings have an RMS of about 0.02, so after the norm
# expect 1, or a little less: eps = 1e-5 is not negligible next to 0.02² = 4e-4 (exercise 1).

# %%
from minimind_v.model.llm import RMSNorm, apply_rope, repeat_kv


def rms_norm(x, weight, eps):
    """Scale each vector (the last dimension) to root-mean-square 1, then by the gain."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rms(t):
    return t.pow(2).mean(-1).sqrt()


with torch.no_grad():
    normed = rms_norm(x, block.attention_norm.weight, config.norm_eps)  # (1, T, dim)
    assert isinstance(block.attention_norm, RMSNorm)
    torch.testing.assert_close(normed, block.attention_norm(x))
print("RMS of the first 6 positions, before:", rms(x)[0, :6].numpy().round(4))
print("                               after:", rms(normed)[0, :6].numpy().round(4))

# %% [markdown]
# ### Rotary position embeddings (RoPE)
#
# Attention compares a query with a key by their dot product, which says nothing about where the
# two tokens stand. RoPE writes the position into both: it cuts each head's vector into pairs of
# features and turns pair i of the token at position p by the angle p·θ^(-2i/head_dim), θ = 10000.
# A rotation keeps a vector's length, and the dot product of two rotated vectors depends on the
# difference of their angles only: a query at position m meets a key at position n through m - n
# (exercise 2). The first pair turns by one radian per position and tell neighbours apart; the
# last ones turn so slowly that they measure long distances. MiniMind pairs adjacent features,
# (x[2i], x[2i+1]), as the original RoPE and MiniMind v1 do.

# %%
def rope(x, theta=1e4):
    """x (B, H, T, hd): turn each pair (x[2i], x[2i+1]) at position p by the angle p * theta^(-2i/hd)."""
    T, hd = x.shape[-2:]
    per_position = theta ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,) radians
    angles = torch.outer(torch.arange(T, dtype=torch.float64), per_position)  # (T, hd/2)
    cos, sin = angles.cos().float(), angles.sin().float()
    even, odd = x[..., 0::2], x[..., 1::2]  # (B, H, T, hd/2) each: the two features of every pair
    out = torch.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


attn = block.attention
cos, sin = model.rope_cos[:T][None, None], model.rope_sin[:T][None, None]  # the package's tables: (1, 1, T, hd/2)
with torch.no_grad():
    q = attn.wq(normed).view(B, T, attn.n_heads, attn.head_dim).transpose(1, 2)  # (1, T, dim) -> (1, H, T, hd)
    torch.testing.assert_close(rope(q, config.rope_theta), apply_rope(q, cos, sin))
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))  # lengths unchanged
turn = 2 * math.pi * config.rope_theta ** (torch.arange(0, attn.head_dim, 2) / attn.head_dim)
print(f"positions for one full turn, pair 0 to pair {attn.head_dim // 2 - 1}:", turn.round().int().tolist())

# %% [markdown]
# ### The causal mask
#
# In training the decoder predicts the next token at every position at once. That only works if
# position t cannot see the tokens after it: otherwise it would copy the next token instead of
# predicting it. Before the softmax, the scores of later positions are set to -∞, so their weights
# are exactly 0. Row t says which positions token t may look at:

# %%
print(torch.ones(6, 6, dtype=torch.bool).tril().int())  # (T, T): 1 where a query (row) may see a key (column)

# %% [markdown]
# ### Attention with grouped queries
#
# Each head scores its query at position t against the keys of positions 0..t, scaled by
# 1/√head_dim so the softmax does not saturate, turns the scores into weights, and averages the
# values with them. The heads' results sit side by side and one matrix, `wo`, mixes them. With
# **grouped-query attention** (GQA) there are fewer key/value heads than query heads: each serves
# `n_heads / n_kv_heads` query heads, repeated to line up with them (the package's `repeat_kv`).
# The model keeps every past position's keys and values while it generates (the KV cache), so
# fewer key/value heads mean a smaller cache (exercise 3). The package calls PyTorch's fused
# `scaled_dot_product_attention`; here it is written out.

# %%
def attention(x, layer, theta=1e4):
    """Causal self-attention with grouped queries: (B, T, dim) -> (B, T, dim)."""
    B, T, _ = x.shape
    H, KV, hd = layer.n_heads, layer.n_kv_heads, layer.head_dim
    q = rope(layer.wq(x).view(B, T, H, hd).transpose(1, 2), theta)  # (B, H, T, hd)
    k = rope(layer.wk(x).view(B, T, KV, hd).transpose(1, 2), theta)  # (B, KV, T, hd)
    v = layer.wv(x).view(B, T, KV, hd).transpose(1, 2)  # (B, KV, T, hd)
    k, v = k.repeat_interleave(H // KV, dim=1), v.repeat_interleave(H // KV, dim=1)  # (B, H, T, hd)
    scores = q @ k.transpose(-2, -1) / hd**0.5  # (B, H, T, T): query t against key s
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))  # causal
    out = scores.softmax(-1) @ v  # (B, H, T, T) @ (B, H, T, hd) -> (B, H, T, hd)
    return layer.wo(out.transpose(1, 2).reshape(B, T, H * hd))  # heads side by side -> (B, T, dim)


with torch.no_grad():
    attended = attention(normed, attn, config.rope_theta)
    torch.testing.assert_close(attended, attn(normed, cos, sin, None)[0])  # mask None: the causal default
print(f"attention: {tuple(normed.shape)} -> {tuple(attended.shape)}, {attn.n_heads} query heads, "
      f"{attn.n_kv_heads} key/value heads")

# %% [markdown]
# In `tiny` every query head has its own key/value head, so the repeat does nothing. To see the
# grouping at work, a grouped copy of this very layer: the same query and output weights, and
# only the first two key/value heads, each shared by two query heads. It is built on the "meta"
# device (shapes, no numbers) and then given those weights.

# %%
from minimind_v.model.llm import Attention

hd = attn.head_dim
with torch.device("meta"):
    grouped = Attention(config_from_preset(R.preset, vocab_size=config.vocab_size, n_kv_heads=2), layer_idx=0)
grouped.load_state_dict({"wq.weight": attn.wq.weight.clone(), "wo.weight": attn.wo.weight.clone(),
                         "wk.weight": attn.wk.weight[:2 * hd].clone(), "wv.weight": attn.wv.weight[:2 * hd].clone()},
                        assign=True)
with torch.no_grad():
    torch.testing.assert_close(attention(normed, grouped, config.rope_theta), grouped(normed, cos, sin, None)[0])
    k = grouped.wk(normed).view(B, T, 2, hd).transpose(1, 2)  # (1, 2, T, hd): two key heads
    torch.testing.assert_close(k.repeat_interleave(2, dim=1), repeat_kv(k, 2))  # (1, 4, T, hd)
print("query head -> key/value head:", {h: h // 2 for h in range(grouped.n_heads)})
print(f"keys + values cached per position and layer: {2 * grouped.n_kv_heads * hd} numbers "
      f"instead of {2 * attn.n_kv_heads * hd}")

# %% [markdown]
# ### SwiGLU
#
# After attention has gathered from the other positions, the feed-forward layer works on each
# position alone. SwiGLU makes two projections of the input, passes one through SiLU
# (x·sigmoid(x), a smooth ReLU) and uses it as a gate on the other, then projects back:
# `w2(silu(w1 x) * w3 x)`. Three matrices instead of the classic MLP's two, so the hidden width is
# 8/3 of `dim` rather than 4×, which keeps the cost the same; it is rounded up to a multiple of 64.

# %%
def swiglu(x, w1, w2, w3):
    """(B, T, dim) -> (B, T, dim), each position on its own."""
    gate = x @ w1.T  # (B, T, dim) -> (B, T, hidden)
    return (gate * torch.sigmoid(gate) * (x @ w3.T)) @ w2.T  # silu(gate) * up: (B, T, hidden) -> (B, T, dim)


ff = block.feed_forward
with torch.no_grad():
    stream = x + attended  # the residual stream after the attention half of block 0
    ff_in = block.ffn_norm(stream)
    torch.testing.assert_close(swiglu(ff_in, ff.w1.weight, ff.w2.weight, ff.w3.weight), ff(ff_in))
print(f"hidden width: 64 * ceil(8 * {config.dim} / 3 / 64) = {64 * math.ceil(8 * config.dim / 3 / 64)} "
      f"(config: {config.hidden_dim})")

# %% [markdown]
# ### All together
#
# The decoder, from the pieces above and the model's weights: the embedding, every block's two
# halves with their residual additions, the final RMSNorm, and the tied head (the embedding matrix
# again). It gives the package's logits. And, because of the causal mask, a different last token
# changes the logits of the last position only.

# %%
def decoder(ids):
    """(B, T) token ids -> (B, T, vocab) next-token logits."""
    h = model.tok_embeddings(ids)  # (B, T, dim)
    for layer in model.layers:
        h = h + attention(rms_norm(h, layer.attention_norm.weight, config.norm_eps), layer.attention, config.rope_theta)
        w = layer.feed_forward
        h = h + swiglu(rms_norm(h, layer.ffn_norm.weight, config.norm_eps), w.w1.weight, w.w2.weight, w.w3.weight)
    return rms_norm(h, model.norm.weight, config.norm_eps) @ model.tok_embeddings.weight.T  # (B, T, vocab)


other_ids = x_ids.clone()
other_ids[0, -1] = (x_ids[0, -1] + 1) % config.vocab_size  # another last token
with torch.no_grad():
    ours, package = decoder(x_ids), model(input_ids=x_ids, use_cache=False).logits
    torch.testing.assert_close(ours, package)
    other = model(input_ids=other_ids, use_cache=False).logits
torch.testing.assert_close(other[:, :-1], package[:, :-1])  # every earlier position: unchanged
print(f"logits {tuple(ours.shape)}: the reader's decoder = the package's (max difference "
      f"{(ours - package).abs().max():.1e})")
print(f"another last token moves the last position's logits by up to {(other - package)[0, -1].abs().max():.1e}, "
      f"the earlier ones by {(other - package)[0, :-1].abs().max():.1e}")

# %% [markdown]
# ## Where the parameters are
#
# The embedding matrix (counted once: the head is the same matrix), and in every block the
# attention's four matrices, the feed-forward's three and the two norms' gains.

# %%
def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


block = model.layers[0]
print(f"token embedding (tied with the output head): {count(model.tok_embeddings):>10,}  "
      f"= vocab {config.vocab_size} x dim {config.dim}")
print(f"one block: attention {count(block.attention):>9,}, feed-forward {count(block.feed_forward):>9,}, "
      f"norms {count(block.attention_norm) + count(block.ffn_norm):>5,}")
print(f"{config.n_layers} blocks:                                  {config.n_layers * count(block):>10,}")
print(f"total:                                      {count(model):>10,}")
assert model.output.weight is model.tok_embeddings.weight  # tied: one matrix, counted once

# %% [markdown]
# The three presets at the original vocabulary of 6400. We build each model on PyTorch's "meta"
# device, which creates the parameters' shapes without allocating their memory, so even the
# 109M-parameter `base` is counted in an instant.

# %%
import torch
from IPython.display import Markdown, display

from minimind_v.config import PRESETS

rows = ["| preset | dim | layers | heads | KV heads | FFN hidden | parameters |", "|---|---:|---:|---:|---:|---:|---:|"]
for name in PRESETS:
    preset_config = config_from_preset(name, vocab_size=6400)
    with torch.device("meta"):
        n_params = count(MiniMindForCausalLM(preset_config))
    rows.append(f"| {name} | {preset_config.dim} | {preset_config.n_layers} | {preset_config.n_heads} | "
                f"{preset_config.n_kv_heads} | {preset_config.hidden_dim} | {n_params / 1e6:.1f}M |")
display(Markdown("\n".join(rows)))

# %% [markdown]
# ## One forward pass
#
# Token ids (B, T) become embeddings (B, T, dim), pass through the blocks, and come out as
# logits (B, T, vocab): at every position, a score for every possible next token. The loss is the
# cross-entropy of the true next token. An untrained model spreads its bet evenly, so its loss
# starts near ln(vocab).

# %%
import math

import torch.nn.functional as F

chat_ids = torch.tensor([tokenizer(chat, add_special_tokens=False).input_ids])  # (1, T)
with torch.no_grad():
    embeddings = model.tok_embeddings(chat_ids)  # (1, T) -> (1, T, dim)
    logits = model(input_ids=chat_ids, use_cache=False).logits  # (1, T, vocab)
    loss = model(input_ids=chat_ids, labels=chat_ids, use_cache=False).loss  # shifts the labels itself
by_hand = F.cross_entropy(logits[0, :-1], chat_ids[0, 1:])  # position t scores token t+1
print("input_ids:", tuple(chat_ids.shape), " embeddings:", tuple(embeddings.shape), " logits:", tuple(logits.shape))
print(f"loss of the untrained model: {loss.item():.3f} (by hand: {by_hand.item():.3f});  "
      f"ln(vocab) = {math.log(config.vocab_size):.3f}")

# %% [markdown]
# ## Pretraining the decoder on text
#
# The decoder learns the world's language from its captions and answers, image tags removed,
# with a loss on every token. Like every training stage it runs as its own process under
# `torchrun`, launched from this cell.

# %%
module, args = stage_commands(RUN, R)["llm"]
print("torchrun --standalone --nproc_per_node", NPROC, "-m", module, " ".join(args))
LLM_DIR = stage_dir(RUN, "llm")
# Reused when a finished llm stage with these settings and inputs is there; else trained.
result = run_stage(RUN, R, "llm", nproc=NPROC)

# %%
records = read_metrics(LLM_DIR / "metrics.jsonl")
fig = plot_loss(records, f"text LM ({R.preset}): next-token loss")
fig.axes[0].axhline(math.log(len(tokenizer)), color="0.5", ls="--", lw=1, label="ln(vocab): a uniform guess")
fig.axes[0].legend(fontsize=8)
save_figure(fig, "02_llm_loss.png")
plt.show()
print(next(r["summary"] for r in reversed(records) if "summary" in r))

# %% [markdown]
# ## What the text model says
#
# Ask it to describe "this picture". It has never seen one, so whatever it says is a made-up
# scene: it has learned the *form* of a caption, not what is in any given image. That is the gap
# the next chapters close.

# %%
lm = MiniMindForCausalLM.from_pretrained(LLM_DIR).eval()
request = render_chat([{"role": "user", "content": "Describe this picture briefly."}], add_generation_prompt=True)
request_ids = torch.tensor([tokenizer(request, add_special_tokens=False).input_ids])
torch.manual_seed(0)
with torch.no_grad():
    greedy = lm.generate(request_ids, max_new_tokens=40, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    sampled = lm.generate(request_ids.repeat(3, 1), max_new_tokens=40, do_sample=True, temperature=0.8,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
start = request_ids.shape[1]
print("greedy: ", tokenizer.decode(greedy[0, start:], skip_special_tokens=True))
for row in sampled:
    print("sampled:", tokenizer.decode(row[start:], skip_special_tokens=True))

# %% [markdown]
# ### Guessing ahead
#
# Each greedy token costs one pass over every weight, for one row of arithmetic. In a model with
# large weights (the `small` preset reads 102 MiB per token) the machine spends that pass reading
# memory, and a pass over three rows costs little more than over one. A caption repeats its own
# words ("a small ... in the top left and a large ... at the top"), so the next tokens can often
# be guessed for free: find the last few tokens earlier in the prompt or the answer, and copy what
# followed them (*prompt lookup*). One pass then checks every guess at once, and the model keeps
# the guesses it agrees with, plus its own next token. What comes out is greedy decoding's
# answer, token for token; only the number of passes changes. The package's `generate` does this
# when asked (`prompt_lookup_num_tokens`, transformers' name for it; the chat's `--prompt-lookup`).
# For this tiny model a pass is mostly Python around small products, so fewer passes are not yet
# fewer seconds (the README's Results measure both). Counting the passes (the final norm runs once
# in each):

# %%
passes = []
hook = lm.norm.register_forward_hook(lambda *args: passes.append(1))
with torch.no_grad():
    plain = lm.generate(request_ids, max_new_tokens=40, do_sample=False,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    plain_passes = len(passes)
    passes.clear()
    looked_up = lm.generate(request_ids, max_new_tokens=40, do_sample=False, prompt_lookup_num_tokens=10,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
hook.remove()
print(f"the same {plain.shape[1] - start} tokens: {torch.equal(plain, looked_up)};  passes over the weights: "
      f"{plain_passes} one token at a time, {len(passes)} with prompt lookup")

# %% [markdown]
# ## Summary
#
# * A byte-level BPE turns text into ids; the chat format `<s>role\n...</s>\n` marks who speaks,
#   and `<|image|>` is reserved for the picture.
# * The MiniMind decoder is RMSNorm + RoPE attention with grouped queries + SwiGLU, repeated,
#   with tied input and output embeddings: `small` is ~27M parameters, `base` ~109M. Each piece
#   fits in a few lines, and those lines, put together, give the package model's logits.
# * The causal mask lets one forward pass train every position at once: position t never sees
#   the tokens after it.
# * Pretrained on text, the decoder writes the world's kind of sentences, but it cannot know what
#   a particular picture shows.
# * Decoding one answer reads every weight once per token; guesses copied from earlier text
#   (prompt lookup) and checked in one pass give the same greedy answer in fewer passes.
#
# Next: the projection that turns CLIP's patch tokens into vectors of the decoder's width.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/02_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** RMSNorm is scale-invariant: `RMSNorm(c·x) = RMSNorm(x)` for any c > 0,
#    except where `eps` matters. For vectors with an RMS of 0.02, like the untrained embeddings
#    above, by how much does eps pull the output's RMS below 1? And at an RMS of 2? Predict with
#    1/√(1 + eps/rms²), then check with the package's `RMSNorm`. What does c < 0 do?
# 2. **Predict, then run.** Put one query vector at position m and one key vector at position n,
#    rotate both with `apply_rope`, and take their dot product. Predict which of these pairs give
#    the same score: (m, n) = (5, 2), (105, 102), (1000, 997), (2, 5). Check.
# 3. **Predict, then run.** The KV cache holds, for every layer and every position, one key and
#    one value vector per key/value head. How many bytes does `small` (8 layers, 8 key/value
#    heads of 32) need for 1024 tokens in bfloat16? And with 16 key/value heads, plain multi-head
#    attention? And `base`? Check the formula against the cache a (shortened) model really fills.
# 4. **Change the code.** Take the causal mask out of `attention` and feed it two sequences that
#    differ only in their last token. Which positions' outputs differ now? What would training
#    with such a model learn?
# 5. **Predict, then run.** The feed-forward width of `small` and `base`: 64·⌈(8·dim/3)/64⌉.
#    Compare SwiGLU's parameters (three dim × hidden matrices) with a classic 4× MLP's (two
#    dim × 4·dim matrices) at dim 768: why 8/3?


# %%
from minimind_v.chapters import close_chapter

close_chapter()
