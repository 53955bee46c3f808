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
# # Chapter 6: stage 2, supervised fine-tuning
#
# ```
# image + question ─▶ ... ─decoder─▶ answer   ◀── this chapter
# ```
#
# After stage 1 the model describes pictures. Stage 2 teaches it to answer questions about them:
# "What colour is the circle?" - "red". The data are conversations of six to eight questions
# about a picture, some types twice (several answers share one reading of its 50 image tokens, so
# a long conversation teaches more per step), and the whole model except CLIP trains
# (`--freeze all`). Two details make it work: the loss falls on the **answers only**, and a few
# caption samples are **mixed in** so the model keeps what stage 1 taught it.

# %%
QUICK = None  # True: tiny sizes; False: the full embedded default; None: follow MINIMIND_V_QUICK
NPROC = None  # training processes per stage; None: one per GPU, else 1 (see chapter 1)

from minimind_v.book import open_chapter, read_metrics, plot_loss, save_figure
from minimind_v.recipe import run_stage, stage_commands, stage_dir

R, RUN, NPROC = open_chapter(QUICK, NPROC, needs=['world', 'clip', 'tokenizer', 'llm', 'pretrain'])
WORLD = stage_dir(RUN, "world")

# %% [markdown]
# ## The answer-only loss mask
#
# A conversation is encoded into token ids and, beside them, **labels**: the token itself where
# the model should learn to produce it (each answer and its closing `</s>`), and -100 everywhere
# else (the chat headers, the questions, the 50 image placeholders). PyTorch's cross-entropy skips
# -100, so the model is never trained to predict the question or the picture, only to answer.
# Inside the model the labels are shifted by one: position t is scored on token t+1.

# %%
import matplotlib.pyplot as plt

from minimind_v.data.datasets import read_records
from minimind_v.tokenizer import IGNORE_INDEX, encode_chat, load_tokenizer
from minimind_v.viz import plot_token_strip

from minimind_v.model.vlm import VLMConfig

tokenizer = load_tokenizer(stage_dir(RUN, "pretrain"))
cfg = VLMConfig.from_pretrained(stage_dir(RUN, "pretrain"))  # how many tokens stand for the image
sft = read_records(WORLD / "sft_data.json")
record = max(sft[:50], key=lambda r: len(r["conversations"]))  # one with several questions
ids, labels = encode_chat(tokenizer, record["conversations"], cfg.num_image_tokens, record_id=record["id"])
print(f"record {record['id']}: {len(ids)} tokens, {sum(l != IGNORE_INDEX for l in labels)} carry a loss")
for turn in record["conversations"]:
    print(f"  {turn['from']:5s}: {turn['value']!r}")

fig = plot_token_strip(tokenizer, ids, image_token_ids=cfg.image_token_ids, labels=labels, chars_per_row=70,
                       title="what the model is trained on: only the answers (and their </s>) carry a loss")
save_figure(fig, "06_loss_mask.png")
plt.show()

# %% [markdown]
# A check from the other side: cut the supervised tokens into runs and decode each; they must be
# exactly the answers, each followed by `</s>`.

# %%
runs, current = [], []
for token, label in zip(ids, labels):
    if label != IGNORE_INDEX:
        current.append(token)
    elif current:
        runs.append(current)
        current = []
if current:
    runs.append(current)
supervised = [tokenizer.decode(run) for run in runs]
answers = [turn["value"] + "</s>" for turn in record["conversations"][1::2]]
print(supervised)
assert supervised == answers

# %% [markdown]
# The shift, on the first answer: the logits at position t are compared with the label at t+1.

# %%
first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
print(f"{'position':>8}  {'input token':>14}  {'target (label at t+1)':>22}")
for t in range(first - 3, first + 2):
    target = labels[t + 1]
    shown = repr(tokenizer.decode([target])) if target != IGNORE_INDEX else "-100 (no loss)"
    print(f"{t:>8}  {tokenizer.decode([ids[t]])!r:>14}  {shown:>22}")

# %% [markdown]
# ## Mixing in captions
#
# Trained on short answers alone, a small model soon forgets how to write a caption. The SFT
# stage therefore adds caption samples from stage 1, `mix_captions` times the number of SFT
# records, drawn once with the run's seed.

# %%
from minimind_v.train.common import FREEZE_STRATEGIES

print(f"SFT records: {len(sft)}; caption samples mixed in: {int(R.mix_captions * len(sft))} "
      f"(mix_captions = {R.mix_captions})")
print(f"what trains: --freeze {R.sft_freeze}: {FREEZE_STRATEGIES[R.sft_freeze]}")

# %% [markdown]
# ## Training
#
# The stage starts from the stage-1 model and runs under `torchrun`, launched from this cell.

# %%
module, args = stage_commands(RUN, R)["sft"]
print("torchrun --standalone --nproc_per_node", NPROC, "-m", module, " ".join(args))
SFT_DIR = stage_dir(RUN, "sft")
# Reused when a finished sft stage with these settings and inputs is there; else trained.
result = run_stage(RUN, R, "sft", nproc=NPROC)

# %%
records = read_metrics(SFT_DIR / "metrics.jsonl")
fig = plot_loss(records, "stage 2: answer loss")
save_figure(fig, "06_sft_loss.png")
plt.show()
print(next(r["summary"] for r in reversed(records) if "summary" in r))

# %% [markdown]
# ## A first look
#
# A few held-out questions, answered greedily by the fine-tuned model. Chapter 7 measures this
# properly, per answer type and against a model that does not see the picture.

# %%
from minimind_v.data.images import load_image
from minimind_v.inference import answer, load_vlm

bundle = load_vlm(SFT_DIR)
held_out = read_records(WORLD / "eval_data.json")[:10]
questions = [r["conversations"][0]["value"] for r in held_out]
images = [load_image(WORLD / "eval_data_images" / r["image"]) for r in held_out]
predictions = answer(bundle, images, questions)
for r, q, p in zip(held_out, questions, predictions):
    truth = r["conversations"][1]["value"]
    print(f"{'ok ' if p.strip().lower() == truth else '   '} {q.replace('<image>', '').strip():48s} "
          f"truth: {truth:12s} model: {p}")

# %% [markdown]
# ## Summary
#
# * SFT trains on question-answer conversations, with labels set to -100 everywhere except the
#   answers and their `</s>`: the model learns to answer, not to ask or to describe the prompt.
# * A share of caption samples keeps the stage-1 skill alive; CLIP stays frozen, the rest trains.
#
# Next: how good is it, where does it look, and what does it say to your own questions?
