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
# # Chapter 4: placeholder substitution
#
# ```
# 50 word-sized vectors ─substitution─▶ prompt embeddings ─decoder─▶   ◀── this chapter
# ```
#
# The decoder reads a sequence of embeddings, one per token. To slip a picture into that
# sequence, MiniMind-V reserves room for it in the prompt: the dataset's `<image>` tag is expanded
# into **50 placeholder tokens**, one per CLIP token. The prompt is embedded as usual, and then the
# 50 placeholder embeddings are **overwritten** by the 50 projected patch tokens. From there on the
# decoder cannot tell a patch from a word: both are just vectors in its sequence.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)

from minimind_v.chapters import open_chapter, save_figure
from minimind_v.recipe import stage_dir

R, RUN, NPROC = open_chapter(QUICK, NPROC, needs=['world', 'clip', 'tokenizer', 'llm'])
WORLD = stage_dir(RUN, "world")

# %% [markdown]
# The model of chapter 3: the pretrained text decoder with a fresh projection, and the frozen
# tiny CLIP attached.

# %%
import torch

from minimind_v.model.vision import VisionEncoder
from minimind_v.tokenizer import load_tokenizer
from minimind_v.model.vlm import load_start_model

torch.manual_seed(R.seed)
encoder = VisionEncoder.from_pretrained(stage_dir(RUN, "clip"))
tokenizer = load_tokenizer(stage_dir(RUN, "llm"))
vlm = load_start_model(str(stage_dir(RUN, "llm")), tokenizer, encoder, "linear").eval()
vlm.attach_vision_encoder(encoder)
cfg = vlm.config

# %% [markdown]
# ## The prompt
#
# A question from the SFT data, as the model sees it when asked to answer: the `<image>` tag
# became 50 copies of `<|image|>` (id 3), and the prompt ends with `<s>assistant\n`. The
# **processor** makes it: it joins the tokenizer, the chat template and the encoder's image
# processor, and turns questions and pictures into the model's inputs (`question_ids` gives the
# ids of one question's prompt). A question written with its picture after the words, as half of
# the dataset's first questions are, is asked with the picture moved in front: nearly every SFT
# question comes after its picture, and chapter 07 measures what the other order costs.

# %%
import matplotlib.pyplot as plt

from minimind_v.data.datasets import read_records
from minimind_v.data.images import load_image
from minimind_v.data.records import find_image  # sft_images/COCO_train2014_<image>, v1's SFT naming
from minimind_v.model.processing import MiniMindVProcessor
from minimind_v.viz import plot_token_strip

processor = MiniMindVProcessor.from_encoder(tokenizer, encoder)  # 50 placeholders per <image>, as the encoder
record = read_records(WORLD / "sft_data.json")[0]
question = record["conversations"][0]["value"]
image = load_image(find_image(WORLD / "sft_images", record["image"]))
input_ids = torch.tensor([processor.question_ids(question)])  # (1, T)
print(repr(question))
text = tokenizer.decode(input_ids[0])
print(repr(text.replace("<|image|>" * 50, "<|image|> x 50")))
print("input_ids:", tuple(input_ids.shape))

fig = plot_token_strip(tokenizer, input_ids, image_token_ids=cfg.image_token_ids,
                       title=f"the prompt: {input_ids.shape[1]} tokens, 50 of them stand for the picture")
save_figure(fig, "04_prompt_tokens.png")
plt.show()

# %% [markdown]
# ## Finding the placeholders
#
# `placeholder_mask` marks every position covered by the placeholder pattern, for a whole batch at
# once: it compares every window of 50 ids with the pattern, then spreads each match over its 50
# positions. The pattern is a sequence rather than one id because the original MiniMind tokenizer
# has no `<|image|>` token: there the placeholder is the text `'<' * 25 + '>' * 25`, 50 ordinary
# tokens. A toy example with a 3-token pattern:

