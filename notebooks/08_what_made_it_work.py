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
# # Chapter 8: what made it work
#
# ```
# the recipe ──▶ accuracy          the recipe with ONE choice changed ──▶ accuracy'
#                     └──────────────── compare on the same held-out questions ──┘
# ```
#
# Chapter 7 measured a model that answers most held-out questions. The first recipe that trained
# end to end did not: it answered 61% of them, and position questions at 23%. Getting from there
# took a string of choices, each of which looks harmless on paper: the order in which a caption
# lists its objects, how many questions one training sample asks, what the encoder was trained to
# notice. This chapter takes the finished recipe and undoes one choice at a time. Each **ablation**
# is a pair of runs trained from nothing, identical except for that choice, evaluated on the same
# held-out questions. The difference between the two is what the choice is worth.
#
# Eight pairs:
#
# | choice | the recipe | the variant |
# |---|---|---|
# | caption object order | random | reading order (top left to bottom right) |
# | questions per SFT record | 6 to 8 | 1 |
# | what SFT trains | projection + whole decoder | projection only; projection + first and last layers |
# | tokens per picture | all 50 (CLS + 49 patches) | the CLS token in all 50 places |
# | projector | linear | two-layer MLP |
# | the tiny CLIP's training | contrastive + auxiliary loss | contrastive only |
# | the decoder's feed-forward | dense SwiGLU | mixture of experts (4 routed, top 2, + 1 shared) |
#
# A pair costs minutes, not the half hour of the book's run: the recipe here runs its VLM stages
# with fewer steps (pretraining 400 instead of 1000, SFT 500 instead of 1500), the size at which
# the effects already show. A variant reuses every stage its choice does not reach (the same
# world, the same tiny CLIP) from the recipe's own run.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)
# True: train every pair now (about 90 minutes on 2 CPU cores at the book's sizes; a pair that is
# already there is reused); False: read the table `python -m minimind_v.ablations --record
# docs/ablations.json` recorded; None: train in quick mode, else read what is there.
RUN_ABLATIONS = None

from minimind_v.chapters import open_chapter, save_figure

R, RUN, NPROC = open_chapter(QUICK, NPROC)

# %% [markdown]
# ## Reading a pair: how big is noise?
#
# Both runs of a pair answer the same held-out questions, so any difference comes from the choice
# or from chance: another seed would move each run's accuracy a little. On $n$ questions an
# accuracy $p$ has a binomial standard error of $\sqrt{p(1-p)/n}$: about one point at 90% on 1000
# questions, and the difference of two runs about 1.4 points. A change smaller than twice that is
# reported as "within noise": the table does not claim it.

# %%
import json
from pathlib import Path

from IPython.display import Markdown, display

from minimind_v import ablations
from minimind_v.recipe import ROOT, quick_mode

RECORDED = ROOT / "docs" / "ablations.json"
FOLDER = ablations.default_folder()
run_now = quick_mode() if RUN_ABLATIONS is None else RUN_ABLATIONS
if run_now:
    results = ablations.run_ablations(folder=FOLDER, nproc=NPROC)
    print(f"trained in {FOLDER}")
else:
    here = ablations.read_results(FOLDER)
    complete = here is not None and len(here.get("ablations", {})) == len(ablations.ABLATIONS)
    results = here if complete else json.loads(RECORDED.read_text(encoding="utf-8"))
    print(f"read from {FOLDER if complete else RECORDED.relative_to(ROOT)} (measured on: {results['machine']})")
recipe = results["recipe"]
print(f"the recipe at these sizes: {recipe['overall']:.1%} of {recipe['n']} held-out questions; "
      f"standard error {ablations.standard_error(recipe['overall'], recipe['n']):.1%}")
display(Markdown(ablations.table_markdown(results)))

# %%
from minimind_v.viz.ablations import plot_ablations

fig = plot_ablations(results)
save_figure(fig, "08_ablations.png")

# %% [markdown]
# Every arrow starts at the recipe and ends at the variant; grey arrows are within noise. The
# right panel says which kind of question each choice serves. The sections below take the rows one
# by one: what the choice changes in the data or the model, and why the numbers move as they do.

# %%
ROWS = {row["name"]: row for row in ablations.table_rows(results)}


