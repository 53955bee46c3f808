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
# # Chapter 0: set-up and the data
#
# This book rebuilds **MiniMind-V**, a tiny vision-language model in the style of LLaVA-1, and
# trains it for real. A picture and a question go in, an answer comes out, along one line:
#
# ```
# image ─CLIP─▶ 50 patch tokens ─projection─▶ 50 word-sized vectors ─substitution─▶ prompt ─decoder─▶ answer
# ```
#
# | chapter | the step |
# |---|---|
# | 0 | the data: pictures with captions and questions |
# | 1 | a frozen CLIP encoder turns a 224 px image into 7×7 patches + 1 CLS = 50 tokens |
# | 2 | the tokenizer and the MiniMind decoder, pretrained on text alone |
# | 3 | a linear projection translates patch tokens into the decoder's width |
# | 4 | the prompt's 50 placeholder tokens have their embeddings replaced by the projected patches |
# | 5 | stage 1: pretraining on captions teaches the projection to speak the decoder's language |
# | 6 | stage 2: supervised fine-tuning on questions, with a loss on the answers only |
# | 7 | evaluation, attention maps and a panel to ask your own questions |
#
# All real code lives in the package `minimind_v`; the chapters import it, show the tensors it
# makes, and launch the training jobs. Every stage leaves its result in one **run folder**, and a
# chapter that needs an earlier stage's result runs that stage first if it is missing, so any
# chapter can be opened once the previous ones have run.
#
# ## Settings
#
# The same three lines open every chapter. `QUICK = True` shrinks every stage (a few hundred
# pictures, tens of training steps) so the whole book runs in minutes on a laptop; the models it
# trains are too small to be good, but every tensor has its true shape. `make quick-book` sets the
# same switch through the environment (`MINIMIND_V_QUICK=1`).

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)

from minimind_v.chapters import default_nproc, run_folder, save_figure, use_quick_mode
from minimind_v.recipe import default_recipe, run_stage, stage_dir

quick = use_quick_mode(QUICK)
NPROC = NPROC or default_nproc()
R = default_recipe()  # sizes and steps of every stage
RUN = run_folder()
print(f"quick mode: {quick}; run folder: {RUN}; training processes per stage: {NPROC}")
R

# %% [markdown]
# The run folder will hold one sub-folder per stage: `world/` (the data), `clip/` (the vision
# encoder), `tokenizer/`, `llm/` (the text-only decoder), `pretrain/` and `sft/` (the two VLM
# stages) and `eval/`. Every stage leaves a `fingerprint.json` (its settings and the fingerprints
# of the stages it was built from) and, written last, `complete.json`. A stage is reused only when
# both match what the chapter asks for: change a knob (the steps, `--freeze`, the projector) and
# that stage and every stage after it are trained again, and the cell says why.
#
# ## The shapes world
#
# The original MiniMind-V learns from ~600K web pictures with captions and ~230K question-answer
# pairs about COCO photos. To train offline in minutes we draw our own pictures instead: 1 to 3
# flat-coloured shapes (circle, square, triangle, cross; five colours; small or large) placed in
# the cells of a 3×3 grid. Because we drew every picture, we know exactly what is in it, so every
# caption and every answer is correct and checkable.
#
# The generator writes the data in the original dataset's layout: a JSON list of conversations
# plus an image folder, for pretraining, for SFT, and for a held-out evaluation set.

# %%
import json

from minimind_v.data import shapes
from minimind_v.data.shapes import ShapesWorldConfig, generate_world

WORLD = stage_dir(RUN, "world")
# What run_stage does for the world: generate_world(WORLD, ShapesWorldConfig(seed=R.seed,
# n_pretrain=R.n_pretrain, n_sft=R.n_sft, n_eval=R.n_eval)), unless the same world is there.
run_stage(RUN, R, "world")
print("the world's settings:", json.loads((WORLD / "world.json").read_text(encoding="utf-8"))["config"])

for path in sorted(WORLD.iterdir()):
    if path.is_dir():
        print(f"{path.name + '/':22s} {sum(1 for _ in path.iterdir()):6d} entries")
    elif path.name != "world.json":
        print(f"{path.name:22s} {len(json.loads(path.read_text(encoding='utf-8'))):6d} records")

# %% [markdown]
# One record of each kind. `conversations` is exactly the original format; `scene` is our
# addition: the list of objects the picture was drawn from.

# %%
from minimind_v.data.datasets import read_records

pretrain = read_records(WORLD / "pretrain_data.json")
sft = read_records(WORLD / "sft_data.json")
evaluation = read_records(WORLD / "eval_data.json")
for name, record in (("pretraining", pretrain[0]), ("SFT", sft[0]), ("evaluation", evaluation[0])):
    print(f"--- {name} record")
    print(json.dumps(record, indent=1))

# %% [markdown]
# A few pictures with what the model will learn to say about them: captions for stage 1,
# questions and answers for stage 2.

# %%
import textwrap

import matplotlib.pyplot as plt

from minimind_v.data.images import load_image
from minimind_v.data.records import find_image  # sft_images/COCO_train2014_<image>, v1's SFT naming


