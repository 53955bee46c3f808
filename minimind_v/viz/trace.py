"""Where does the model look? One greedy answer, with the attention behind each of its tokens.

``answer_with_attention`` answers one question greedily with transformers' ``generate``
(``output_attentions=True, return_dict_in_generate=True``: the eager attention path, the key/value
cache as usual) and keeps, from every step, the attention weights of the query that chose the
token: layer by layer and head by head, over every key so far (prompt, image placeholders,
earlier answer tokens). ``minimind_v.viz.attention`` reads those rows as maps over the picture.

"Attention from a token" here means the attention of the position that *predicted* it: the
first answer token is chosen by the last prompt position ("assistant\\n"), token i by the
position holding token i-1. That is the attention paid while the model decided on the word.

Each step also keeps what else the model considered: the ``top_k`` most likely next tokens and
their probabilities (``AttentionTrace.candidates``), the distribution greedy decoding chose
from (``generate``'s scores, after its logits processors). A logits processor placed after
``generate``'s own reports each step as it is decided (``on_step``), and a streamer receives the
answer token by token, so a panel can show both while the answer is still being written. With
``image=None`` the question is asked as the text-only baseline asks it (the placeholders keep
their own embeddings, as in ``inference.answer(vlm, None, ...)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from ..inference import DEFAULT_MAX_NEW_TOKENS, model_and_processor, suppressed_ids
from ..model.vlm import placeholder_mask
from .tokens import token_text

DEFAULT_TOP_K = 5


@dataclass
class Candidates:
    """One answer step: the token chosen and the ``top_k`` most likely tokens, best first.

    ``probs`` is the softmax of the step's logits once the tokens an answer may never contain
    (``inference.suppressed_ids``) are removed: what greedy decoding chose from, so
    ``ids[0] == chosen_id`` (up to ties). ``end`` marks the step that chose the end token: that
    token is not part of the answer.
    """

    chosen_id: int
    chosen: str  # the chosen token's text
    ids: list[int]
    tokens: list[str]
    probs: list[float]
    end: bool = False


@dataclass
class AttentionTrace:
    """One greedy answer and the attention behind each of its tokens.

    attention:        (n_generated, n_layers, n_heads, S) float32, each row sums to 1; S is the
                      prompt length plus n_generated - 1, and keys a step could not see yet
                      (later answer tokens) hold 0, exactly what causal attention gives them.
    image_attention:  (n_generated, n_layers, N) head-averaged attention on the N image tokens
                      (token 0 is CLS, 1.. the patch grid, row by row).
    image_share:      (n_generated, n_layers) total head-averaged attention on the image tokens.
    candidates:       one ``Candidates`` per step: each answer token's, then, if the answer
                      ended before ``max_new_tokens``, the step that chose to end it.
    with_image:       False for the text-only baseline: the "image" positions then hold the
                      placeholders' own embeddings, no picture.
    processor:        the ``MiniMindVProcessor`` that made the prompt and the pixels (None for a
                      trace built by hand): ``encoder_view`` shows the picture through it.
    """

    question: str
    prompt_ids: list[int]
    token_ids: list[int]  # the generated answer tokens (the final </s> is not kept)
    tokens: list[str]  # each answer token's text
    answer: str  # the decoded answer, as ``inference.answer`` returns it
    image_positions: torch.Tensor  # (N,) where the image tokens sit in the prompt
    attention: torch.Tensor
    image_attention: torch.Tensor
    image_share: torch.Tensor
    grid: int  # patches per side: N = 1 + grid * grid
    image_size: int  # the encoder's input side in pixels
    candidates: list[Candidates] = field(default_factory=list)
    with_image: bool = True
    processor: object = field(default=None, repr=False, compare=False)  # made the prompt and the pixels

    @property
    def n_layers(self) -> int:
        return self.attention.shape[1]

    @property
    def n_heads(self) -> int:
        return self.attention.shape[2]

    def __repr__(self) -> str:
        n, L, H, S = self.attention.shape
        picture = "" if self.with_image else ", text only (no picture)"
        return (f"AttentionTrace(answer={self.answer!r}, {n} tokens, {L} layers x {H} heads, "
                f"{S} keys, {len(self.image_positions)} image tokens on a {self.grid}x{self.grid} grid{picture})")


def _grid_side(num_image_tokens: int) -> int:
    g = math.isqrt(num_image_tokens - 1)
    if g * g + 1 != num_image_tokens:
        raise ValueError(f"{num_image_tokens} image tokens are not 1 CLS + a square patch grid")
    return g


def top_candidates(tokenizer, logits: torch.Tensor, top_k: int = DEFAULT_TOP_K, end: bool = False) -> Candidates:
    """The ``top_k`` most likely tokens of one step's (already suppressed) logits (V,)."""
    probs = torch.softmax(logits.float(), dim=-1)
    values, ids = probs.topk(min(top_k, probs.numel()))
    ids = ids.tolist()
    return Candidates(chosen_id=ids[0], chosen=token_text(tokenizer, ids[0]), ids=ids,
                      tokens=[token_text(tokenizer, i) for i in ids], probs=values.tolist(), end=end)


class _StepReporter(LogitsProcessor):
    """The last of ``generate``'s logits processors: it sees each step's scores as greedy
    decoding will read them (the suppressed tokens already at -inf), keeps that step's
    ``Candidates`` and hands them to ``on_step`` before the token is streamed. It changes no score."""

    def __init__(self, tokenizer, top_k: int, on_step: Callable[[Candidates], None] | None):
        self.tokenizer, self.top_k, self.on_step = tokenizer, top_k, on_step
        self.steps: list[Candidates] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.steps and self.steps[-1].end:
            return scores  # a deferred stop check (generate on "mps") runs one step past the end, then undoes it
        logits = scores[0]  # (V,) float32, one answer at a time
        next_id = int(logits.argmax())  # generate's own choice: argmax of these very scores
        step = top_candidates(self.tokenizer, logits, self.top_k, end=next_id == self.tokenizer.eos_token_id)
        step.chosen_id, step.chosen = next_id, token_text(self.tokenizer, next_id)  # argmax decides ties
        self.steps.append(step)
        if self.on_step is not None:
            self.on_step(step)
        return scores