def measured(name: str, *types: str) -> None:
    """The row's overall change and the answer types named, as measured."""
    row = ROWS.get(name)
    if row is None:
        print(f"{name}: not in this table")
        return
    parts = [f"overall {row['recipe']:.1%} -> {row['variant']:.1%} ({100 * row['delta']:+.1f} points"
             f"{'' if row['beyond_noise'] else ', within noise'})"]
    parts += [f"{t} {row['per_type'][t][0]:.1%} -> {row['per_type'][t][1]:.1%}" for t in types]
    print(f"{row['variant_value']} instead of {row['recipe_value']}: " + "; ".join(parts))


def final_losses(run: dict | None) -> str:
    """The last training loss of a run's VLM stages, as recorded."""
    losses = (run or {}).get("final_loss") or {}
    return ", ".join(f"{stage} {loss:.3f}" for stage, loss in losses.items() if loss is not None) or "not recorded"


# %% [markdown]
# ## 1. Caption object order
#
# A pretraining caption names every object: its size, colour, shape and position. If the caption
# always lists them in **reading order**, the decoder can write it by scanning the picture's
# patches from the top left to the bottom right and saying what it meets; it never has to find an
# object by what it is. In **random order**, to say where "the small red circle" is, the decoder
# must first find that circle among the 49 patches: exactly the lookup a question like "Where is
# the red circle?" needs later. The same pictures, the same words, another order:

# %%
import random

from minimind_v.data.shapes import ShapesWorldConfig, caption, random_scene

scene = random_scene(random.Random(7), min_objects=3)
for order in ("reading", "random"):
    print(f"{order:>8}: {caption(scene, random.Random(1), order)}")
measured("caption_order", "position", "shape", "colour")
print("last training loss, the recipe:       ", final_losses(results["recipe"]))
print("last training loss, reading order:    ",
      final_losses(results.get("ablations", {}).get("caption_order", {}).get("variant")))

# %% [markdown]
# Position is the type that pays, and almost alone: in the recorded pair it falls by about 20
# points while colour, shape and size stay within noise. And the training loss says the opposite:
# reading-order captions are *easier* to predict (the order is fixed, so one fewer thing to guess),
# so the variant ends pretraining with the lower caption loss and still answers worse. A lower
# training loss is not a better model when the task got easier. In reading order the caption's word for
# where an object is comes from where the scan is, not from the object, so nothing connects "red
# circle" to "bottom left". The lookup learned from random-order captions runs one way (from the
# words said first to the position said last); SFT has to teach the other directions, which is the
# next row's subject.
#
# ## 2. Questions per SFT record
#
# A sample pays for its picture once: 50 image tokens plus the chat headers, whether it asks one
# question or eight. Each further question adds about 18 tokens and one more answer to learn from.
# With one question per record the model sees the same number of pictures per step but a seventh
# of the answers, and never two questions about one picture, which is what teaches it to pick an
# object out by any of its attributes:

# %%
from minimind_v.data.shapes import sft_records

for turns in ((1, 1), (6, 8)):
    config = ShapesWorldConfig(n_sft=1, min_sft_turns=turns[0], max_sft_turns=turns[1])
    (record,) = sft_records(config, set())
    conversation = record["conversations"]
    print(f"{turns[0] if turns[0] == turns[1] else f'{turns[0]}-{turns[1]}'} question(s): " + " | ".join(
        f"{conversation[i]['value'].replace('<image>', '').strip()} -> {conversation[i + 1]['value']}"
        for i in range(0, len(conversation), 2)))
measured("questions_per_record", "position", "colour", "count")
if "questions_per_record" in ROWS:
    print("its commonest answers:", results["ablations"]["questions_per_record"]["variant"].get("commonest_answers"))

# %% [markdown]
# Every type drops, position and count most. Count falls back on the commonest answer ("one"),
# what a model does when the question's words are all it has learned to use. Seven questions about
# one picture force the model to tell its objects apart *within* a picture; one question per
# picture can often be answered about "the" object of a one-object picture, and teaches little
# about the others.

# %% [markdown]
# ## 3. What SFT trains
#
# The original MiniMind-V trains the projection alone in pretraining and everything in SFT. Here
# both stages train the whole decoder with the projection; the variants keep the decoder frozen in
# SFT (the projection only), or free only its first and last layers. How many parameters each
# strategy trains in the `tiny` decoder:

# %%
from minimind_v.config import config_from_preset
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.train.common import FREEZE_STRATEGIES, set_trainable

lm = MiniMindForCausalLM(config_from_preset(R.preset, vocab_size=R.vocab_size))
model = MiniMindVLM.from_language_model(lm, vision_width=128, num_image_tokens=50, image_token_ids=[3] * 50)
for strategy in ("proj", "ends", "all"):
    trainable, total = set_trainable(model, strategy)
    print(f"--freeze {strategy:<4} trains {trainable / 1e3:7.1f}k of {total / 1e3:.1f}k parameters: "
          f"{FREEZE_STRATEGIES[strategy]}")
measured("sft_trains_projection", "count", "position")
measured("sft_trains_ends", "count", "position")
for name in ("sft_trains_projection", "sft_trains_ends"):
    if name in ROWS:
        print(f"{ROWS[name]['variant_value']}: commonest answers",
              results["ablations"][name]["variant"].get("commonest_answers"))

# %% [markdown]
# With the decoder frozen, SFT fails outright: the decoder was trained to caption, and 50 vectors
# written by a 16k-parameter projection cannot turn a captioner into a question answerer. In the
# recorded run it answers "small" (the first word of many captions) to most questions, and is
# right only on size questions whose answer happens to be "small". Freeing only the first and last
# layers recovers most of the accuracy: the last layer learns the short answer, the first can read
# the picture differently. What is still missing, mostly on position, is what the middle layers
# learn when they may change.
#
# ## 4. Tokens per picture: CLS only
#
# CLIP's CLS token is the one vector the contrastive loss trains: a summary of the whole picture.
# A VLM could hand the decoder that vector alone; MiniMind-V hands it all 50. The variant keeps
# the prompt as it is but writes the CLS token into every one of the 50 places (`vision_tokens=
# "cls"`), so the decoder sees the pooled picture and nothing about where anything is, except what
# the summary itself keeps. The tiny CLIP's auxiliary loss trains the CLS token to count the
# objects of each shape, colour and size, so counting has the most to hold on to:

# %%
measured("cls_only", "position", "count", "shape", "colour")

# %% [markdown]
# Counting stays within noise, as the auxiliary loss on the CLS token would predict, and position
# loses the most: the pooled vector still carries something of where things are (position stays
# far above the 11% of chance), but not which object is where. This is why
# LLaVA and MiniMind-V keep every patch token: the position of an object is in *which* token
# describes it, and a pooled vector has already averaged that away. The price is sequence
# length: 50 tokens per picture here, 257 for ViT-L/14 at 224 pixels, and more for larger inputs.
#
# ## 5. A linear projection or an MLP
#
# LLaVA-1.5 replaced LLaVA's linear projection with a two-layer MLP and gained on its benchmarks.
# Here the encoder's tokens already separate every attribute linearly (chapter 1's probes read
# them at 0.99 or better with a linear classifier), so a hidden layer has nothing to untangle; it
# only has to be learned first, from a random start, in the same 400 pretraining steps:

# %%
measured("mlp_projector", "position", "shape", "colour")



print("last training loss, the recipe:      ", final_losses(results["recipe"]))
print("last training loss, the MLP variant: ", final_losses(results.get("ablations", {}).get("mlp_projector", {}).get("variant")))

# %% [markdown]
# The MLP is not the better bridge at this size: it ends pretraining with a higher caption loss and
# loses on every type, most on position. A bigger bridge is worth its cost when the encoder's
# features need reshaping for the decoder (CLIP's features for a 7B decoder) and there are enough
# steps to train it; neither is true here. An ablation answers a question *at one size*: with
# 1500 SFT steps the gap may close, and the table does not say that it would not.
#
# ## 6. The tiny CLIP without its auxiliary loss
#
# The tiny CLIP trains on a contrastive loss (match each picture with its caption among hard
# negatives) plus an auxiliary one: classify every object's shape, colour, size and position from
# the patch tokens under it, and the counts from the CLS token. Without it the encoder learns
# whatever suffices to tell captions apart, and the probes of chapter 1 show what that leaves in the
# patch under each object's centre:

# %%
for label, run in (("with the auxiliary loss", results["recipe"]),
                   ("contrastive only", results.get("ablations", {}).get("clip_without_aux", {}).get("variant"))):
    probe = (run or {}).get("clip", {}).get("probe_centre")
    if probe:
        print(f"{label:>24}: linear probe on the centre patch: "
              + ", ".join(f"{k} {v:.2f}" for k, v in probe.items()))
measured("clip_without_aux", "shape", "position", "count")

# %% [markdown]
# This is the largest effect in the table, and the probes say why before any VLM is trained:
# without the auxiliary loss, the patch under an object's centre no longer tells its shape or its
# cell (in the recorded run a linear probe reads shape at 0.48 and position at 0.20, below what it
# reads from the tokens of an untrained encoder, 0.54 and 0.37, and far below 0.99 and 1.00 with
# the loss), and the VLM's shape and position answers fall with them. Colour and size survive best: the contrastive loss needs them
# to tell a caption from its hard negatives, and they are visible in any patch the object covers.
# Held-out retrieval barely moves, so the contrastive score alone would not have warned us.
#
# The decoder can only answer from what the tokens hold. Real CLIP, trained on 400 million
# captions, holds most of it already; a tiny CLIP trained on 20k shapes-world captions needs to be
# told what matters. The lesson carries over: a VLM inherits its encoder's blind spots, and the
# first place to look when a VLM cannot answer some kind of question is a probe of the encoder.
#
# ## 7. A mixture of experts
#
# MiniMind's decoder can swap each block's feed-forward for a mixture of experts: a router sends
# every token to 2 of 4 SwiGLU experts, and one shared expert sees every token. The variant trains
# the text LM that way and everything after it as the recipe does. It holds three feed-forwards'
# work per token where the dense block holds one, and about five times the feed-forward weights:

# %%
moe = MiniMindForCausalLM(config_from_preset(R.preset, vocab_size=R.vocab_size, use_moe=True))
dense_params, moe_params = (sum(p.numel() for p in m.parameters()) for m in (lm, moe))
print(f"decoder parameters: dense {dense_params / 1e6:.2f}M, mixture of experts {moe_params / 1e6:.2f}M")
measured("moe", "count", "position", "shape")
if "moe" in ROWS:
    variant = results["ablations"]["moe"]["variant"]
    print(f"the variant trained {', '.join(variant['stages_trained'])} in {variant['minutes']:.1f} min")

# %% [markdown]
# Here the experts cost accuracy (most on position and count) and nearly twice the time per SFT
# step (486 s against 260 s for 500 steps in the recorded run). Experts pay when there is more to
# know than one feed-forward can hold: many languages, many domains. The shapes world has 5
# colours, 4 shapes, 2 sizes and 9 cells, which a 128-wide dense block already holds; splitting the
# tokens among experts leaves each expert fewer examples in the same number of steps, and the
# router is one more thing to learn. The original's MoE variant is meant for far more data.
#
# ## What the table does not say
#
# * Each pair was trained once, on one seed; differences within noise are not claims, and an
#   effect near the line could change sign on another seed.
# * The sizes are smaller than the book's run: a choice that only pays after 1500 SFT steps (more
#   questions per step, for example) shows less here than it would there, and the reverse.
# * Choices interact: the caption order matters *because* the encoder puts each object's
#   attributes in the tokens under it; with the CLS only, the caption order could not help.
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/08_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** How many held-out questions does it take for a 1-point difference at
#    90% accuracy to exceed twice its standard error? Compute it, then check with a simulation of
#    two runs that both answer 90% right.
# 2. **Predict, then run.** Write a caption in reading order for a scene of three objects by hand,
#    and check it against `caption(scene, rng, "reading")`. What stays the same between the two
#    orders besides the pictures?
# 3. **Predict, then run.** With `vision_tokens="cls"`, are the 50 vectors the decoder receives for
#    a picture all equal? Check on a small random model, then say which information is left.
# 4. **A small change.** Add an ablation of your own to `ablations.ABLATIONS` (for example
#    `mix_captions` 0 instead of 0.1) and check which stages it retrains with
#    `recipe.stage_fingerprints`, before spending minutes on it.

# %%
from minimind_v.chapters import close_chapter

close_chapter()
