"""The book's pictures: attention traces (with each step's top tokens), maps, token strips.

A tiny random MiniMind-V (random CLIP 64x64 with 16-pixel patches: 1 CLS + 4x4 patches = 17
image tokens) is built here; nothing is downloaded and nothing is written to figures/. The Q&A
panel is tested in test_panel.py.

``answer_with_attention`` runs transformers' ``generate``; the decoding loop it replaced is kept
here (``loop_trace``) as the reference its traces must equal.
"""

import types

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from PIL import Image  # noqa: E402

from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

from minimind_v.inference import LoadedVLM, answer, suppressed_ids  # noqa: E402
from minimind_v.model.processing import MiniMindVProcessor  # noqa: E402
from minimind_v.model.vision import VisionEncoder  # noqa: E402
from minimind_v.testing import make_random_clip  # noqa: E402
from minimind_v.model.vlm import MiniMindVLM, VLMConfig, placeholder_mask  # noqa: E402
from minimind_v.tokenizer import IGNORE_INDEX, IMAGE_TOKEN, encode_chat, train_tokenizer  # noqa: E402
from minimind_v.viz import (  # noqa: E402
    AttentionTrace,
    answer_with_attention,
    describe_tokens,
    encoder_view,
    image_share,
    patch_grid,
    plot_attention_overlay,
    plot_attention_panel,
    plot_image_share,
    plot_token_strip,
)
from minimind_v.viz.trace import top_candidates  # noqa: E402
from minimind_v.viz.tokens import token_text  # noqa: E402

GRID = 4
N_IMAGE = 1 + GRID * GRID
SENTENCES = [
    f"The {c} {s} is {p} the {c2} {s2}."
    for c in ("red", "blue", "green") for s in ("circle", "square") for p in ("left of", "above")
    for c2 in ("yellow", "blue") for s2 in ("star", "square")
] + ["What colour is the circle?\nHow many shapes are there?", "There are 3 shapes."]


@pytest.fixture(scope="module")
def vlm(tmp_path_factory):
    tokenizer = train_tokenizer(SENTENCES * 3, vocab_size=320)
    clip = make_random_clip(tmp_path_factory.mktemp("clip") / "tiny", image_size=16 * GRID, patch_size=16, width=32)
    encoder = VisionEncoder.from_pretrained(clip)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = VLMConfig(vocab_size=len(tokenizer), dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_position_embeddings=256, vision_width=encoder.width,
                       num_image_tokens=encoder.num_tokens, image_token_ids=[image_id] * encoder.num_tokens)
    torch.manual_seed(0)
    model = MiniMindVLM(config).eval()
    # A larger init than training's, so the random model gives varied, non-degenerate answers.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return LoadedVLM.from_parts(model, tokenizer, encoder)


def chat_prompt_ids(tokenizer, question: str, num_image_tokens: int) -> list[int]:
    """The prompt of one question built without the processor (the reference): ``encode_chat`` on
    one human turn with the ``<image>`` tag in front, ending where the answer begins."""
    text = question if "<image>" in question else "<image>\n" + question
    return encode_chat(tokenizer, [{"from": "human", "value": text}], num_image_tokens,
                       add_generation_prompt=True, num_images=text.count("<image>"))[0]


