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
# # Chapter 5: stage 1, pretraining on captions
#
# ```
# image ─CLIP─▶ tokens ─projection─▶ ─substitution─▶ prompt ─decoder─▶ caption   ◀── all of it, trained
# ```
#
# The pieces are joined; now the projection must learn to translate. Stage 1 shows the model a
# picture with a request such as "Describe this picture briefly." and trains it to produce the
# picture's caption. The caption names everything in the picture, so the only way to lower the
# loss is to read the 50 image vectors: the projection learns to put them where the decoder
# understands them.
#
# What trains is a choice (`--freeze`). CLIP is always frozen; the original MiniMind-V fine-tunes
# the projection and the language model, and so does our default for this stage, `all`. The cheaper
# `ends` (the projection plus the first and last decoder layers) leaves the middle of the decoder as
# chapter 2 left it, and on the shapes world it is not enough: the caption loss stays several times
# higher. The captions list a picture's objects in random order, so part of every caption cannot
# be predicted from the picture: the loss cannot reach zero, and the curve below flattens above it.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)

from minimind_v.chapters import open_chapter, read_metrics, plot_loss, save_figure
from minimind_v.recipe import run_stage, stage_commands, stage_dir

R, RUN, NPROC = open_chapter(QUICK, NPROC, needs=['world', 'clip', 'tokenizer', 'llm'])
WORLD = stage_dir(RUN, "world")

# %% [markdown]
# ## What trains
#
# The same starting model as chapters 3 and 4, counted under each freeze strategy.

# %%
import torch

from minimind_v.model.vision import VisionEncoder
from minimind_v.tokenizer import load_tokenizer
from minimind_v.train.common import FREEZE_STRATEGIES, set_trainable
from minimind_v.model.vlm import load_start_model

encoder = VisionEncoder.from_pretrained(stage_dir(RUN, "clip"))
tokenizer = load_tokenizer(stage_dir(RUN, "llm"))
start = load_start_model(str(stage_dir(RUN, "llm")), tokenizer, encoder, "linear")
for strategy, meaning in FREEZE_STRATEGIES.items():
    trainable, total = set_trainable(start, strategy)
    print(f"{strategy:5s} {trainable:>10,} of {total:,} parameters ({trainable / total:6.1%}): {meaning}")
print(f"CLIP (always frozen): {sum(p.numel() for p in encoder.parameters()):,} parameters")
print(f"this stage uses --freeze {R.pretrain_freeze}")

# %% [markdown]
# ## What the captions teach: the order of the objects
#
# A caption lists every object, and the order matters more than it looks. Listed in reading
# order (top left to bottom right), the decoder can write the caption by scanning the patches
# from the first to the last, and it never has to find an object by what it is. Our captions list
# the objects in random order, so after writing "a small red circle" the model must find that
# circle among the patches to say where it is. That lookup is exactly what a question such as
# "Where is the red circle?" needs in chapter 6. With the same training steps, the change took
# held-out answers to "where" questions after SFT from 58.5% to 91% (the README's Results).

# %%
from minimind_v.data.datasets import read_records

for record in read_records(WORLD / "pretrain_data.json")[:3]:
    print(record["conversations"][1]["value"])

# %% [markdown]
# ## A training batch
#
# The dataset reads the original format: each record becomes token ids, labels and a picture.
# Labels are -100 (no loss) everywhere except the caption and its closing `</s>`; chapter 6 looks
# at this mask closely. Batches are padded to their longest sample.

# %%
from minimind_v.data.datasets import ChatDataset, collate

dataset = ChatDataset(WORLD / "pretrain_data.json", tokenizer, encoder.num_tokens,
                      image_dir=WORLD / "pretrain_images", preprocess=encoder.preprocess)
batch = collate([dataset[i] for i in range(4)], pad_id=tokenizer.pad_token_id)
print(f"{len(dataset)} caption samples")
print("input_ids:     ", tuple(batch.input_ids.shape))
print("attention_mask:", tuple(batch.attention_mask.shape), " real tokens per row:", batch.attention_mask.sum(1).tolist())
print("labels:        ", tuple(batch.labels.shape), " tokens with a loss:", batch.n_targets)
print("images:        ", tuple(batch.images.shape), "(pixels)")

# %% [markdown]
# Since CLIP never changes, encoding the same picture again at every step would be wasted work,
# and on a CPU it is most of the work. With `--feature-cache` the stage encodes every picture once
# into a memory-mapped file and the batches carry the 50 tokens instead of the pixels:
# `images` becomes `(B, 50, vision_width)`.
#
# ## Training
#
# Launched like every stage, from this cell, under `torchrun`.

# %%
module, args = stage_commands(RUN, R)["pretrain"]
print("torchrun --standalone --nproc_per_node", NPROC, "-m", module, " ".join(args))
PRETRAIN_DIR = stage_dir(RUN, "pretrain")
# Reused when a finished pretrain stage with these settings and inputs is there; else trained.
result = run_stage(RUN, R, "pretrain", nproc=NPROC)