# %%
from minimind_v.model.vlm import placeholder_mask

toy = torch.tensor([[9, 5, 6, 7, 9, 9],
                    [5, 6, 9, 5, 6, 7]])
print(placeholder_mask(toy, torch.tensor([5, 6, 7])).int())  # (2, 6): only complete matches count

pattern = torch.tensor(cfg.image_token_ids)
mask = placeholder_mask(input_ids, pattern)  # (1, T) bool
positions = mask[0].nonzero().squeeze(1)
print(f"mask: {tuple(mask.shape)}, {int(mask.sum())} image positions, from {int(positions[0])} to {int(positions[-1])}")

# %% [markdown]
# The same search written as plainly as possible: slide a window of N ids along the rows, and
# where it equals the pattern, mark its N positions. It is a Python loop over positions, fine to
# read but too slow for a training step; the package does the same comparison for all windows at
# once. Both agree on the toy rows and on the real prompt.

# %%
def find_placeholders(input_ids, pattern):
    """(B, T) bool: True on every position inside a complete copy of `pattern` (N ids)."""
    B, T = input_ids.shape
    N = len(pattern)
    found = torch.zeros(B, T, dtype=torch.bool)
    for start in range(T - N + 1):  # every window of N ids
        hit = (input_ids[:, start:start + N] == pattern).all(dim=1)  # (B,): rows whose window is the pattern
        found[hit, start:start + N] = True
    return found


toy_pattern = torch.tensor([5, 6, 7])
torch.testing.assert_close(find_placeholders(toy, toy_pattern), placeholder_mask(toy, toy_pattern))
torch.testing.assert_close(find_placeholders(input_ids, pattern), mask)
print(f"the reader's mask = placeholder_mask: {int(find_placeholders(toy, toy_pattern).sum())} toy positions, "
      f"{int(find_placeholders(input_ids, pattern).sum())} in the prompt")

# %% [markdown]
# ## Before and after
#
# Embedding the prompt gives one vector per token. The 50 placeholders are the same token, so
# they start as 50 copies of one vector. `substitute_image_tokens` projects the patch tokens and
# writes them into those rows with one `masked_scatter`; every other row is left untouched.

# %%
with torch.no_grad():
    image_tokens = encoder(encoder.preprocess(image))  # (1, 50, vision_width)
    before = vlm.tok_embeddings(input_ids)  # (1, T) -> (1, T, dim)
    after = vlm.substitute_image_tokens(input_ids, before, image_tokens)  # (1, T, dim)
    projected = vlm.vision_proj(image_tokens)  # (1, 50, vision_width) -> (1, 50, dim)

changed = (after - before).norm(dim=-1) > 0  # (1, T)
print("image tokens:", tuple(image_tokens.shape), " embeddings before:", tuple(before.shape),
      " after:", tuple(after.shape))
print("placeholder rows before substitution all equal:", bool((before[0, mask[0]] == before[0, positions[0]]).all()))
print("changed positions are exactly the image positions:", torch.equal(changed, mask))
print("the image rows now hold the projected patches, in order:", torch.equal(after[0, mask[0]], projected[0]))
assert torch.equal(changed, mask) and torch.equal(after[0, mask[0]], projected[0])

# %% [markdown]
# The same in a picture: the embedding matrices before and after (positions across, features
# down; both on the same colour scale), and each position's vector length. The projection is still
# untrained, so the picture's vectors are far longer than the words around them (chapter 3).

# %%
import numpy as np

T = input_ids.shape[1]
limit = float(before.abs().flatten().quantile(0.99))
fig, axes = plt.subplots(3, 1, figsize=(11, 7.2), sharex=True, gridspec_kw={"height_ratios": [1, 1, 0.8]})
for ax, values, title in ((axes[0], before, "token embeddings"),
                          (axes[1], after, "after substitution (same colour scale)")):
    heat = ax.imshow(values[0].T.numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                     interpolation="nearest", extent=(-0.5, T - 0.5, cfg.dim, 0))
    ax.set_ylabel(f"feature (dim {cfg.dim})")
    ax.set_title(title, fontsize=10, loc="left")