def picture(seed=0, size=(80, 56)):
    """A non-square picture with structure: random blocks, so crops and shifts are visible."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8)))


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def trace(vlm):
    return answer_with_attention(vlm, picture(), "What colour is the circle?", max_new_tokens=10)


# ----------------------------------------------------------------------------- the trace


def test_trace_shapes_rows_and_image_share(vlm, trace):
    n, L, H = len(trace.token_ids), vlm.model.config.n_layers, vlm.model.config.n_heads
    T = len(trace.prompt_ids)
    assert n > 1, "the random model should say something"
    assert trace.attention.shape == (n, L, H, T + n - 1)
    # Every query's attention over all keys is a distribution.
    torch.testing.assert_close(trace.attention.sum(-1), torch.ones(n, L, H))
    # Token i is chosen by position T-1+i: it cannot see keys after it (they hold exactly 0).
    for i in range(n):
        assert torch.all(trace.attention[i, ..., T + i:] == 0)
    # The image positions are exactly where the prompt holds the <|image|> placeholder.
    image_id = vlm.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    expected = [t for t, token in enumerate(trace.prompt_ids) if token == image_id]
    assert trace.image_positions.tolist() == expected and len(expected) == N_IMAGE
    assert trace.image_attention.shape == (n, L, N_IMAGE)
    torch.testing.assert_close(trace.image_attention, trace.attention[..., expected].mean(2))
    assert trace.image_share.shape == (n, L)
    assert torch.all((trace.image_share >= 0) & (trace.image_share <= 1))
    torch.testing.assert_close(trace.image_share, trace.image_attention.sum(-1))
    assert trace.grid == GRID and trace.image_size == 16 * GRID


def test_traced_answer_equals_answer(vlm, trace):
    for seed, question in [(0, "What colour is the circle?"), (1, "How many shapes are there?")]:
        expected = answer(vlm, [picture(seed)], [question], max_new_tokens=10)[0]
        traced = trace if seed == 0 else answer_with_attention(vlm, picture(seed), question, max_new_tokens=10)
        assert traced.answer == expected
        decoded = [vlm.processor.tokenizer.decode([t]) for t in traced.token_ids]
        assert len(traced.tokens) == len(decoded)
        assert all(text == d for text, d in zip(traced.tokens, decoded) if "\ufffd" not in d)


def test_cached_step_attention_equals_one_full_forward(vlm, trace):
    """Recorded step by step with the KV cache, the rows equal those of one uncached forward pass
    over prompt + answer (eager attention), at the positions that chose each token."""
    model = vlm.model
    T, n = len(trace.prompt_ids), len(trace.token_ids)
    ids = torch.tensor([trace.prompt_ids + trace.token_ids])
    tokens = vlm.encoder(vlm.encoder.preprocess([picture()]))
    with torch.no_grad():
        out = model(ids, image_tokens=tokens, output_attentions=True, use_cache=False)
    full = torch.stack([a[0] for a in out.attentions])  # (L, H, T+n, T+n)
    expected = full[:, :, T - 1 : T - 1 + n, : T + n - 1].permute(2, 0, 1, 3)  # (n, L, H, S)
    torch.testing.assert_close(trace.attention, expected, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def loop_trace(vlm, image, question, max_new_tokens=32, top_k=5):
    """The decoding loop ``answer_with_attention`` ran before it used ``generate`` (the old helpers:
    ``encode_chat``, ``encoder.preprocess``): one forward pass per step with the KV cache and
    ``output_attentions=True``, the last query's attention row and the step's top tokens kept.
    Returns (prompt ids, answer ids, attention (n, L, H, S), image positions, candidates)."""
    model, tok, cfg = vlm.model, vlm.processor.tokenizer, vlm.model.config
    image_tokens = None if image is None else vlm.encoder(vlm.encoder.preprocess([image]))
    ids = torch.tensor([chat_prompt_ids(tok, question, cfg.num_image_tokens)])
    T = ids.shape[1]
    room = cfg.max_position_embeddings - T + 1
    image_positions = placeholder_mask(ids, torch.tensor(cfg.image_token_ids))[0].nonzero().squeeze(1)
    cache = DynamicCache(config=cfg)
    step_input = dict(input_ids=ids, image_tokens=image_tokens)
    rows, generated, candidates = [], [], []
    for _ in range(min(max_new_tokens, room)):
        out = model(**step_input, cache=cache, use_cache=True, output_attentions=True, logits_to_keep=1)
        rows.append(torch.stack([a[0, :, -1, :] for a in out.attentions]).float())
        logits = out.logits[0, -1].float()
        logits[suppressed_ids(tok)] = float("-inf")
        next_id = int(logits.argmax())
        step = top_candidates(tok, logits, top_k, end=next_id == tok.eos_token_id)
        step.chosen_id, step.chosen = next_id, token_text(tok, next_id)
        candidates.append(step)
        if step.end:
            rows.pop()
            break
        generated.append(next_id)
        step_input = dict(input_ids=torch.tensor([[next_id]]))
    attention = torch.zeros(len(rows), cfg.n_layers, cfg.n_heads, T + max(len(rows) - 1, 0))
    for i, row in enumerate(rows):
        attention[i, :, :, : row.shape[-1]] = row
    return ids[0].tolist(), generated, attention, image_positions, candidates


def longest_question(vlm, leave: int) -> str:
    """A question of repeated words whose prompt leaves ``leave`` or more positions (as few as it can)."""
    cfg, words, question = vlm.model.config, [], ""
    while True:
        words.append("red")
        length = len(chat_prompt_ids(vlm.processor.tokenizer, " ".join(words), cfg.num_image_tokens))
        if length > cfg.max_position_embeddings - leave:
            return question
        question = " ".join(words)


def test_generate_trace_equals_the_old_loops(vlm):
    """The trace from ``generate`` is the old loop's: the same prompt, answer, attention, top
    tokens and probabilities, bitwise (``generate``'s prefill, like the old loop, runs the output
    head over the last prompt position only: MiniMindVLM.forward names ``logits_to_keep``)."""
    cases = [(picture(seed), question, 10) for seed in range(3)
             for question in ("What colour is the circle?", "How many shapes are there?")]
    cases += [(picture(4), "What colour is the circle?", 32),  # ends with </s> before the limit
              (None, "How many shapes are there?", 8),  # the text-only baseline
              (picture(), "What colour is the circle?", 1), (picture(), "What colour is the circle?", 0),
              (picture(), longest_question(vlm, 2), 50)]  # stops where the positions run out
    ended = limited = 0
    for image, question, max_new_tokens in cases:
        steps = []
        new = answer_with_attention(vlm, image, question, max_new_tokens=max_new_tokens, on_step=steps.append)
        ids, generated, attention, positions, candidates = loop_trace(vlm, image, question, max_new_tokens)
        assert new.prompt_ids == ids and new.token_ids == generated
        assert torch.equal(new.image_positions, positions)
        assert new.attention.dtype == attention.dtype and torch.equal(new.attention, attention)
        assert new.tokens == [token_text(vlm.processor.tokenizer, i) for i in generated]
        assert new.answer == vlm.processor.tokenizer.decode(generated, skip_special_tokens=True).strip()
        assert steps == new.candidates and len(new.candidates) == len(candidates)
        for i, (got, want) in enumerate(zip(new.candidates, candidates)):
            assert (got.chosen_id, got.chosen, got.ids, got.tokens, got.end) == \
                (want.chosen_id, want.chosen, want.ids, want.tokens, want.end)
            assert got.probs == want.probs
        ended += bool(candidates) and candidates[-1].end
        limited += len(new.prompt_ids) + len(candidates) - 1 == vlm.model.config.max_position_embeddings
    assert ended and limited  # both ways an answer stops were compared


def test_each_step_is_reported_before_its_token_streams(vlm):
    """The panel's streaming: step i's top tokens arrive, then token i, while generate runs; the
    end step is reported, its </s> never streamed."""
    events = []

    class Recorder:
        def put(self, value):
            events.append(("token", value.reshape(-1).tolist()))

        def end(self):
            events.append(("end", None))

    tr = answer_with_attention(vlm, picture(4), "What colour is the circle?", max_new_tokens=10,
                               streamer=Recorder(), on_step=lambda c: events.append(("step", c.chosen_id)))
    assert tr.candidates[-1].end  # this answer ends with </s>
    expected = [("token", tr.prompt_ids)]
    for step in tr.candidates:
        expected.append(("step", step.chosen_id))
        if not step.end:
            expected.append(("token", [step.chosen_id]))
    assert events == expected + [("end", None)]


def test_streamer_receives_prompt_then_each_token(vlm):
    class Recorder:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, value):
            self.puts.append(value.reshape(-1).tolist())

        def end(self):
            self.ended = True

    rec = Recorder()
    tr = answer_with_attention(vlm, picture(2), "How many shapes are there?", max_new_tokens=5, streamer=rec)
    assert rec.puts[0] == tr.prompt_ids
    assert sum(rec.puts[1:], []) == tr.token_ids and rec.ended


def test_bad_question_is_named(vlm):
    with pytest.raises(ValueError, match="question"):
        answer_with_attention(vlm, picture(), "   ")


def generate_steps(vlm, images, question, max_new_tokens):
    """An independent reference for each step's distribution: transformers' generate with its
    scores (after the logits processors: the suppressed placeholder token at -inf)."""
    tok, model = vlm.processor.tokenizer, vlm.model
    ids = torch.tensor([chat_prompt_ids(tok, question, model.config.num_image_tokens)])
    tokens = None if images is None else vlm.encoder(vlm.encoder.preprocess(images))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), image_tokens=tokens,
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id or 0, suppress_tokens=suppressed_ids(tok),
                         output_scores=True, return_dict_in_generate=True)
    return out.sequences[0, ids.shape[1]:].tolist(), [torch.softmax(s[0].float(), -1) for s in out.scores]


def test_each_step_keeps_generates_top_tokens(vlm):
    steps = []
    tr = answer_with_attention(vlm, picture(4), "What colour is the circle?", max_new_tokens=10,
                               top_k=5, on_step=steps.append)
    chosen, dists = generate_steps(vlm, [picture(4)], "What colour is the circle?", 10)
    assert steps == tr.candidates and len(tr.candidates) == len(dists)
    assert [c.chosen_id for c in tr.candidates] == chosen
    for step, dist in zip(tr.candidates, dists):
        values, ids = dist.topk(5)
        assert step.ids == ids.tolist()
        np.testing.assert_allclose(step.probs, values.numpy(), rtol=1e-4, atol=1e-6)
    # The answer tokens are the chosen ones; a final step that chose </s> is marked as the end.
    ends = [c.end for c in tr.candidates]
    assert [c.chosen_id for c in tr.candidates if not c.end] == tr.token_ids
    assert ends == [False] * len(tr.token_ids) + [True] * (len(ends) - len(tr.token_ids))
    # This random model ends this answer after a few tokens, so the end step is covered too.
    assert ends[-1] and tr.candidates[-1].chosen_id == vlm.processor.tokenizer.eos_token_id
    image_id = vlm.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert all(image_id not in c.ids for c in tr.candidates)  # suppressed: never a candidate


def test_text_only_trace_equals_the_text_only_answer(vlm):
    question = "How many shapes are there?"
    tr = answer_with_attention(vlm, None, question, max_new_tokens=8)
    assert not tr.with_image and "text only" in repr(tr)
    assert tr.answer == answer(vlm, None, [question], max_new_tokens=8)[0]
    chosen, dists = generate_steps(vlm, None, question, 8)
    assert [c.chosen_id for c in tr.candidates] == chosen
    with pytest.raises(ValueError, match="without a picture"):
        plot_attention_panel(tr, picture())


def test_a_prompt_longer_than_the_model_is_refused_and_answers_stop_at_its_end(vlm):
    cfg = vlm.model.config
    long_question = " ".join(["What colour is the circle?"] * 60)
    with pytest.raises(ValueError, match="too long"):
        answer_with_attention(vlm, picture(), long_question)
    # A prompt that leaves room for a few answer tokens gets at most that many, without an error.
    question = longest_question(vlm, 2)
    room = cfg.max_position_embeddings - len(chat_prompt_ids(vlm.processor.tokenizer, question, cfg.num_image_tokens)) + 1
    assert room >= 3
    tr = answer_with_attention(vlm, picture(), question, max_new_tokens=50)
    assert tr.candidates[-1].end or len(tr.candidates) == room
    assert len(tr.candidates) <= room


# ----------------------------------------------------------------------------- maps on the grid


def synthetic_trace(hot: dict[int, tuple[int, int]], n_layers=2, grid=GRID, size=64) -> AttentionTrace:
    """A trace whose token i puts all its image attention (half of all) on patch hot[i] = (r, c)."""
    n, N = len(hot), 1 + grid * grid
    image_attention = torch.zeros(n, n_layers, N)
    for i, (r, c) in hot.items():
        image_attention[i, :, 1 + r * grid + c] = 0.5
    return AttentionTrace(
        question="where?", prompt_ids=[1] * (N + 4), token_ids=list(range(n)), tokens=[f"t{i}" for i in range(n)],
        answer="t", image_positions=torch.arange(2, 2 + N), attention=torch.zeros(n, n_layers, 1, N + 4),
        image_attention=image_attention, image_share=image_attention.sum(-1), grid=grid, image_size=size,
    )


def test_patch_grid_puts_patch_r_c_at_row_r_column_c():
    hot = {0: (0, 3), 1: (2, 1), 2: (3, 0)}
    tr = synthetic_trace(hot)
    for i, (r, c) in hot.items():
        grid = patch_grid(tr, i)
        assert grid.shape == (GRID, GRID)
        expected = np.zeros((GRID, GRID))
        expected[r, c] = 0.5
        np.testing.assert_array_equal(grid, expected)
    whole = patch_grid(tr, "all")
    assert whole[0, 3] == whole[2, 1] == whole[3, 0] == pytest.approx(0.5 / 3)
    assert whole.sum() == pytest.approx(0.5)
    np.testing.assert_array_equal(patch_grid(tr, [0, 1], layer=1), (patch_grid(tr, 0) + patch_grid(tr, 1)) / 2)


def test_overlay_draws_each_patch_over_its_own_pixels():
    hot = {0: (0, 3), 1: (2, 1)}
    tr = synthetic_trace(hot)
    fig = plot_attention_overlay(tr, picture(size=(64, 64)))
    assert isinstance(fig, Figure)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 3  # two tokens and the whole answer
    assert panels[0].get_title().startswith("t0") and panels[2].get_title().startswith("whole answer")
    size, cell = 64, 64 / GRID
    fig.canvas.draw()
    for panel, (token, (r, c)) in zip(panels, hot.items()):
        heat = panel.images[1]
        np.testing.assert_array_equal(np.asarray(heat.get_array()), patch_grid(tr, token))
        # Look the heatmap up where patch (r, c) lies in the picture, and elsewhere.
        for rr in range(GRID):
            for cc in range(GRID):
                x, y = panel.transData.transform(((cc + 0.5) * cell, (rr + 0.5) * cell))
                value = heat.get_cursor_data(types.SimpleNamespace(x=x, y=y))
                assert value == (0.5 if (rr, cc) == (r, c) else 0.0), (r, c, rr, cc)
        assert panel.images[0].get_array().shape[:2] == (size, size)


def test_overlay_single_axis_and_layer_choice():
    tr = synthetic_trace({0: (1, 1), 1: (1, 2)})
    fig, ax = plt.subplots()
    assert plot_attention_overlay(tr, picture(), tokens=[1], layer=-1, ax=ax) is fig
    np.testing.assert_array_equal(np.asarray(ax.images[1].get_array()), patch_grid(tr, 1))
    with pytest.raises(ValueError, match="layer"):
        plot_attention_overlay(tr, picture(), layer=5)
    with pytest.raises(ValueError, match="tokens"):
        plot_attention_overlay(tr, picture(), tokens=[7])


def test_head_choice_reads_that_heads_row(trace):
    g, pos = trace.grid, trace.image_positions
    for layer in range(trace.n_layers):
        per_head = []
        for head in range(trace.n_heads):
            row = trace.attention[:, layer, head][:, pos]  # (n, N)
            expected = row[1].numpy()[1:].reshape(g, g)  # token 1, without CLS
            np.testing.assert_allclose(patch_grid(trace, 1, layer=layer, head=head), expected, rtol=1e-6)
            torch.testing.assert_close(image_share(trace, layer, head), row.sum(-1))
            per_head.append(patch_grid(trace, "all", layer=layer, head=head))
        np.testing.assert_allclose(patch_grid(trace, "all", layer=layer), np.mean(per_head, 0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(image_share(trace), trace.image_share.mean(1))
    with pytest.raises(ValueError, match="head"):
        patch_grid(trace, 0, head=trace.n_heads)


def test_patch_maps_draw_each_kept_map_over_its_picture():
    from minimind_v.viz import plot_patch_maps

    maps = np.zeros((2, 3, GRID, GRID))
    hot = {(0, 0): (0, 3), (0, 2): (2, 1), (1, 1): (3, 3)}
    for (row, k), (r, c) in hot.items():
        maps[row, k, r, c] = 0.4
    fig = plot_patch_maps([picture(size=(64, 64)), picture(size=(64, 64))], maps, ["first", "second"],
                          ["layer 1", "layer 2", "layer 3"])
    axes = np.asarray(fig.axes).reshape(2, 4)
    assert [a.get_title(loc="left") for a in axes[:, 0]] == ["first", "second"]
    assert [a.get_title() for a in axes[0, 1:]] == ["layer 1", "layer 2", "layer 3"]
    cell = 64 / GRID
    fig.canvas.draw()
    for row in range(2):
        assert len(axes[row, 0].images) == 1  # the picture alone
        for k in range(3):
            heat = axes[row, 1 + k].images[1]
            np.testing.assert_array_equal(np.asarray(heat.get_array()), maps[row, k])
            if (row, k) in hot:  # the hot patch lies over its own pixels
                r, c = hot[row, k]
                x, y = axes[row, 1 + k].transData.transform(((c + 0.5) * cell, (r + 0.5) * cell))
                assert heat.get_cursor_data(types.SimpleNamespace(x=x, y=y)) == 0.4
    with pytest.raises(ValueError, match="maps must be"):
        plot_patch_maps([picture()], maps, ["one"], ["a", "b", "c"])
    with pytest.raises(ValueError, match="one title per picture"):
        plot_patch_maps([picture(), picture()], maps, ["one"], ["a", "b", "c"])


def test_attention_panel_shows_picture_overlay_colour_bar_and_share(trace):
    fig = plot_attention_panel(trace, picture(), layer=1, head=2, token=0)
    picture_ax, overlay_ax, bar_ax = fig.axes
    assert len(picture_ax.images) == 1 and len(overlay_ax.images) == 2
    np.testing.assert_array_equal(np.asarray(overlay_ax.images[1].get_array()),
                                  patch_grid(trace, 0, layer=1, head=2))
    assert bar_ax.get_ylabel() == "attention weight on the patch"
    share = float(image_share(trace, 1, 2)[0])
    assert f"{share:.0%} on the image" in overlay_ax.get_title() and "layer 1, head 2" in overlay_ax.get_title()
    whole = plot_attention_panel(trace, picture())
    assert "whole answer" in whole.axes[1].get_title()


def unnormalised(pixels, image_processor):
    """(3, S, S) normalised pixel values -> (S, S, 3) in 0..255, floats."""
    mean = torch.tensor(image_processor.image_mean)[:, None, None]
    std = torch.tensor(image_processor.image_std)[:, None, None]
    return ((pixels * std + mean) * 255).permute(1, 2, 0).numpy()


def test_encoder_view_is_what_the_encoder_sees(vlm, trace):
    image = picture(3, size=(120, 72))
    assert trace.processor is vlm.processor  # the plots show the picture through it
    for view in (encoder_view(image, vlm.encoder.image_size), encoder_view(image, processor=vlm.processor)):
        view = np.asarray(view, dtype=np.float32)
        seen = unnormalised(vlm.processor(images=[image])["pixel_values"][0], vlm.encoder.processor)
        assert view.shape == seen.shape
        assert np.abs(view - seen).mean() < 1.0  # same crop; only rounding differs


def hand_crop(image, size):
    """The crop encoder_view wrote out before it used the image processor: shortest side to
    ``size`` (the long side truncated), bicubic, then the centre square."""
    w, h = image.size
    new_w, new_h = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def test_encoder_view_is_pixel_for_pixel_the_hand_written_crop():
    """Through the image processor the view is byte for byte the old hand-written one, so the
    attention figures do not change."""
    rng = np.random.default_rng(0)
    for size in (64, 224):
        for w, h in [(80, 56), (120, 72), (64, 64), (225, 224), (300, 201), (33, 97), (1000, 301), (211, 223), (7, 3)]:
            image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            view = encoder_view(image, size)
            assert view.mode == "RGB" and view.size == (size, size)
            assert np.array_equal(np.asarray(view), np.asarray(hand_crop(image, size))), (size, w, h)
    with pytest.raises(ValueError, match="crops to"):
        encoder_view(image, 32, CLIPImageProcessorPil())


def test_encoder_view_in_resize_mode_shows_the_whole_picture(vlm):
    """An encoder that resizes the whole picture (v1's preprocessing) is shown as it sees it: nothing cut off."""
    processor = MiniMindVProcessor(vlm.encoder.processor, vlm.processor.tokenizer,
                                   num_image_tokens=vlm.processor.num_image_tokens, preprocessing="resize")
    image, size = picture(5, size=(120, 72)), vlm.encoder.image_size
    view = encoder_view(image, size, processor)
    assert np.array_equal(np.asarray(view), np.asarray(image.resize((size, size), Image.BICUBIC)))
    seen = unnormalised(processor(images=[image])["pixel_values"][0], processor.image_processor)
    assert np.abs(np.asarray(view, dtype=np.float32) - seen).mean() < 1.0
    assert not np.array_equal(np.asarray(view), np.asarray(encoder_view(image, size)))  # not the centre crop


def test_image_share_plot(trace):
    fig = plot_image_share(trace)
    assert isinstance(fig, Figure)
    heat = fig.axes[0].images[0]
    np.testing.assert_allclose(np.asarray(heat.get_array()), trace.image_share.numpy().T)
    fig = plot_image_share(trace, kind="lines")
    assert len(fig.axes[0].lines) == trace.n_layers + 1  # one per layer + the uniform reference
    np.testing.assert_allclose(fig.axes[0].lines[0].get_ydata(), trace.image_share[:, 0].numpy())


# ----------------------------------------------------------------------------- token strips


@pytest.fixture(scope="module")
def chat(vlm):
    conv = [{"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": "The circle is red."}]
    return encode_chat(vlm.processor.tokenizer, conv, N_IMAGE)


def test_describe_tokens_marks_image_and_loss_positions(vlm, chat):
    ids, labels = chat
    image_id = vlm.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    rows = describe_tokens(vlm.processor.tokenizer, ids, image_token_ids=[image_id] * N_IMAGE, labels=labels)
    assert [r[0] for r in rows] == list(range(len(ids)))
    assert [i for i, _, is_image, _ in rows if is_image] == [i for i, t in enumerate(ids) if t == image_id]
    assert [i for i, _, _, loss in rows if loss] == [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    assert all("\n" not in text for _, text, _, _ in rows)
    assert "".join(text for _, text, _, _ in rows) == vlm.processor.tokenizer.decode(ids).replace("\n", "↵")
    # Without a pattern, the <|image|> tokens are found by id; a mask is taken as given.
    assert [r[2] for r in describe_tokens(vlm.processor.tokenizer, ids)] == [r[2] for r in rows]
    mask = [i == 0 for i in range(len(ids))]
    assert [r[2] for r in describe_tokens(vlm.processor.tokenizer, ids, image_mask=mask)] == mask


def test_describe_tokens_finds_a_multi_token_pattern_only_where_whole(vlm):
    # The original tokenizer's placeholder is '<'*k + '>'*k: ordinary tokens, found as a pattern.
    lt, gt = 20, 21
    ids = [1, lt, 5, lt, lt, gt, gt, 7, gt]
    rows = describe_tokens(vlm.processor.tokenizer, ids, image_token_ids=[lt, lt, gt, gt])
    assert [r[2] for r in rows] == [False, False, False, True, True, True, True, False, False]
    with pytest.raises(ValueError, match="labels"):
        describe_tokens(vlm.processor.tokenizer, ids, labels=[0])


def test_token_text_shows_the_bytes_of_a_split_character(vlm):
    # The test tokenizer learned no Chinese, so each UTF-8 byte of these characters is one token.
    tok = vlm.processor.tokenizer
    ids = tok("猫 red", add_special_tokens=False).input_ids
    texts = [r[1] for r in describe_tokens(tok, ids)]
    cat_bytes = "猫".encode("utf-8")
    assert texts[: len(cat_bytes)] == [f"\\x{b:02x}" for b in cat_bytes]
    assert "".join(texts[len(cat_bytes):]) == " red"


def strip_boxes(fig):
    """(kind, first index, count) of every token box in a token-strip figure."""
    out = []
    for patch in fig.axes[0].patches:
        gid = patch.get_gid() or ""
        if gid.startswith("token-"):
            kind, first, count = gid[len("token-"):].rsplit("-", 2)
            out.append((kind, int(first), int(count)))
    return out


def test_token_strip_collapses_image_and_outlines_loss(vlm, chat):
    ids, labels = chat
    fig = plot_token_strip(vlm.processor.tokenizer, ids, labels=labels, max_tokens=None)
    assert isinstance(fig, Figure)
    boxes = strip_boxes(fig)
    first_image = next(i for i, t in enumerate(ids) if t == vlm.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    assert [b for b in boxes if b[0].startswith("image")] == [("image-run", first_image, N_IMAGE)]
    assert any(t.get_text() == f"{N_IMAGE} image tokens" for t in fig.axes[0].texts)
    assert sorted(b[1] for b in boxes if b[0] == "loss") == [i for i, l in enumerate(labels) if l != IGNORE_INDEX]
    assert sum(b[2] for b in boxes) == len(ids)

    expanded = strip_boxes(plot_token_strip(vlm.processor.tokenizer, ids, labels=labels, expand_image=True, max_tokens=None))
    assert sorted(b[1] for b in expanded if b[0] == "image") == list(range(first_image, first_image + N_IMAGE))
    assert len(expanded) == len(ids)


def test_token_strip_summarises_past_max_tokens(vlm, chat):
    ids, _ = chat
    fig = plot_token_strip(vlm.processor.tokenizer, ids, max_tokens=10)
    boxes = strip_boxes(fig)
    assert len(boxes) == 11 and boxes[-1][0] == "more"
    assert boxes[-1][1] == boxes[-2][1] + boxes[-2][2]  # the first token not drawn
    assert boxes[-1][2] == len(ids) - sum(b[2] for b in boxes[:-1])


def test_the_architecture_figure_states_the_configs_sizes():
    from minimind_v.model.vlm import VLMConfig
    from minimind_v.viz import plot_architecture

    config = VLMConfig(vocab_size=321, dim=96, n_layers=3, n_heads=6, n_kv_heads=2, vision_width=80,
                       num_image_tokens=50, image_token_ids=[5] * 50)
    fig = plot_architecture(config, vision_layers=7)
    text = "\n".join(t.get_text() for t in fig.axes[0].texts)
    for expected in ("(50, 80)", "linear: 80 → 96", "decoder × 3", "6 heads, 2 KV heads", f"96 → {config.hidden_dim} → 96",
                     "vocab 321", "frozen, 7 layers", "7×7 patches + CLS"):
        assert expected in text, expected