# %%
import matplotlib.pyplot as plt

records = read_metrics(PRETRAIN_DIR / "metrics.jsonl")
fig = plot_loss(records, "stage 1: caption loss (answer tokens only)")
save_figure(fig, "05_pretrain_loss.png")
plt.show()
print(next(r["summary"] for r in reversed(records) if "summary" in r))

# %% [markdown]
# The feature cache the stage built, next to the data:

# %%
from minimind_v.data.features import ensure_cache

cache = ensure_cache(encoder, WORLD / "pretrain_images", WORLD / "feature_cache" / "pretrain_images", progress=False)
print(cache)
first = cache.names[0]
print(f"cache[{first!r}]: {tuple(cache[first].shape)} {cache[first].dtype}")

# %% [markdown]
# ## Captions after pretraining
#
# The demo pictures were kept out of training. For each, the caption the world wrote and the one
# the model writes. With the quick settings the model trains for a few dozen steps only, so expect
# fluent sentences that get little of the picture right; the full recipe trains far longer.

# %%
import json
import textwrap

from minimind_v.data.images import load_image
from minimind_v.evaluate import CAPTION_PROMPT, DEMO_IMAGES
from minimind_v.inference import answer, load_vlm

bundle = load_vlm(PRETRAIN_DIR)
demos = json.loads((WORLD / "world.json").read_text(encoding="utf-8"))["eval_images"]
images = [load_image(WORLD / DEMO_IMAGES / d["file"]) for d in demos]
captions = answer(bundle, images, [CAPTION_PROMPT] * len(images))
blind = answer(bundle, None, [CAPTION_PROMPT])[0]  # the same prompt with no picture

cols = 4
rows = (len(images) + cols - 1) // cols
fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 4.1 * rows), layout="constrained")
for ax, image, demo, caption in zip(axes.flat, images, demos, captions):
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(textwrap.fill("truth: " + demo["caption"], 36) + "\n" + textwrap.fill("model: " + caption, 36),
                  fontsize=8.5, loc="left")
for ax in axes.flat[len(images):]:
    ax.axis("off")
fig.suptitle(f'"{CAPTION_PROMPT}" after stage 1')
save_figure(fig, "05_captions.png")
plt.show()
print("with no picture at all, the model says:", repr(blind))

# %% [markdown]
# ## The projection after training
#
# Chapter 3 found the untrained projection's vectors far longer than the word embeddings. Here is
# the same measurement after stage 1. Nothing in the loss asks the lengths to match: each block
# reads its input through an RMSNorm, and the first decoder layer, which trains in this stage, can
# adapt to whatever scale the projection settles on. What the loss asks is that the directions
# carry the picture.

# %%
with torch.no_grad():
    tokens = encoder(encoder.preprocess(images))  # (n, 50, vision_width)
    projected = bundle.model.vision_proj(tokens)  # (n, 50, dim)
print(f"projected patch tokens: median length {projected.norm(dim=-1).median():.3f}")
print(f"word embeddings:        median length {bundle.model.tok_embeddings.weight.norm(dim=-1).median():.3f}")

# %% [markdown]
# ## Summary
#
# * Stage 1 trains on (picture, caption) pairs with the loss on the caption only; CLIP stays
#   frozen, and `--freeze` decides how much of the decoder moves with the projection.
# * The frozen encoder makes a feature cache possible: every picture is encoded once, and training
#   reads `(B, 50, vision_width)` tokens instead of pixels.
# * The result is a model that describes pictures; chapter 6 teaches it to answer questions.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/05_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** For the book's VLM (the `tiny` decoder, dim 128 and 4 layers, joined
#    to the 128-wide tiny CLIP), how many parameters train under `--freeze proj`? Under `ends`,
#    which adds the first and last blocks? Check with `set_trainable`.
# 2. **Predict, then run.** How many bytes does the feature cache hold per picture for CLIP
#    ViT-B/32 in float16 (the default)? For the original's ~595,000 pretraining pictures? For our
#    tiny CLIP and 20,000 pictures? Check the per-picture size against a cache built for three
#    pictures with a random encoder.
# 3. **Predict, then run.** How many tokens of a caption sample carry a loss? Count the caption's
#    tokens first, then check with `encode_chat`, and for a batch with `collate` and
#    `Batch.n_targets`.
# 4. **Predict, then run.** How many different captions can one picture of three objects get,
#    counting the orders of the objects and the five sentence templates? How many nats of each
#    such caption can no picture predict? Count the captions `shapes.caption` really writes for
#    one scene.
# 5. **Change the code.** Take one optimiser step with `--freeze proj` (`set_trainable(model,
#    "proj")`) on a tiny VLM and compare every parameter before and after: which ones moved?


# %%
from minimind_v.chapters import close_chapter

close_chapter()
