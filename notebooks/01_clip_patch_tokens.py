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
# # Chapter 1: CLIP turns a picture into 50 patch tokens
#
# ```
# image ─CLIP─▶ 50 patch tokens   ◀── this chapter
# ```
#
# A language model reads a sequence of vectors, one per token. To let it read a picture we need the
# picture as a sequence of vectors too. MiniMind-V gets them from the vision half of **CLIP
# ViT-B/32**: the image is cut into square patches of 32×32 pixels, each patch becomes one vector,
# and a transformer lets the patches exchange information. The encoder is trained once (by OpenAI,
# or here by us) and then **frozen**: the VLM never changes it.
#
# Offline we cannot download OpenAI's CLIP, so this chapter trains a miniature with the same
# geometry on the shapes world.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1

from minimind_v.chapters import open_chapter, read_metrics, plot_loss, save_figure
from minimind_v.recipe import run_stage, stage_commands, stage_dir

R, RUN, NPROC = open_chapter(QUICK, NPROC, needs=['world'])
WORLD = stage_dir(RUN, "world")

# %% [markdown]
# ## The geometry: 224 px, 32 px patches, 7×7 + 1 = 50 tokens
#
# CLIP first resizes the picture so its short side is 224 pixels and crops the centre square.
# 224 / 32 = 7 patches per side, 7 × 7 = 49 patches, plus one extra learned **CLS** token that
# collects a summary of the whole image: 50 tokens. Each token has the encoder's width: 768 for
# ViT-B/32, 128 for our tiny CLIP.

# %%
from minimind_v.model.tiny_clip import TinyClipConfig

tiny = TinyClipConfig()
image_size, patch_size = tiny.image_size, tiny.patch_size
grid = image_size // patch_size
num_tokens = 1 + grid * grid
print(f"{image_size} px / {patch_size} px = {grid} patches per side -> {grid}x{grid} = {grid * grid} patches "
      f"+ 1 CLS = {num_tokens} tokens")
print(f"width: tiny CLIP {tiny.vision_width}, CLIP ViT-B/32 768")

# %% [markdown]
# The patch grid over one of our pictures. Token 0 is CLS (it has no place on the grid); tokens
# 1 to 49 are the patches in reading order, row by row. An object covers several patches, which
# is why the shapes world draws even a small object wider than one patch: a shape inside a single
# patch would be squeezed into one vector with its outline mixed into it.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minimind_v.data.datasets import read_records
from minimind_v.data.images import load_image
from minimind_v.data.records import find_image  # sft_images/COCO_train2014_<image>, v1's SFT naming

record = read_records(WORLD / "sft_data.json")[0]
image = load_image(find_image(WORLD / "sft_images", record["image"]))

fig, ax = plt.subplots(figsize=(5.2, 5.2))
ax.imshow(image, extent=(0, image_size, image_size, 0))
for k in range(grid + 1):
    ax.axhline(k * patch_size, color="0.35", lw=0.8)
    ax.axvline(k * patch_size, color="0.35", lw=0.8)
for row in range(grid):
    for col in range(grid):
        ax.text((col + 0.5) * patch_size, (row + 0.5) * patch_size, str(1 + row * grid + col),
                ha="center", va="center", fontsize=8, color="0.25")
ax.set_xticks(np.arange(0, image_size + 1, patch_size))
ax.set_yticks(np.arange(0, image_size + 1, patch_size))
ax.tick_params(labelsize=7)
ax.set_title(f"{grid}x{grid} patches of {patch_size} px = tokens 1-{grid * grid}  (token 0: CLS)", fontsize=10)
fig.tight_layout()
save_figure(fig, "01_patch_grid.png")
plt.show()

# %% [markdown]
# Preprocessing makes the tensor the encoder reads: pixel values scaled to [0, 1] and normalised
# with CLIP's per-channel mean and standard deviation. Cutting it into patches is only a reshape:
# each patch is 3 × 32 × 32 = 3072 numbers.

# %%
from minimind_v.model.tiny_clip import make_image_processor

pixel_values = make_image_processor(image_size)(images=[image], return_tensors="pt")["pixel_values"]
print("pixel_values:", tuple(pixel_values.shape), f"values in [{pixel_values.min():.2f}, {pixel_values.max():.2f}]")
# (1, 3, 224, 224) -> (1, 3, 7, 7, 32, 32) -> (1, 7, 7, 3, 32, 32) -> (1, 49, 3072)
patches = (pixel_values.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)
           .permute(0, 2, 3, 1, 4, 5).reshape(1, grid * grid, 3 * patch_size * patch_size))
print("patches:", tuple(patches.shape))