class _AnswerStreamer(BaseStreamer):
    """Passes the prompt, then each answer token, to the caller's streamer; the end token that
    closes the answer is not part of it and is not passed on."""

    def __init__(self, streamer, eos_token_id: int | None):
        self.streamer, self.eos_token_id = streamer, eos_token_id
        self._prompt_seen = False

    def put(self, value):
        if self._prompt_seen and value.numel() == 1 and int(value.reshape(-1)[0]) == self.eos_token_id:
            return
        self._prompt_seen = True
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


@torch.no_grad()
def answer_with_attention(
    vlm,
    image,
    question: str,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    image_tokens: torch.Tensor | None = None,
    streamer=None,
    top_k: int = DEFAULT_TOP_K,
    on_step: Callable[[Candidates], None] | None = None,
) -> AttentionTrace:
    """Answer ``question`` about ``image`` (a path or PIL image) greedily and trace the attention.

    ``vlm`` is the model and its processor (``inference.load_vlm``). One call of
    ``generate(output_attentions=True, return_dict_in_generate=True)``: the eager attention path
    with the KV cache, each step one token's forward pass. The prompt is the processor's
    (``processor.question_ids``), the pixels too (``processor(images=...)``). ``image_tokens``
    (1, N, width) may replace ``image``; with neither, the model answers without a picture (the
    text-only baseline). ``streamer`` (a transformers streamer) receives the prompt, then each
    answer token, as in ``generate``; ``on_step`` receives each step's ``Candidates`` as soon as
    it is chosen. The answer stops at the end token, after ``max_new_tokens``, or where the
    model's positions run out.
    """
    model, processor = model_and_processor(vlm, "answer_with_attention")
    cfg = model.config
    device = model.device
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    tok = processor.tokenizer
    if image_tokens is None and image is not None:
        pixels = processor(images=[image])["pixel_values"].to(device)  # (1, 3, S, S)
        image_tokens = model.encode_images(pixels)  # (1, N, width)
    if image_tokens is not None:
        image_tokens = image_tokens.to(device)
        if image_tokens.dim() != 3 or image_tokens.shape[0] != 1:
            raise ValueError(f"image_tokens must be (1, N, width) for one image, got {tuple(image_tokens.shape)}")

    ids = torch.tensor([processor.question_ids(question)], device=device)  # (1, T)
    T = ids.shape[1]
    room = cfg.max_position_embeddings - T + 1  # the last answer token needs no position of its own
    if room < 1:
        raise ValueError(f"the question is too long: its prompt is {T} tokens ({cfg.num_image_tokens} of them "
                         f"for the picture) and the model reads at most {cfg.max_position_embeddings}")
    pattern = torch.tensor(cfg.image_token_ids, device=device)
    image_positions = placeholder_mask(ids, pattern)[0].nonzero().squeeze(1).cpu()  # (N,)

    reporter = _StepReporter(tok, top_k, on_step)
    relay = None if streamer is None else _AnswerStreamer(streamer, tok.eos_token_id)
    steps = min(max_new_tokens, room)
    if steps < 1:  # nothing to generate (generate refuses max_new_tokens=0)
        attentions, generated = (), []
        if relay is not None:
            relay.put(ids.cpu())
            relay.end()
    else:
        # GenerationMixin.generate itself: the model's own generate keeps one position back for the
        # last token (room - 1 new tokens at most), where this trace has always gone to the last position.
        out = GenerationMixin.generate(
            model, ids, attention_mask=torch.ones_like(ids), image_tokens=image_tokens,
            max_new_tokens=steps, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0,
            suppress_tokens=suppressed_ids(tok) or None, logits_processor=LogitsProcessorList([reporter]),
            streamer=relay, output_attentions=True, return_dict_in_generate=True,
        )
        attentions = out.attentions  # one tuple per step: each layer's (1, H, t, S)
        generated = out.sequences[0, T:].tolist()
    candidates = reporter.steps
    if candidates and candidates[-1].end:
        generated = generated[:-1]  # the end token is not part of the answer ...
        attentions = attentions[:-1]  # ... and the attention that chose it belongs to no answer token

    # Each step: the last query's row (H, S) of each layer, stacked (L, H, S); padded to the
    # longest key length with zeros (keys not yet written).
    S = T + max(len(attentions) - 1, 0)
    L, H = cfg.n_layers, cfg.n_heads
    attention = torch.zeros(len(attentions), L, H, S)
    for i, layers in enumerate(attentions):
        row = torch.stack([a[0, :, -1, :] for a in layers]).float().cpu()
        attention[i, :, :, : row.shape[-1]] = row
    image_attention = attention[..., image_positions].mean(2)  # (n, L, H, N) -> (n, L, N)
    image_share = image_attention.sum(-1)  # (n, L)
    return AttentionTrace(
        question=question,
        prompt_ids=ids[0].tolist(),
        token_ids=generated,
        tokens=[token_text(tok, i) for i in generated],
        answer=tok.decode(generated, skip_special_tokens=True).strip(),
        image_positions=image_positions,
        attention=attention,
        image_attention=image_attention,
        image_share=image_share,
        grid=_grid_side(cfg.num_image_tokens),
        image_size=int(processor.image_processor.crop_size["height"]),
        candidates=candidates,
        with_image=image_tokens is not None,
        processor=processor,
    )