axes[2].semilogy(np.arange(T), before[0].norm(dim=-1).numpy(), ".-", label="before")
axes[2].semilogy(np.arange(T), after[0].norm(dim=-1).numpy(), ".-", label="after")
axes[2].set_ylabel("vector length")
axes[2].set_xlabel("position in the prompt")
axes[2].legend(fontsize=8, loc="center right")
for ax in axes:
    ax.axvspan(int(positions[0]) - 0.5, int(positions[-1]) + 0.5, color="#4a86c5", alpha=0.12, lw=0)
axes[2].text((int(positions[0]) + int(positions[-1])) / 2, axes[2].get_ylim()[1], "the 50 image positions",
             ha="center", va="top", fontsize=9, color="#2b5d8f")
fig.tight_layout()
fig.subplots_adjust(right=0.9)  # room for the colour bar beside the two heat maps
top, bottom = axes[0].get_position().y1, axes[1].get_position().y0
bar = fig.colorbar(heat, cax=fig.add_axes([0.915, bottom, 0.012, top - bottom]))
bar.set_label("feature value (both maps; the scale stops at the\n99th percentile of the token embeddings)", fontsize=8)
save_figure(fig, "04_substitution.png")
plt.show()

# %% [markdown]
# ## A batch
#
# Training works on batches of prompts of different lengths, each with its own picture. The
# images are given in the order their placeholders appear, row by row; one `masked_scatter` fills
# them all. Here two prompts, left-padded to the same length as for generation: the processor
# renders each question with the chat template, expands its `<image>` tag, pads the rows on the
# left and prepares the pictures, in the order of their tags.

# %%
def ask(r: dict) -> str:
    """A record's question as the chat prompt's text, up to where the answer begins (the <image> tag still a tag)."""
    return processor.apply_chat_template([{"role": "user", "content": r["conversations"][0]["value"]}],
                                         add_generation_prompt=True)


second = next(r for r in read_records(WORLD / "sft_data.json")
              if len(processor.question_ids(r["conversations"][0]["value"])) != input_ids.shape[1])
second_image = load_image(find_image(WORLD / "sft_images", second["image"]))
batch = processor(text=[ask(record), ask(second)], images=[image, second_image],
                  padding=True, padding_side="left", return_tensors="pt")
batch_ids, attention_mask = batch["input_ids"], batch["attention_mask"]  # (2, T_max), 0 on the padding
with torch.no_grad():
    batch_images = encoder(batch["pixel_values"])  # (2, 3, S, S) -> (2, 50, vision_width)
    batch_after = vlm.substitute_image_tokens(batch_ids, vlm.tok_embeddings(batch_ids), batch_images)
    batch_projected = vlm.vision_proj(batch_images)  # (2, 50, dim)
batch_mask = placeholder_mask(batch_ids, pattern)
print("prompt lengths:", attention_mask.sum(1).tolist(), " batch:", tuple(batch_ids.shape),
      " images:", tuple(batch_images.shape), " embeddings:", tuple(batch_after.shape))
for row in range(2):
    print(f"row {row}: image positions {int(batch_mask[row].nonzero()[0])}..{int(batch_mask[row].nonzero()[-1])}, "
          f"hold image {row}: {torch.equal(batch_after[row, batch_mask[row]], batch_projected[row])}")

# %% [markdown]
# The substitution written out. The mask picks the placeholder rows of the whole batch in reading
# order, row by row, which is the order of the images: image 0's 50 tokens fill the first 50
# placeholder rows, image 1's the next 50. A count that does not match is an error, never a silent
# misalignment. On the batch and on the single prompt, the reader's version gives the package's
# embeddings.