# %% [markdown]
# ## Training the tiny CLIP
#
# CLIP learns by matching: a batch of pictures and their captions go through an image tower and
# a text tower, and the contrastive loss pulls each picture's vector towards its own caption's and
# away from every other caption in the batch. Our captions name every object's size, colour,
# shape and position, and each picture also meets "hard negatives", its own caption with one thing
# changed, so the encoder must see every object's outline to win.
#
# One more push, a shortcut that only a synthetic world allows: every patch token under an object
# must also predict that object's shape, colour, size and grid position, through a linear head used
# in training only. The contrastive loss judges the summary vector alone, and left to itself a tiny
# CLIP lets its patch tokens forget where they are (a probe then reads a patch's grid cell worse
# from the trained tokens than from random ones). The decoder needs both: what, and where.
#
# The training runs as its own process, launched from this cell under `torchrun`, exactly as on a
# cluster; the cell shows its progress and a live loss curve. **NPROC** is the number of processes.
# With GPUs, use one per GPU. On a CPU every process gets cores / NPROC threads, so that processes ×
# threads never exceed the cores: on a 2-core laptop two processes would only split the same two
# cores and add the cost of averaging gradients between them, so one process is fastest.

# %%
module, args = stage_commands(RUN, R)["clip"]
print("torchrun --standalone --nproc_per_node", NPROC, "-m", module, " ".join(args))
CLIP_DIR = stage_dir(RUN, "clip")
# Reused when a finished clip stage with these settings and inputs is there; else trained.
result = run_stage(RUN, R, "clip", nproc=NPROC)

# %% [markdown]
# What the training left in its `metrics.jsonl`: the loss, the **retrieval accuracy** on held-out
# pictures (in a batch of 64 pictures and their 64 captions, how often a picture's own caption
# scores highest; chance is 1/64), and a **linear probe**.

# %%
records = read_metrics(CLIP_DIR / "metrics.jsonl")
fig = plot_loss(records, "tiny CLIP: contrastive loss")
save_figure(fig, "01_clip_loss.png")
plt.show()
retrieval = [(r["step"], r["retrieval_top1"]) for r in records if "retrieval_top1" in r]
for step, accuracy in retrieval:
    print(f"step {step:5d}: held-out top-1 retrieval {accuracy:.1%} (chance {1 / 64:.1%})")

# %% [markdown]
# ## The contrastive loss, written out
#
# The training process minimised `contrastive_loss` from `minimind_v.model.tiny_clip` (with the
# auxiliary loss beside it). Here is its core in a few lines, run on the trained tiny CLIP. Eight
# held-out pictures and their eight captions give an 8 × 8 table of cosine similarities,
# multiplied by a learned temperature, the **logit scale**. Row i asks "which caption is picture
# i's?", a classification among eight whose right answer is caption i; column j asks the same of
# caption j among the pictures. The loss is the mean of the two cross-entropies. An encoder that
# cannot tell the pictures apart gives every caption the same score and pays ln 8 = 2.08; a
# perfect one pays nearly 0. (Training also adds hard-negative captions as extra columns;
# exercise 4 adds them here.)

# %%
import math

import torch
import torch.nn.functional as F

from minimind_v.model.tiny_clip import contrastive_loss, load_clip
from minimind_v.probes import embed_held_out, load_held_out


def clip_loss(image_embeds, text_embeds, scale):
    """Symmetric cross-entropy over B (picture, caption) pairs: row i of each is a pair, unit vectors."""
    logits = scale * image_embeds @ text_embeds.T  # (B, D) @ (D, B) -> (B, B): picture i vs caption j
    targets = torch.arange(len(logits))  # picture i's caption is caption i, and back
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


clip, clip_tokenizer = load_clip(CLIP_DIR)
held = load_held_out(WORLD, n=8)  # 8 held-out pictures, one caption each
image_embeds, text_embeds = embed_held_out(clip, clip_tokenizer, held)  # (8, D) each, unit length
logit_scale = clip.logit_scale.exp().detach()
ours = clip_loss(image_embeds, text_embeds, logit_scale)
torch.testing.assert_close(ours, contrastive_loss(image_embeds, text_embeds, logit_scale))
similarity = image_embeds @ text_embeds.T  # (8, 8) cosines
print(f"logit scale {logit_scale:.1f}; loss {ours:.3f} (the package's: the same); ln 8 = {math.log(8):.3f}")
print("cosine similarity, pictures (rows) x captions (columns):")
print(similarity.numpy().round(2))
print("best caption for each picture:", similarity.argmax(1).tolist(), " (right: [0, 1, ..., 7])")