def turns_text(record: dict, width: int = 34) -> str:
    """The record's question/answer pairs as short wrapped lines."""
    turns = record["conversations"]
    lines = []
    for question, reply in zip(turns[::2], turns[1::2]):
        lines.append(textwrap.fill("Q: " + question["value"].replace("<image>", "").strip(), width))
        lines.append("A: " + reply["value"])
    return "\n".join(lines)


fig, axes = plt.subplots(2, 4, figsize=(12.5, 9.2), layout="constrained")
for ax, record in zip(axes[0], pretrain[:4]):
    ax.imshow(load_image(WORLD / "pretrain_images" / record["image"]))
    ax.set_xlabel(textwrap.fill(record["conversations"][1]["value"], 34), fontsize=9)
for ax, record in zip(axes[1], sft[:4]):
    ax.imshow(load_image(find_image(WORLD / "sft_images", record["image"])))
    ax.set_xlabel(turns_text(record), fontsize=9)
for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
axes[0, 0].set_ylabel("stage 1: captions", fontsize=11)
axes[1, 0].set_ylabel("stage 2: questions", fontsize=11)
fig.suptitle("The shapes world: every picture with the words the model learns from it")
save_figure(fig, "00_shapes_world.png")
plt.show()

# %% [markdown]
# ## Every answer can be checked
#
# `shapes.answer(scene, question)` parses a question and derives its answer from the scene alone,
# without looking at what the generator wrote. Agreement on every SFT turn means the training
# data holds no wrong answer; the same check later grades the model.

# %%
from collections import Counter

checked = 0
for record in sft:
    turns = record["conversations"]
    for question, reply in zip(turns[::2], turns[1::2]):
        derived = shapes.answer(record["scene"], question["value"])
        assert derived == reply["value"], (record["id"], question["value"], derived, reply["value"])
        checked += 1
print(f"all {checked} SFT answers re-derived from their scenes")
print("held-out questions per answer type:", dict(Counter(r["answer_type"] for r in evaluation)))
print("answers of the count questions:", dict(Counter(r["conversations"][1]["value"]
                                                      for r in evaluation if r["answer_type"] == "count")))

# %% [markdown]
# Five answer types (colour, shape, size, position, count), in equal numbers in the held-out set.
# Note the count answers: a model that always says "one" already gets many of them right. We will
# compare every accuracy with a **text-only baseline** (the same model, the same prompt, no
# picture) to see what the picture adds.
#
# ## Using the real parts instead
#
# Nothing in the code is specific to the shapes world; only the configuration differs. With
# internet and a GPU, the same stages run on the original parts:
#
# * **data**: the original dataset folder has the same layout, `pretrain_data.json` +
#   `pretrain_images/` (CC-3M captions), `sft_data.json` + `sft_images/` (COCO questions) and
#   `eval_images/`; pass it as `--data`.
# * **vision encoder**: `--vision openai/clip-vit-base-patch32` (downloaded once into the
#   Hugging Face cache, or a local copy of that folder) instead of the tiny CLIP of chapter 1.
#   The geometry is the same, 50 tokens per image; only the width grows from the tiny CLIP's to 768.
# * **decoder size**: `--preset small` (dim 512, 8 layers, ~27M parameters) or `--preset base`
#   (dim 768, 16 layers, ~109M) instead of `tiny`, or start from the published MiniMind weights
#   (`python -m minimind_v.convert to-hf --pth 512_llm.pth --out runs/real/llm`).
#
# ```bash
# python -m minimind_v.train.llm --data dataset --tokenizer TOKENIZER --preset small --out runs/real/llm
# torchrun --standalone --nproc_per_node 8 -m minimind_v.train.pretrain_vlm --data dataset \
#     --init runs/real/llm --vision openai/clip-vit-base-patch32 --feature-cache --out runs/real/pretrain
# torchrun --standalone --nproc_per_node 8 -m minimind_v.train.sft_vlm --data dataset \
#     --init runs/real/pretrain --feature-cache --out runs/real/sft
# ```
#
# ## Summary
#
# * The book's data is a synthetic shapes world in the original MiniMind-V layout: caption records
#   for pretraining, question-answer records for SFT, and a held-out set with one question each.
# * Every answer is derived from the scene, so accuracy can be measured exactly.
# * Every stage writes into one run folder and is skipped once done.
#
# Next: how CLIP turns one of these pictures into 50 tokens.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/00_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** How many different one-object descriptions (shape, colour, size,
#    position) can the world draw? Draw many one-object scenes with `shapes.random_scene` and count.
# 2. **Check the data.** Generate a small world and re-derive every SFT answer with
#    `shapes.answer(scene, question)`. Why does the book rely on this rather than on reading a
#    sample of the data by eye?
# 3. **Change the settings.** Generate a world with `held_out_pairs=(("red", "triangle"),)`. Show
#    that no training picture holds a red triangle and no training text names one, and count the
#    held-out records marked "seen" and "unseen".
# 4. **Predict, then run.** What does a uniform guess score on each answer type? And guessing, for
#    each question form, the answer the training set gives it most often
#    (`minimind_v.baselines.majority`)? Which type does the wording give away most, and why?


# %%
from minimind_v.chapters import close_chapter

close_chapter()