# %%
def substitute(embeds, found, projected):
    """embeds (B, T, dim), found (B, T) bool, projected (n_images, N, dim) -> new (B, T, dim)."""
    n_images, N, dim = projected.shape
    if int(found.sum()) != n_images * N:
        raise ValueError(f"{int(found.sum())} placeholder positions, but {n_images} image(s) of {N} tokens")
    out = embeds.clone()
    out[found] = projected.reshape(n_images * N, dim)  # (n_images * N, dim) into the marked rows, in order
    return out


with torch.no_grad():
    ours = substitute(vlm.tok_embeddings(batch_ids), find_placeholders(batch_ids, pattern), batch_projected)
    torch.testing.assert_close(ours, batch_after)
    torch.testing.assert_close(substitute(before, find_placeholders(input_ids, pattern), projected), after)
print("the reader's substitution = substitute_image_tokens:", tuple(ours.shape), "and", tuple(after.shape))

# %% [markdown]
# ## Into the decoder
#
# `MiniMindVLM.forward` does the substitution itself when given pixels (through the attached
# encoder) or ready image tokens, then runs the decoder on the embeddings. Without a picture the
# placeholders keep their own embedding: that is the **text-only baseline** of chapter 7. Even with
# an untrained projection, the picture changes what the model predicts next; whether it changes
# it for the better is what training decides.

# %%
with torch.no_grad():
    with_picture = vlm(input_ids=input_ids, pixel_values=encoder.preprocess(image), use_cache=False).logits
    without = vlm(input_ids=input_ids, use_cache=False).logits
print("logits:", tuple(with_picture.shape), "(batch, positions, vocabulary)")
for name, logits in (("with the picture", with_picture), ("text only       ", without)):
    top = logits[0, -1].softmax(-1).topk(5)
    words = ", ".join(f"{tokenizer.decode([int(i)])!r} {p:.2f}" for p, i in zip(top.values, top.indices))
    print(f"{name}: next token after 'assistant\\n': {words}")

# %% [markdown]
# ## Summary
#
# * The `<image>` tag becomes 50 placeholder tokens; `placeholder_mask` finds them in a batch,
#   whatever the pattern (`<|image|>` x 50 here, `'<' * 25 + '>' * 25` with the original tokenizer).
# * `substitute_image_tokens` replaces exactly those 50 rows of the embeddings with the projected
#   patches, in order, with one `masked_scatter`: `(B, T, dim)` in, `(B, T, dim)` out.
# * After that the decoder is an ordinary language model reading a sequence.
#
# Next: teaching the projection (and, by default, the whole decoder with it) to make sense of the
# picture.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/04_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** The prompt for "What colour is the circle?" with one picture has some
#    text tokens plus the placeholders. How much longer is it with ViT-L/14's 577 tokens per
#    picture instead of 50? What does that do to the cost of attention over the prompt?
# 2. **Predict, then run.** Break the count: a prompt with 49 placeholders for a 50-token picture,
#    and a batch of two prompts with a picture each but the tokens of one picture only. What does
#    `substitute_image_tokens` say in each case? And `substitute` above?
# 3. **Predict, then run.** With a pattern of several ids, as in the original tokenizer
#    (`'<' * 25 + '>' * 25`; here shortened to `[5, 5, 6, 6]`), which positions does
#    `placeholder_mask` mark in `[5, 5, 6, 6, 5, 5, 6, 6]` (two pictures back to back), in
#    `[5, 5, 6, 5, 5, 6, 6, 9]` and in `[5, 6, 6, 9, 5, 5, 6, 9]`? Check with `find_placeholders` too.
# 4. **Predict, then run.** Backpropagate a loss through a forward pass with a picture. What
#    gradient does the row of `<|image|>` in the token embedding receive? And the projection?
#    What does that mean for the placeholder's own embedding during training?


# %%
from minimind_v.chapters import close_chapter

close_chapter()
