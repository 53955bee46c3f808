"""Is the count in the decoder? A linear probe on the state that chooses a count's answer.

A count's answer is one number word, chosen by the prompt's last position. This module takes the
decoder's hidden state there after each layer (the last one's normed, as the output head reads
it), and fits one linear probe per layer (``probes.fit_linear_probe``) to
read the true number from it: fitted on the run's SFT count turns (one-picture records, the number
SFT answered; as many of each number, so that a probe cannot lean on SFT's answer mix as the
model can), scored on its held-out count questions, which no stage trained on. Beside the
probes, the model's own answers, and a probe on the last layer's state without the picture (the
placeholders' own embeddings, as the text-only baseline asks): what the question alone gives.
The held-out questions are split as ``count_report`` splits them (what is counted, how many fit).

If a layer's probe reads the number where the model's answer is wrong, the count is formed and the
answer does not use it; if no layer's does, the count is never formed from what the layers read.

    python -m minimind_v.count_probe runs/world2_seed3 [more run folders ...] [--record FILE]

It reads a run's world (sft_data.json, the SFT pictures' feature cache, eval_data.json and its
pictures), eval/answers.json and its SFT model (sft/).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

import torch

from .count_report import GROUPS, count_group
from .data.records import find_image
from .data.shapes_records import record_images, record_scenes
from .data.shapes_scenes import NUMBER_WORDS
from .evaluate import normalise
from .model.chat_inputs import with_image_tags
from .probes import fit_linear_probe, sft_pictures_of_run
from .relation_report import read_run_answers
from .runfiles import atomic_write_json

MAX_COUNT = 3  # the shapes world's pictures hold one to three objects: answers zero to three
FIT_TURNS = 3000  # SFT count turns each probe is fitted on, as many of each number
DRAWS = 3  # probes fitted on that many draws of them; a probe's figures are the draws' mean


@torch.no_grad()
def answer_states(vlm, questions: list[str], image_tokens: torch.Tensor | None, batch_size: int = 64) -> torch.Tensor:
    """(n, L, dim): for each question, the hidden state at its prompt's last position after each
    of the L layers (the last one's normed, as the output head reads it), with the picture of
    ``image_tokens[i]`` (n, N, width), or without a picture where ``image_tokens`` is None. The
    prompts are those ``inference.answer`` builds (picture in front), left-padded in batches."""
    model, processor = vlm.model, vlm.processor
    out = []
    for lo in range(0, len(questions), batch_size):
        chunk = questions[lo : lo + batch_size]
        prompts = [processor.apply_chat_template([{"role": "user", "content": with_image_tags(q)}],
                                                 add_generation_prompt=True) for q in chunk]
        batch = processor(text=prompts, padding=True, padding_side="left", return_tensors="pt")
        mask = batch["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each prompt's own positions from 0
        tokens = None if image_tokens is None else image_tokens[lo : lo + batch_size].to(model.device)
        result = model(input_ids=batch["input_ids"].to(model.device), attention_mask=mask.to(model.device),
                       position_ids=positions.to(model.device), image_tokens=tokens, output_hidden_states=True,
                       use_cache=False, logits_to_keep=1)
        # hidden_states[0] is the embedding of the prompt's last token, the same for every prompt.
        out.append(torch.stack(result.hidden_states[1:], 1)[:, :, -1].float().cpu())  # (b, L, dim)
    return torch.cat(out)


def number_label(answer: str, where: str) -> int:
    """The class of a count answer ("two" -> 2); ValueError naming ``where`` for anything else."""
    word = normalise(answer)
    if word not in NUMBER_WORDS[: MAX_COUNT + 1]:
        raise ValueError(f"count_probe: {where}: {answer!r} is not a count of 0 to {MAX_COUNT}")
    return NUMBER_WORDS.index(word)


def sft_count_turns(records: list[dict], tokens: torch.Tensor, n: int, seed: int = 0):
    """(questions, labels, image_tokens) of count turns of one-picture SFT records, as many of
    each number as of every other (up to ``n`` in all, drawn with ``seed``): SFT's own mix answers
    "one" most of the time, and a probe fitted on it could lean on that, as the model can. Each
    turn is asked alone with its picture in front, as the held-out questions are. ``tokens[i]``
    holds record i's picture tokens."""
    by_number: dict[int, list[tuple[int, str]]] = {}
    for i, record in enumerate(records):
        conversation = record["conversations"]
        for t, kind in enumerate(record.get("answer_types", [])):
            if kind == "count":
                question = conversation[2 * t]["value"].replace("<image>", "").strip()
                number = number_label(conversation[2 * t + 1]["value"], f"SFT record {record['id']!r}")
                by_number.setdefault(number, []).append((i, question))
    if not by_number:
        raise ValueError("count_probe: the SFT records hold no count turns")
    rng = random.Random(seed)
    each = min(n // len(by_number), *(len(turns) for turns in by_number.values()))
    turns = [(i, q, number) for number in sorted(by_number) for i, q in rng.sample(by_number[number], each)]
    return ([q for _, q, _ in turns], torch.tensor([y for _, _, y in turns], dtype=torch.long),
            tokens[torch.tensor([i for i, _, _ in turns], dtype=torch.long)])


def probe_predictions(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor) -> torch.Tensor:
    """(layers, n_test): each layer's probe's number for each test question; features standardised
    on the training states, as ``probes.linear_probe`` does."""
    predictions = []
    for layer in range(train_x.shape[1]):
        x, y = train_x[:, layer], test_x[:, layer]
        mean, std = x.mean(0), x.std(0) + 1e-6
        probe = fit_linear_probe((x - mean) / std, train_y, MAX_COUNT + 1)
        with torch.no_grad():
            predictions.append(probe((y - mean) / std).argmax(1))
    return torch.stack(predictions)


def probe_counts(vlm, fits: list[tuple[list[str], torch.Tensor, torch.Tensor]], answers: list[dict],
                 scenes: list[list[dict]], held_tokens: torch.Tensor) -> dict[str, Counter]:
    """Per held-out group of ``count_report.GROUPS`` (and "all"): 'questions', 'model' (answers
    right), 'draws' (len(fits)), and, summed over the probes fitted on each of ``fits``, 'layer k'
    (the probe after layer k right, k = 1 .. L) and 'question only' (the last layer's probe on
    states without the picture). A fit is (questions, numbers, picture tokens); ``answers`` are the
    held-out count answers (evaluate's rows), ``scenes`` and ``held_tokens`` their pictures'."""
    held = [a["question"] for a in answers]
    truth = torch.tensor([number_label(a["answer"], f"held-out answer {a['id']!r}") for a in answers])
    held_states, held_blind = answer_states(vlm, held, held_tokens), answer_states(vlm, held, None)[:, -1:]
    counts = {group: Counter() for group in ("all", *GROUPS)}
    groups = [count_group(a["question"], scene) for a, scene in zip(answers, scenes)]
    for i, a in enumerate(answers):
        for c in (counts["all"], counts[groups[i]]):
            c["questions"] += 1
            c["model"] += bool(a["correct"])
            c["draws"] = len(fits)
    for questions, labels, tokens in fits:
        with_picture = probe_predictions(answer_states(vlm, questions, tokens), labels, held_states) == truth
        blind = probe_predictions(answer_states(vlm, questions, None)[:, -1:], labels, held_blind)[0] == truth
        for i in range(len(answers)):
            for c in (counts["all"], counts[groups[i]]):
                c["question only"] += int(blind[i])
                for layer in range(with_picture.shape[0]):
                    c[f"layer {layer + 1}"] += int(with_picture[layer, i])
    return counts


def run_counts(run: Path, fit_turns: int = FIT_TURNS, draws: int = DRAWS) -> dict[str, Counter]:
    """``probe_counts`` of a run folder: probes fitted on ``draws`` draws of ``fit_turns`` of its SFT
    count turns (seeds 0, 1, ...), scored on its held-out count questions about one picture."""
    from .inference import load_vlm

    world = run / "world"
    answers, records = read_run_answers(run, ("id", "image"), "count_probe")
    missing = [a["id"] for a in answers if a["id"] not in records]
    if missing:
        raise ValueError(f"count_probe: answer {missing[0]!r} has no held-out record of that id")
    answers = [a for a in answers if a["type"] == "count" and len(record_images(records[a["id"]])) == 1]
    if not answers:
        raise ValueError(f"count_probe: {run / 'eval' / 'answers.json'} holds no count answers about one picture")
    vlm = load_vlm(run / "sft", require_complete=True)
    _, _, sft_records, sft_tokens = sft_pictures_of_run(run)
    pictures = [find_image(world / "eval_data_images", record_images(records[a["id"]])[0], str(world / "eval_data.json"),
                           a["id"]) for a in answers]
    with torch.no_grad():
        held_tokens = vlm.model.encode_images(vlm.processor(images=pictures)["pixel_values"].to(vlm.model.device))
    fits = [sft_count_turns(sft_records, sft_tokens, fit_turns, seed) for seed in range(draws)]
    return probe_counts(vlm, fits, answers,
                        [record_scenes(records[a["id"]])[0] for a in answers], held_tokens)


def table_markdown(counts: dict[str, Counter]) -> str:
    """Rows: the model's answers, each layer's probe, the probe without the picture; columns: all
    count questions and each group that holds any, right in % (and of how many). ``counts`` may be
    plain dicts, as ``--record`` writes them."""
    counts = {group: Counter(c) for group, c in counts.items()}
    groups = [g for g in counts if counts[g]["questions"]]
    layers = sorted((k for k in counts["all"] if k.startswith("layer ")), key=lambda k: int(k.split()[1]))
    last = int(layers[-1].split()[1])

    def label(row: str) -> str:
        if row.startswith("layer "):
            k = int(row.split()[1])
            return f"probe, after layer {k}" + (" (normed)" if k == last else "")
        return {"model": "the model's answers", "question only": "probe, after the last layer, no picture"}[row]

    lines = ["| read right, % | " + " | ".join(f"{g} ({counts[g]['questions']})" for g in groups) + " |",
             "|---|" + "---:|" * len(groups)]
    for row in ("model", *layers, "question only"):
        asked = lambda g: counts[g]["questions"] * (1 if row == "model" else counts[g]["draws"])  # noqa: E731
        lines.append(f"| {label(row)} | " + " | ".join(f"{100 * counts[g][row] / asked(g):.1f}" for g in groups) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m minimind_v.count_probe", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (world/, eval/answers.json, sft/)")
    p.add_argument("--fit-turns", type=int, default=FIT_TURNS, help=f"SFT count turns per probe (default {FIT_TURNS})")
    p.add_argument("--draws", type=int, default=DRAWS, help=f"probes per layer, each on its own draw (default {DRAWS})")
    p.add_argument("--record", type=Path, help="write each run's counts and all together to this JSON file")
    args = p.parse_args(argv)
    every, record = {}, {"runs": {}}
    for run in args.runs:
        try:
            counts = run_counts(run, args.fit_turns, args.draws)
        except ValueError as error:
            raise SystemExit(str(error)) from None
        record["runs"][str(run)] = {g: dict(c) for g, c in counts.items()}
        for group, c in counts.items():
            every[group] = every.get(group, Counter()) + Counter({k: v for k, v in c.items() if k != "draws"})
            every[group]["draws"] = max(every[group]["draws"], c["draws"])  # the same in every run that asks
        print(f"{run}\n\n{table_markdown(counts)}\n")
    record["together"] = {g: dict(c) for g, c in every.items()}
    if len(args.runs) > 1:
        print(f"all {len(args.runs)} together\n\n{table_markdown(every)}\n")
    if args.record:
        atomic_write_json(args.record, record)
        print(f"wrote {args.record}")


if __name__ == "__main__":
    main()
