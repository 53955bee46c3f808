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

from minimind_v.book import open_chapter, read_metrics, plot_loss, save_figure
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
# MiniMind is a stack of identical blocks between a token embedding and an output head:
#
# * **RMSNorm** before each sub-layer: scale every vector to unit root-mean-square (no mean, no bias);
# * **attention** with rotary position embeddings (RoPE) and grouped queries (GQA): several query
#   heads share one key/value head, which shrinks the cache kept while generating;
# * a **SwiGLU** feed-forward layer, `w2(silu(w1 x) * w3 x)`, with a hidden width of 8/3 of the
#   model width, rounded up to a multiple of 64;
# * the output head **shares its matrix with the token embedding** (tied weights).
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
print(model)

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
# ## Summary
#
# * A byte-level BPE turns text into ids; the chat format `<s>role\n...</s>\n` marks who speaks,
#   and `<|image|>` is reserved for the picture.
# * The MiniMind decoder is RMSNorm + RoPE attention with grouped queries + SwiGLU, repeated,
#   with tied input and output embeddings: `small` is ~27M parameters, `base` ~109M.
# * Pretrained on text, the decoder writes the world's kind of sentences, but it cannot know what
#   a particular picture shows.
#
# Next: the projection that turns CLIP's patch tokens into vectors of the decoder's width.