# %% [markdown]
# The VLM will not read CLIP's summary vector but the **patch tokens**. Do they know which shape is
# where? The probe fits a linear classifier from frozen tokens to each object's shape, colour,
# size and grid position, on pictures it never trained on, and compares with an encoder of the same size whose
# weights are random. "mean" averages the 49 patch tokens of a one-object picture; "object"
# averages the patch tokens under each object's box; "centre" takes the single patch token under
# each object's centre.

# %%
probe = next((r["probe"] for r in reversed(records) if "probe" in r), None)
if probe is None:
    print("this run skipped the probe (--probe-train 0)")
else:
    from minimind_v.data.clip_examples import ATTRIBUTES

    chance = {attribute: 1 / len(values) for attribute, values in ATTRIBUTES.items()}
    kinds = list(probe["trained"])  # the token features the probe read
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.5 * len(kinds), 3.2), sharey=True, squeeze=False)
    axes = axes[0]
    for ax, features in zip(axes, kinds):
        x = np.arange(len(chance))
        for offset, name, colour in ((-0.2, "trained", "#2b6cb0"), (0.2, "random", "#a0aec0")):
            values = [probe[name][features][a] for a in chance]
            ax.bar(x + offset, values, width=0.4, label=f"{name} encoder", color=colour)
        ax.scatter(x, list(chance.values()), marker="_", s=900, color="#c53030", label="chance", zorder=3)
        ax.set_xticks(x, list(chance))
        ax.set_ylim(0, 1)
        ax.set_title(f"linear probe on patch tokens ({features})", fontsize=10)
    axes[0].set_ylabel("held-out accuracy")
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.tight_layout()
    save_figure(fig, "01_shape_probe.png")
    plt.show()
    for name in ("trained", "random"):
        print(name, {f: {a: round(v, 3) for a, v in probe[name][f].items()} for f in kinds})

# %% [markdown]
# Colour is easy for any encoder, even a random one: it is the average pixel value of a patch.
# Shape is the hard part, and the reason the trained encoder exists. In quick mode the tiny CLIP
# trains for only a few dozen steps, usually too few to do better than a random encoder on shape;
# the full recipe trains it for many times more steps.
#
# ## One picture through the encoder
#
# `VisionEncoder` wraps the trained tower: `preprocess` makes the pixels, calling it returns the
# encoder's last hidden state, one row per token. (For OpenAI's CLIP this is the same call with
# `VisionEncoder.from_pretrained("openai/clip-vit-base-patch32")`, and the result is (1, 50, 768).)

# %%
import torch

from minimind_v.model.vision import VisionEncoder

encoder = VisionEncoder.from_pretrained(CLIP_DIR)
print(encoder.extra_repr())
pixel_values = encoder.preprocess(image)  # PIL image -> (1, 3, 224, 224)
tokens = encoder(pixel_values)  # (1, 3, 224, 224) -> (1, 50, width)
print("pixel_values:", tuple(pixel_values.shape), " tokens:", tuple(tokens.shape), tokens.dtype)
print(f"num_tokens = {encoder.num_tokens}, grid = {encoder.grid}x{encoder.grid}, width = {encoder.width}")
print("frozen:", not any(p.requires_grad for p in encoder.parameters()))

# %% [markdown]
# ## The patch embedding, written out
#
# The first layer of the encoder is the patch embedding: a convolution with a 32×32 kernel and a
# stride of 32. Its windows do not overlap, so it is the same as one matrix multiplying each
# flattened 3072-number patch. Below, the reader's version (a reshape and a matmul) against the
# encoder's own convolution, on our picture.

# %%
def patch_embedding(pixel_values, weight, patch_size):
    """(B, 3, S, S) -> (B, (S/P)^2, width): cut into P x P patches, flatten each, one matrix for all."""
    B, C, S, _ = pixel_values.shape
    g = S // patch_size  # patches per side
    patches = (pixel_values.reshape(B, C, g, patch_size, g, patch_size)  # (B, 3, row, y, col, x)
               .permute(0, 2, 4, 1, 3, 5)  # (B, row, col, 3, y, x): the patches in reading order
               .reshape(B, g * g, C * patch_size * patch_size))  # (B, 49, 3072)
    return patches @ weight.reshape(len(weight), -1).T  # (B, 49, 3072) @ (3072, width) -> (B, 49, width)


conv = encoder.model.embeddings.patch_embedding  # Conv2d(3, width, kernel 32, stride 32, no bias)
by_matmul = patch_embedding(pixel_values, conv.weight, encoder.patch_size)
with torch.no_grad():
    by_conv = conv(pixel_values).flatten(2).transpose(1, 2)  # (1, width, 7, 7) -> (1, 49, width)
# 3072 float32 products summed in another order than the convolution's: equal up to rounding
torch.testing.assert_close(by_matmul, by_conv, rtol=1e-5, atol=1e-4)
print("patch embedding:", tuple(by_matmul.shape),
      f" max |matmul - conv| = {(by_matmul - by_conv).abs().max():.1e}")

