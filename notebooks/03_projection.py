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
# # Chapter 3: the projection
#
# ```
# 50 patch tokens ─projection─▶ 50 word-sized vectors   ◀── this chapter
# ```
#
# CLIP's patch tokens and the decoder's word embeddings are vectors of different sizes that mean
# different things: 768 numbers (128 for our tiny CLIP) shaped by contrastive training, against
# `dim` numbers shaped by next-token prediction. MiniMind-V joins them with the simplest bridge
# there is, one linear layer applied to every patch token: `(B, 50, vision_width) -> (B, 50, dim)`.
# Think of it as a dictionary that translates from CLIP's language into the decoder's. Training
# (chapter 5) writes the dictionary; this chapter looks at it before it has learned anything.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)

from minimind_v.chapters import open_chapter, save_figure
from minimind_v.recipe import stage_dir

R, RUN, NPROC = open_chapter(QUICK, NPROC, needs=['world', 'clip', 'tokenizer', 'llm'])
WORLD = stage_dir(RUN, "world")

# %% [markdown]
# ## Joining the two halves
#
# `load_start_model` is what the pretraining stage itself calls: it loads the text LM of
# chapter 2 and wraps it in a `MiniMindVLM`, which is the same decoder plus a fresh `vision_proj`.
# The config records what joins the halves: the encoder's width, its number of tokens, and the
# token ids that stand for one image in a prompt.

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
print(vlm.vision_proj)
print(f"vision_width={cfg.vision_width}, dim={cfg.dim}, num_image_tokens={cfg.num_image_tokens}, "
      f"image_token_ids={cfg.image_token_ids[:3]}... ({len(cfg.image_token_ids)} ids)")

# %% [markdown]
# The whole model, drawn from this config: the picture's path on top, the prompt's below, the two
# meeting where the placeholders were.

# %%
from minimind_v.viz import plot_architecture

fig = plot_architecture(cfg, vision_layers=encoder.model.config.num_hidden_layers)
save_figure(fig, "03_architecture.png")
fig

# %% [markdown]
# ## Shapes before and after
#
# A batch of pictures through the frozen encoder, then through the projection. Only the last
# dimension changes; every patch is translated on its own.

# %%
from minimind_v.data.datasets import read_records
from minimind_v.data.images import load_image
from minimind_v.data.records import find_image  # sft_images/COCO_train2014_<image>, v1's SFT naming

records = read_records(WORLD / "sft_data.json")[:16]
images = [load_image(find_image(WORLD / "sft_images", r["image"])) for r in records]
with torch.no_grad():
    pixel_values = encoder.preprocess(images)  # 16 PIL images -> (16, 3, 224, 224)
    image_tokens = encoder(pixel_values)  # (16, 3, 224, 224) -> (16, 50, vision_width)
    projected = vlm.vision_proj(image_tokens)  # (16, 50, vision_width) -> (16, 50, dim)
print("pixel_values:", tuple(pixel_values.shape))
print("image tokens:", tuple(image_tokens.shape))
print("projected:   ", tuple(projected.shape))

# %% [markdown]
# The projection written out: one weight matrix and one bias, the same for all 50 tokens of every
# picture. A batched matmul over the 16 × 50 tokens above gives exactly what `vision_proj` gave.

# %%
def project(image_tokens, weight, bias):
    """(B, 50, vision_width) -> (B, 50, dim): one matrix and one bias for every token of every picture."""
    return image_tokens @ weight.T + bias  # (B, 50, W) @ (W, dim) + (dim,) -> (B, 50, dim)


linear = vlm.vision_proj.layers[0]  # nn.Linear(vision_width, dim)
with torch.no_grad():
    ours = project(image_tokens, linear.weight, linear.bias)
torch.testing.assert_close(ours, projected)
print(f"weight {tuple(linear.weight.shape)} and bias {tuple(linear.bias.shape)}: "
      f"{tuple(image_tokens.shape)} -> {tuple(ours.shape)}, equal to vision_proj's output")

# %% [markdown]
# ## How many parameters?
#
# A linear layer from W to dim has a W × dim matrix and a bias of dim: `W·dim + dim`. For the real
# pairing, CLIP ViT-B/32 (W = 768) with the `small` decoder (dim 512), that is 393,728 parameters,
# about 1.5% of the 27M decoder. LLaVA-1.5 later replaced the single layer by a two-layer MLP; the
# package offers both (`--projector linear|mlp`).

# %%
from minimind_v.config import PRESETS
from minimind_v.model.projector import VisionProjector


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


W, dim = cfg.vision_width, cfg.dim
print(f"this run: {W} x {dim} + {dim} = {W * dim + dim:,}; counted: {count(vlm.vision_proj):,}")
assert count(vlm.vision_proj) == W * dim + dim
for preset in ("small", "base"):
    d = PRESETS[preset]["dim"]
    print(f"ViT-B/32 + {preset:5s}: linear 768 x {d} + {d} = {count(VisionProjector(768, d)):>9,}"
          f"   mlp: {count(VisionProjector(768, d, 'mlp')):>9,}")

# %% [markdown]
# ## What an untrained projection does
#
# The fresh projection's weights are drawn from a normal distribution with standard deviation
# 0.02 and its bias is zero, like every linear layer of the decoder. Each output number is then a
# sum of W random terms, so a patch token x comes out with a length close to `0.02 · |x| · √dim`,
# whatever the picture. Nothing ties that length to the length of the word embeddings the decoder
# is used to reading. Compare them:

# %%
import matplotlib.pyplot as plt
import numpy as np

token_norms = image_tokens.norm(dim=-1).flatten()  # (16 * 50,)
projected_norms = projected.norm(dim=-1).flatten()  # (16 * 50,)
word_norms = vlm.tok_embeddings.weight.detach().norm(dim=-1)  # (vocab,)
expected = 0.02 * token_norms * dim ** 0.5
print(f"patch tokens:          median length {token_norms.median():.2f}")
print(f"projected (untrained): median length {projected_norms.median():.3f}   "
      f"0.02·|x|·√dim predicts {expected.median():.3f}")
print(f"word embeddings:       median length {word_norms.median():.3f}")

fig, ax = plt.subplots(figsize=(7, 3.4))
lengths = torch.cat([projected_norms, word_norms])
bins = np.geomspace(float(lengths.min()) * 0.8, float(lengths.max()) * 1.25, 70)
for values, label in ((word_norms, f"word embeddings ({len(word_norms)})"),
                      (projected_norms, f"projected patch tokens, untrained ({len(projected_norms)})")):
    ax.hist(values.numpy(), bins=bins, alpha=0.7, weights=np.full(len(values), 1 / len(values)), label=label)
ax.set_xscale("log")
ax.set_xlabel("vector length (L2 norm, log scale)")
ax.set_ylabel("fraction of vectors")
ax.set_title("What the decoder is used to reading vs what an untrained projection gives it", fontsize=10)
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "03_projection_norms.png")
plt.show()

# %% [markdown]
# Each block's RMSNorm rescales what the block reads, but the residual stream between the blocks
# carries every vector as it is: a token much longer than the words around it drowns out the small
# updates the blocks add to it.
#
# Length is only half the story; direction is the other. Which word does each projected patch
# resemble most? Below, for the token under each object of one picture (and for CLS and a
# background patch), the vocabulary token whose embedding has the highest cosine similarity.
# Untrained, these are arbitrary words, and the similarities are what random directions give: we
# compare them with 50 random Gaussian vectors. After pretraining, the patches must land where the
# decoder can make sense of them.

# %%
import torch.nn.functional as F

from minimind_v.data import shapes

first = F.normalize(projected[0], dim=-1)  # (50, dim)
vocabulary = F.normalize(vlm.tok_embeddings.weight.detach(), dim=-1)  # (vocab, dim)
similarity = first @ vocabulary.T  # (50, vocab)
best, nearest = similarity.max(dim=-1)  # (50,), (50,)

# Which token sits under each object's centre: 1 + row * grid + col (token 0 is CLS).
patch = encoder.image_size // encoder.grid
picked = {0: "CLS"}
for obj in records[0]["scene"]:
    x0, y0, x1, y1 = shapes.object_box(obj)
    picked[1 + ((y0 + y1) // 2 // patch) * encoder.grid + (x0 + x1) // 2 // patch] = shapes.describe_object(obj)
picked.setdefault(1, "background (top left corner)")
for token, what in picked.items():
    word = tokenizer.convert_ids_to_tokens(int(nearest[token]))
    print(f"token {token:2d} ({what:28s}): nearest word {word!r:14s} cosine {best[token]:.3f}")
random_directions = F.normalize(torch.randn(50, dim), dim=-1)
print(f"best cosine, mean over the 50 tokens: {best.mean():.3f};  "
      f"for 50 random directions: {(random_directions @ vocabulary.T).max(dim=-1).values.mean():.3f}")

# %% [markdown]
# ## Summary
#
# * The projection is one `nn.Linear(vision_width, dim)` with a bias, applied to every one of the
#   50 tokens: `(B, 50, vision_width) -> (B, 50, dim)`.
# * It is small: `W·dim + dim` parameters, 393,728 for ViT-B/32 with the `small` decoder.
# * Untrained, it hands the decoder vectors of an arbitrary length pointing in arbitrary
#   directions. Stage-1 pretraining is where it learns which directions mean what to the decoder.
#
# Next: where those 50 vectors enter the prompt.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/03_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** How many parameters does the projection have for OpenAI's ViT-L/14
#    (width 1024) joined to the `base` decoder (dim 768)? And LLaVA-1.5's two-layer MLP
#    (`--projector mlp`: Linear, GELU, Linear dim → dim) for the same pair? Check with
#    `VisionProjector`.
# 2. **Predict, then run.** Shuffle the 50 tokens of a picture before the projection. What happens
#    to its output? Where, then, can the decoder learn which patch a token came from?
# 3. **Predict, then run.** Derive the untrained length 0.02·|x|·√dim: what is the variance of one
#    output number when the weights are drawn with standard deviation 0.02? Then predict the length
#    with PyTorch's default initialisation of `nn.Linear` (uniform in ±1/√W, before the VLM
#    re-initialises it). Check both on random tokens.
# 4. **Change the code.** Write LLaVA-1.5's MLP projector as a function of its weights, like
#    `project` above, and check it against `VisionProjector(W, dim, "mlp")`.


# %%
from minimind_v.chapters import close_chapter

close_chapter()
