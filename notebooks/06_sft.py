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

from minimind_v.chapters import open_chapter, read_metrics, plot_loss, save_figure
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
# The labels written out, from the token ids alone: an answer starts right after each
# `<s>assistant\n` header and ends with its `</s>`, which is included (the model must learn to
# stop); every other position gets -100. The package builds the labels while it encodes the chat,
# piece by piece; both ways agree on this record and on the first 200 SFT records.

# %%
import torch


def answer_only_labels(ids, tokenizer):
    """Token ids of a chat -> labels: ids inside each answer (up to and including its </s>), else -100."""
    header = tokenizer("<s>assistant\n", add_special_tokens=False).input_ids  # <s>, assistant, \n: 3 ids here
    out, answering, t = [], False, 0
    while t < len(ids):
        if not answering and ids[t:t + len(header)] == header:  # an answer begins after this header
            out += [IGNORE_INDEX] * len(header)
            t, answering = t + len(header), True
            continue
        out.append(ids[t] if answering else IGNORE_INDEX)
        answering = answering and ids[t] != tokenizer.eos_token_id  # </s> closes the answer
        t += 1
    return out


torch.testing.assert_close(torch.tensor(answer_only_labels(ids, tokenizer)), torch.tensor(labels))
for other in sft[:200]:
    other_ids, other_labels = encode_chat(tokenizer, other["conversations"], cfg.num_image_tokens)
    torch.testing.assert_close(torch.tensor(answer_only_labels(other_ids, tokenizer)), torch.tensor(other_labels))
print(f"the reader's labels = encode_chat's, on record {record['id']} and on {len(sft[:200])} SFT records")

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
# The loss with the shift, written out, on this record and its picture, with the stage-1 model
# that SFT starts from: drop the last position's logits (there is no token after it to predict),
# drop the first label (no position predicts it), and take the cross-entropy of what is left,
# skipping -100. It is the loss the package computes (exercise 2 shows what goes wrong without
# the shift).

# %%
import torch.nn.functional as F

from minimind_v.data.images import load_image
from minimind_v.data.records import find_image  # sft_images/COCO_train2014_<image>, v1's SFT naming
from minimind_v.inference import load_vlm


def shifted_loss(logits, labels):
    """logits (B, T, vocab), labels (B, T): position t is scored on the label at t+1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)


stage1 = load_vlm(stage_dir(RUN, "pretrain"))
record_ids, record_labels = torch.tensor([ids]), torch.tensor([labels])  # (1, T) each
with torch.no_grad():
    pixels = stage1.encoder.preprocess(load_image(find_image(WORLD / "sft_images", record["image"])))  # (1, 3, 224, 224)
    logits = stage1.model(input_ids=record_ids, pixel_values=pixels, use_cache=False).logits  # (1, T, vocab)
    package_loss = stage1.model(input_ids=record_ids, pixel_values=pixels, labels=record_labels, use_cache=False).loss
ours = shifted_loss(logits, record_labels)
# The package runs the output head on the answer rows only: equal up to float rounding.
torch.testing.assert_close(ours, package_loss, rtol=1e-5, atol=1e-5)
print(f"loss of the stage-1 model on this record's {int((record_labels[:, 1:] != IGNORE_INDEX).sum())} answer "
      f"tokens: {ours:.3f} (the package's: {package_loss:.3f})")

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
# The stage starts from the stage-1 model and runs under `torchrun`, launched from this cell. Its
# loss curve is drawn on a log axis, next to ln(vocab), the loss of a uniform guess over the
# vocabulary: the first steps sit above that line (the answers are new text, confidently
# mispredicted), and the part of training that matters is the slow tenfold fall at the end, which
# a linear axis squashes flat.

# %%
module, args = stage_commands(RUN, R)["sft"]
print("torchrun --standalone --nproc_per_node", NPROC, "-m", module, " ".join(args))
SFT_DIR = stage_dir(RUN, "sft")
# Reused when a finished sft stage with these settings and inputs is there; else trained.
result = run_stage(RUN, R, "sft", nproc=NPROC)

# %%
import math

records = read_metrics(SFT_DIR / "metrics.jsonl")
fig = plot_loss(records, "stage 2: answer loss")
ax = fig.axes[0]
ax.set_yscale("log")  # the last tenfold drop is the one that matters: on a linear axis it is a flat line
vocab = len(tokenizer)
ax.axhline(math.log(vocab), color="grey", linestyle="--", linewidth=1)
ax.annotate(f"ln(vocab) = {math.log(vocab):.2f}: a uniform guess over {vocab} tokens",
            (0, math.log(vocab)), xytext=(4, -12), textcoords="offset points", fontsize=8, color="grey")
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
#
# ## Exercises
#
# Worked solutions: `notebooks/solutions/06_solutions.py`, one function per exercise.
#
# 1. **Predict, then run.** Encode a conversation of two questions about a picture, "What colour is
#    the circle?" - "red" and "How many shapes are there?" - "two". How many tokens carry a loss?
#    Check that no header, question or placeholder position does.
# 2. **Predict, then run.** A "model" that copies its input: its logits put a large score on the
#    very token at each position. What is its loss with the shift, and without it? What would a
#    model trained without the shift learn?
# 3. **Predict, then run.** The `\n` after each answer's `</s>` is part of the chat, but its label
#    is -100. Check that for every answer of a conversation. Why is it never needed?
# 4. **Predict, then run.** A sample pays for its picture once (50 placeholders and the headers)
#    and then about a question-and-answer turn per question. What share of a sample's tokens
#    carries a loss with one question, and with seven?
# 5. **Predict, then run.** The loss of a batch averages over all its answer tokens, not over its
#    samples. For a batch of a one-answer sample and a seven-answer sample, write the batch loss
#    as a weighted mean of the two samples' own losses, and check it with a tiny model.


# %%
from minimind_v.chapters import close_chapter

close_chapter()