# %% [markdown]
# What the first transformer layer receives is one step further: the learned CLS vector in front
# of the 49 patch vectors, and a learned position vector added to each of the 50. Without the
# positions the layers could not tell where a patch was: attention treats its inputs as a set.

# %%
embeddings = encoder.model.embeddings
cls = embeddings.class_embedding.expand(1, 1, -1)  # (width,) -> (1, 1, width): the same for every picture
layer_input = torch.cat([cls, by_matmul], dim=1) + embeddings.position_embedding.weight  # (1, 50, width)
with torch.no_grad():
    torch.testing.assert_close(layer_input, embeddings(pixel_values), rtol=1e-5, atol=1e-4)
print("into the first layer:", tuple(layer_input.shape), "= (CLS + 49 patches) + 50 positions")

# %% [markdown]
# The 50 tokens of our picture. Left, the whole (50 × width) matrix: row 0 is CLS. Its vertical
# stripes are a large part that every token shares; the picture is in the differences between
# rows, which show up at the patches the objects cover. Right, each
# patch token squeezed to three numbers (its first three principal components, shown as red,
# green and blue) and laid back on the 7×7 grid: patches that look alike to the encoder get alike
# colours, so the objects stand out from the background.

# %%
patch_tokens = tokens[0, 1:]  # (49, width)
centred = patch_tokens - patch_tokens.mean(0)
_, _, v = torch.linalg.svd(centred, full_matrices=False)
pcs = centred @ v[:3].T  # (49, width) -> (49, 3)
pcs = (pcs - pcs.min(0).values) / (pcs.max(0).values - pcs.min(0).values + 1e-8)

fig, axes = plt.subplots(1, 3, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1.6, 1, 1]})
limit = float(tokens.abs().flatten().quantile(0.99))  # colour range: the 99th percentile of |value|
im = axes[0].imshow(tokens[0].numpy(), aspect="auto", cmap="RdBu_r", vmin=-limit, vmax=limit,
                    interpolation="nearest")
axes[0].set_xlabel(f"feature (width {encoder.width})")
axes[0].set_ylabel("token (0 = CLS, 1-49 = patches)")
axes[0].set_title(f"tokens {tuple(tokens.shape)}", fontsize=10)
fig.colorbar(im, ax=axes[0], fraction=0.04)
axes[1].imshow(image)
axes[1].set_title("the picture", fontsize=10)
axes[2].imshow(pcs.reshape(encoder.grid, encoder.grid, 3).numpy(), interpolation="nearest")
axes[2].set_title("patch tokens, 3 principal components", fontsize=10)
for ax in axes[1:]:
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
save_figure(fig, "01_patch_tokens.png")
plt.show()

# %% [markdown]
# ## Summary
#
# * CLIP ViT-B/32 cuts a 224 px picture into 7×7 patches of 32 px; with the CLS token that makes
#   **50 tokens**, the encoder's last hidden state, of width 768 (128 for our tiny CLIP).
# * The patch embedding is one matrix applied to every flattened patch; the transformer layers
#   then let the patches share what they see.
# * The encoder is frozen: the same picture always gives the same tokens, which later lets
#   training read them from a cache instead of recomputing them.
#
# Next: the other half of the model, the tokenizer and the decoder that will read these tokens.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/01_solutions.py`, one function per exercise
# (`python notebooks/solutions/01_solutions.py` runs them all; the tests run them too). Try each
# before you look.
#
# 1. **Predict, then run.** OpenAI's larger CLIP, ViT-L/14 at 336 px, cuts patches of 14 px. How
#    many tokens does it hand a VLM per picture? And ViT-B/16 at 224 px? Check both by building a
#    tiny random vision tower of each geometry (`transformers.CLIPVisionConfig` with a small
#    width) and counting the rows of its output.
# 2. **Predict, then run.** Paint the patch in row 2, column 5 of a picture white. Which rows of
#    the patch embedding change? Which of the encoder's 50 output tokens change? Check with
#    `patch_embedding` above and a random encoder.
# 3. **Predict, then run.** B pictures, each with its own caption vector equal to the picture's,
#    all B vectors orthogonal: write the contrastive loss at logit scale s as a formula. Then
#    every picture and caption the same vector: what is the loss now? Check both against
#    `contrastive_loss`.
# 4. **Change the code.** Extend `clip_loss` with hard negatives: M extra captions that match no
#    picture, as extra columns of the picture -> caption table only (a caption-to-picture row has
#    no use for them). Check it against `contrastive_loss(image, text, scale, negative_embeds)`.


# %%
from minimind_v.chapters import close_chapter

close_chapter()
