"""MiniMind-V's joint: projected patch tokens replace exactly the placeholder embeddings, and nothing else.

The reference for every check is built by hand, position by position (loops are fine in a
test), and compared with what the model feeds its first decoder layer.
"""

from __future__ import annotations

import pytest
import torch

from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.model.projector import VisionProjector
from minimind_v.model.vlm import MiniMindVLM, VLMConfig, placeholder_mask

VOCAB, DIM, WIDTH = 64, 32, 16
IMAGE_TOKEN = 3
V1_LT, V1_GT = 30, 32  # stand-ins for the ids of '<' and '>' in the original tokenizer


def v1_pattern(n: int) -> list[int]:
    """The original placeholder: '<' * (n // 2) + '>' * (n - n // 2), one id per character."""
    return [V1_LT] * (n // 2) + [V1_GT] * (n - n // 2)


def make_vlm(pattern: list[int], seed: int = 0, projector: str = "linear") -> MiniMindVLM:
    torch.manual_seed(seed)
    config = VLMConfig(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2,
                       max_position_embeddings=128, vision_width=WIDTH, num_image_tokens=len(pattern),
                       image_token_ids=pattern, projector=projector)
    model = MiniMindVLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so random models say varied things
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


PATTERNS = {
    "repeated token": [IMAGE_TOKEN] * 4,
    "v1 '<' and '>'": v1_pattern(4),
}


def words(*ids) -> list[int]:
    """Ordinary text ids: never a placeholder id."""
    assert not {IMAGE_TOKEN, V1_LT, V1_GT} & set(ids)
    return list(ids)


def right_pad(rows: list[list[int]], pad: int = 0):
    width = max(map(len, rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    return ids, mask


def expected_embeddings(model, ids: torch.Tensor, image_tokens: torch.Tensor) -> torch.Tensor:
    """The reference, by hand: token embeddings, then image k's projection written over the k-th
    placeholder occurrence (scanning rows in order, left to right)."""
    pattern = model.config.image_token_ids
    N = len(pattern)
    with torch.no_grad():
        embeds = model.tok_embeddings(ids).clone()
        projected = model.vision_proj(image_tokens)  # (n, N, WIDTH) -> (n, N, DIM)
    k = 0
    for b in range(ids.shape[0]):
        row = ids[b].tolist()
        t = 0
        while t <= len(row) - N:
            if row[t : t + N] == pattern:
                embeds[b, t : t + N] = projected[k]
                k += 1
                t += N
            else:
                t += 1
    assert k == image_tokens.shape[0], "the test's prompts and images disagree"
    return embeds


def decoder_inputs(model, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(what the first decoder layer receives, logits) for one forward call."""
    seen = []
    handle = model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        with torch.no_grad():
            logits = model(**kwargs).logits
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0], logits


def check_substitution(model, ids, mask, image_tokens):
    expected = expected_embeddings(model, ids, image_tokens)
    got, logits = decoder_inputs(model, input_ids=ids, attention_mask=mask, image_tokens=image_tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # The same logits as the plain decoder fed the hand-built embeddings.
    with torch.no_grad():
        reference = MiniMindForCausalLM.forward(model, inputs_embeds=expected, attention_mask=mask).logits
    torch.testing.assert_close(logits, reference, rtol=0, atol=0)
    # Every non-placeholder embedding is the token's own, untouched.
    N = model.config.num_image_tokens
    covered = placeholder_mask(ids, torch.tensor(model.config.image_token_ids))
    assert int(covered.sum()) == N * image_tokens.shape[0]
    with torch.no_grad():
        torch.testing.assert_close(got[~covered], model.tok_embeddings(ids)[~covered], rtol=0, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_one_prompt_gets_exactly_the_projected_patches(pattern):
    model = make_vlm(pattern)
    ids = torch.tensor([[1] + words(7, 8) + pattern + words(9, 10, 11, 2)])
    image_tokens = torch.randn(1, len(pattern), WIDTH)
    check_substitution(model, ids, None, image_tokens)
    # the placeholders really changed, and exactly into the projection of the patches
    got, _ = decoder_inputs(model, input_ids=ids, image_tokens=image_tokens)
    with torch.no_grad():
        manual = image_tokens[0] @ model.vision_proj.layers[0].weight.T + model.vision_proj.layers[0].bias
    torch.testing.assert_close(got[0, 3 : 3 + len(pattern)], manual)


@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_mixed_batch_images_land_in_order_at_every_offset(pattern):
    """Rows of different lengths, right-padded, placeholders at different offsets, a row with two
    images, a row with none: image k goes to the k-th placeholder, rows in order."""
    model = make_vlm(pattern)
    rows = [
        [1] + pattern + words(5, 6, 2),                                    # image 0 at offset 1
        [1] + words(5, 6, 7, 8, 9) + pattern + words(2),                   # image 1 at offset 6
        words(4) + pattern + words(5) + pattern + words(6, 7, 8, 9, 10, 2),  # images 2 and 3
        words(1, 5, 6, 7, 2),                                              # no image
        pattern + pattern + words(2),                                      # images 4, 5 back to back
    ]
    ids, mask = right_pad(rows)
    image_tokens = torch.randn(6, len(pattern), WIDTH)
    check_substitution(model, ids, mask, image_tokens)


def test_mlp_projector_is_substituted_too():
    model = make_vlm(PATTERNS["repeated token"], projector="mlp")
    ids, mask = right_pad([[1, 3, 3, 3, 3, 5, 2], [1, 5, 6, 3, 3, 3, 3, 7, 8, 2]])
    check_substitution(model, ids, mask, torch.randn(2, 4, WIDTH))


def test_placeholder_mask_marks_each_occurrence_and_nothing_else():
    pattern = torch.tensor([30, 30, 32, 32])
    ids = torch.tensor([
        [30, 30, 32, 32, 5, 30, 30, 32, 32],  # two occurrences
        [30, 30, 32, 5, 30, 32, 32, 30, 32],  # near-misses only
        [5, 30, 30, 30, 32, 32, 32, 5, 5],    # '<<<>>>' holds '<<>>' once, in its middle
    ])
    expected = torch.tensor([
        [1, 1, 1, 1, 0, 1, 1, 1, 1],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, 0, 1, 1, 1, 1, 0, 0, 0],
    ], dtype=torch.bool)
    assert torch.equal(placeholder_mask(ids, pattern), expected)
    assert not placeholder_mask(ids[:, :3], pattern).any()  # shorter than the pattern


def test_no_image_keeps_the_placeholder_embeddings():
    model = make_vlm(PATTERNS["repeated token"])
    ids = torch.tensor([[1, 3, 3, 3, 3, 5, 2]])
    got, logits = decoder_inputs(model, input_ids=ids)
    with torch.no_grad():
        torch.testing.assert_close(got, model.tok_embeddings(ids), rtol=0, atol=0)
        torch.testing.assert_close(logits, MiniMindForCausalLM.forward(model, input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", PATTERNS.values(), ids=PATTERNS.keys())
def test_wrong_number_of_images_or_tokens_is_a_clear_error(pattern):
    model = make_vlm(pattern)
    N = len(pattern)
    two = torch.tensor([[1] + pattern + [5] + pattern + [2]])
    with pytest.raises(ValueError, match=r"placeholders for 2 image\(s\) of 4 tokens.*shape \(1, 4, 16\)"):
        model(input_ids=two, image_tokens=torch.randn(1, N, WIDTH))
    with pytest.raises(ValueError, match=r"placeholders for 2 image\(s\).*shape \(3, 4, 16\)"):
        model(input_ids=two, image_tokens=torch.randn(3, N, WIDTH))
    one = torch.tensor([[1] + pattern + [2]])
    with pytest.raises(ValueError, match=r"shape \(1, 5, 16\).*expected \(1, 4, 16\)"):
        model(input_ids=one, image_tokens=torch.randn(1, N + 1, WIDTH))  # tokens per image
    with pytest.raises(ValueError, match=r"expected \(1, 4, 16\)"):
        model(input_ids=one, image_tokens=torch.randn(1, N, WIDTH + 1))  # wrong width
    with pytest.raises(ValueError, match=r"placeholders for 0 image"):
        model(input_ids=torch.tensor([[1, 5, 6, 2]]), image_tokens=torch.randn(1, N, WIDTH))


def test_partial_placeholder_raises():
    # Repeated token: 6 copies are one image and a half.
    model = make_vlm(PATTERNS["repeated token"])
    with pytest.raises(ValueError, match=r"rows \[\(1, 6\)\].*partial image placeholder.*exactly 4"):
        model(input_ids=torch.tensor([[1, 3, 3, 3, 3, 2, 0, 0], [1, 3, 3, 3, 3, 3, 3, 2]]),
              image_tokens=torch.randn(2, 4, WIDTH))
    # Fewer copies than one image hold no image, so the image has no place to go. (Stray copies
    # next to whole placeholders are allowed: a generated answer may contain the token, and
    # re-reading prompt + answer must still work.)
    with pytest.raises(ValueError, match=r"placeholders for 0 image\(s\) of 4 tokens"):
        model(input_ids=torch.tensor([[1, 3, 3, 3, 2]]), image_tokens=torch.randn(1, 4, WIDTH))
    # v1 pattern: a cut '<<>' is not an image, so the image has no place to go.
    model = make_vlm(PATTERNS["v1 '<' and '>'"])
    with pytest.raises(ValueError, match=r"placeholders for 0 image"):
        model(input_ids=torch.tensor([[1, 30, 30, 32, 2]]), image_tokens=torch.randn(1, 4, WIDTH))


def test_other_input_errors():
    model = make_vlm(PATTERNS["repeated token"])
    ids = torch.tensor([[1, 3, 3, 3, 3, 2]])
    with pytest.raises(ValueError, match="pixel_values or image_tokens, not both"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 8, 8), image_tokens=torch.zeros(1, 4, WIDTH))
    with pytest.raises(RuntimeError, match="no vision encoder attached"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 8, 8))
    empty = MiniMindVLM(VLMConfig(vocab_size=VOCAB, dim=DIM, n_layers=1, n_heads=4, n_kv_heads=2,
                                  vision_width=WIDTH, num_image_tokens=4)).eval()
    with pytest.raises(ValueError, match="image_token_ids is empty"):
        empty(input_ids=ids, image_tokens=torch.zeros(1, 4, WIDTH))
    with pytest.raises(ValueError, match="unknown projector 'conv'"):
        VisionProjector(WIDTH, DIM, "conv")


def test_pixel_values_go_through_the_frozen_encoder(make_tiny_vlm, tiny_encoder, tiny_world):
    from PIL import Image

    model = make_tiny_vlm().attach_vision_encoder(tiny_encoder)
    names = sorted((tiny_world / "sft_images").iterdir())[:2]
    pixels = tiny_encoder.preprocess([Image.open(p) for p in names])  # (2, 3, 64, 64)
    pattern = model.config.image_token_ids
    ids, mask = right_pad([[1, 50] + pattern + [60, 2], [1] + pattern + [70, 71, 72, 2]])
    via_pixels, logits_pixels = decoder_inputs(model, input_ids=ids, attention_mask=mask, pixel_values=pixels)
    tokens = tiny_encoder(pixels)  # (2, 5, 32)
    via_tokens, logits_tokens = decoder_inputs(model, input_ids=ids, attention_mask=mask, image_tokens=tokens)
    torch.testing.assert_close(via_pixels, via_tokens, rtol=0, atol=0)
    torch.testing.assert_close(via_pixels, expected_embeddings(model, ids, tokens), rtol=0, atol=0)
    torch.testing.assert_close(logits_pixels, logits_tokens, rtol=0, atol=0)

    # Training: the projection and the decoder learn, the encoder does not.
    model.train()
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    model(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixels).loss.backward()
    assert model.vision_proj.layers[0].weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in tiny_encoder.parameters())
    assert model.layers[0].attention.wq.weight.grad.abs().sum() > 0


def test_attach_refuses_an_encoder_of_another_shape(make_tiny_vlm, tiny_encoder):
    with pytest.raises(ValueError, match=r"encoder gives \(5, 32\) tokens.*expects \(5, 48\)"):
        make_tiny_vlm(vision_width=48).attach_vision_encoder(tiny_encoder)
    with pytest.raises(ValueError, match=r"expects \(7, 32\)"):
        make_tiny_vlm(num_image_tokens=7, image_token_ids=[3] * 7).attach_vision_encoder(tiny_encoder)


def test_from_language_model_keeps_the_decoder_and_save_load_round_trips(make_tiny_vlm, tiny_encoder, tmp_path):
    from minimind_v.config import MiniMindConfig

    torch.manual_seed(1)
    lm = MiniMindForCausalLM(MiniMindConfig(vocab_size=VOCAB, dim=DIM, n_layers=2, n_heads=4, n_kv_heads=2,
                                            max_position_embeddings=128)).eval()
    vlm = MiniMindVLM.from_language_model(lm, vision_width=WIDTH, num_image_tokens=4,
                                          image_token_ids=[IMAGE_TOKEN] * 4).eval()
    ids = torch.tensor([[1, 5, 6, 7, 3, 3, 3, 3, 8, 2]])
    with torch.no_grad():
        torch.testing.assert_close(vlm(input_ids=ids).logits, lm(input_ids=ids).logits, rtol=0, atol=0)
    for name, p in lm.state_dict().items():
        assert torch.equal(vlm.state_dict()[name], p), name

    # The attached encoder is not part of the checkpoint; the joint's settings are.
    model = make_tiny_vlm().attach_vision_encoder(tiny_encoder)
    assert not any("vision_encoder" in k or k.startswith("model.") for k in model.state_dict())
    model.save_pretrained(tmp_path / "vlm")
    again = MiniMindVLM.from_pretrained(tmp_path / "vlm").eval()
    assert again.config.image_token_ids == model.config.image_token_ids
    assert (again.config.num_image_tokens, again.config.vision_width) == (5, 32)
    assert again.vision_encoder is None
    image_tokens = torch.randn(1, 5, 32)
    pattern = model.config.image_token_ids
    x = torch.tensor([[1, 40] + pattern + [41, 2]])
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x, image_tokens=image_tokens).logits,
                                   model.eval()(input_ids=x, image_tokens=image_tokens).logits, rtol=0, atol=0)


def test_generate_with_cache_equals_recomputing_everything_with_the_picture():
    """KV-cached generation (the picture enters once, at the prompt) equals a naive greedy loop
    that re-runs the whole sequence, picture included, at every step."""
    pattern = PATTERNS["repeated token"]
    model = make_vlm(pattern, seed=3)
    prompt = torch.tensor([[1, 9, 10] + pattern + [11, 12, 13]])
    image_tokens = torch.randn(1, 4, WIDTH)
    out = model.generate(prompt, image_tokens=image_tokens, max_new_tokens=10, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    sequence = prompt
    with torch.no_grad():
        for _ in range(10):
            logits = model(input_ids=sequence, image_tokens=image_tokens, use_cache=False).logits
            sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, sequence)
    # the picture matters: another image changes the answer
    other = model.generate(prompt, image_tokens=torch.randn(1, 4, WIDTH) * 3, max_new_tokens=10,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
    assert not torch.equal(other, out)


def test_batched_left_padded_generation_matches_one_by_one():
    pattern = PATTERNS["v1 '<' and '>'"]
    model = make_vlm(pattern, seed=4)
    short = [1] + pattern + [9, 10]
    long = [1, 11, 12, 13] + pattern + [14, 15, 16]
    images = torch.randn(2, 4, WIDTH)
    width = len(long)
    batch = torch.tensor([[0] * (width - len(short)) + short, long])
    mask = torch.tensor([[0] * (width - len(short)) + [1] * len(short), [1] * width])
    kw = dict(max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, image_tokens=images, **kw)
    alone_short = model.generate(torch.tensor([short]), image_tokens=images[:1], **kw)
    alone_long = model.generate(torch.tensor([long]), image_tokens=images[1:], **kw)
    assert torch.equal(together[0, width:], alone_short[0, len(short):])
    assert torch.equal(together[1, width:], alone_long[0, len(long):])


def test_cls_only_fills_every_placeholder_with_the_cls_token():
    """vision_tokens="cls" (chapter 08's ablation) is the full substitution fed a picture whose
    every token is its CLS token (index 0), and it survives save and load."""
    pattern = PATTERNS["repeated token"]
    model = make_vlm(pattern)
    cls_model = make_vlm(pattern)
    cls_model.config.vision_tokens = "cls"
    ids, mask = right_pad([words(5) + pattern + words(6, 7), pattern + words(8)])
    image_tokens = torch.randn(2, len(pattern), WIDTH, generator=torch.Generator().manual_seed(1))
    only_cls = image_tokens[:, :1].repeat(1, len(pattern), 1)
    got, _ = decoder_inputs(cls_model, input_ids=ids, attention_mask=mask, image_tokens=image_tokens)
    torch.testing.assert_close(got, expected_embeddings(model, ids, only_cls), rtol=0, atol=0)
    with pytest.raises(ValueError, match="vision_tokens"):
        VLMConfig(vision_tokens="pooled")


def test_vision_tokens_is_kept_in_the_saved_config(tmp_path):
    model = make_vlm(PATTERNS["repeated token"])
    model.config.vision_tokens = "cls"
    model.save_pretrained(tmp_path)
    assert VLMConfig.from_pretrained(tmp_path).vision_tokens == "cls"


def test_image_dropout_drops_encoder_tokens_in_training_only():
    """`--image-dropout p`: in training, the substitution is that of the encoder's tokens through
    dropout (the same random draw, made by hand); in evaluation, nothing changes."""
    import torch.nn.functional as F

    pattern = PATTERNS["repeated token"]
    model = make_vlm(pattern)
    model.image_dropout = 0.5
    ids, mask = right_pad([words(5) + pattern + words(6, 7), pattern + words(8)])
    image_tokens = torch.randn(2, len(pattern), WIDTH, generator=torch.Generator().manual_seed(1))
    check_substitution(model, ids, mask, image_tokens)  # eval mode: untouched
    model.train()
    torch.manual_seed(3)
    got, _ = decoder_inputs(model, input_ids=ids, attention_mask=mask, image_tokens=image_tokens)
    torch.manual_seed(3)
    dropped = F.dropout(image_tokens, 0.5)
    assert 0 < int((dropped == 0).sum()) < dropped.numel()
    torch.testing.assert_close(got, expected_embeddings(model, ids, dropped), rtol=0, atol=0)
    model.image_dropout = 0.0  # the default: training substitutes the tokens as they are
    got, _ = decoder_inputs(model, input_ids=ids, attention_mask=mask, image_tokens=image_tokens)
    torch.testing.assert_close(got, expected_embeddings(model, ids, image_tokens), rtol=0, atol=0)


def test_image_dropout_flag_is_range_checked():
    from minimind_v.train.vlm import build_parser

    parser = build_parser("sft")
    base = ["--data", "d", "--init", "i", "--out", "o"]
    assert parser.parse_args(base).image_dropout == 0.0
    assert parser.parse_args(base + ["--image-dropout", "0.2"]).image_dropout == 0.2
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--image-dropout", "0.95"])
