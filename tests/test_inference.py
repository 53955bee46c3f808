"""A loaded model is the model and its processor: the processor builds the prompts and the pixels
(the ids and pixel values the hand-built path gave), ``load_vlm`` returns the pair, ``answer``
refuses anything else, and the retired helpers still answer, with a DeprecationWarning.

The references are built without the processor: ``encode_chat`` prompts, padding written out
here, and the vision encoder's own ``preprocess``.
"""

import shutil

import pytest
import torch
from PIL import Image

from minimind_v import inference
from minimind_v.data.images import load_image
from minimind_v.inference import LoadedVLM, answer, load_vlm, suppressed_ids
from minimind_v.model.processing import MiniMindVProcessor
from minimind_v.tokenizer import encode_chat

QUESTIONS = ["What colour is the circle?", "<image>\nHow many objects are there?", "Where is the red star?",
             "What shape is in the center?<image>"]


def picture(seed: int, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    array = (torch.rand(30 + 9 * seed, 47 - 5 * seed, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB").convert(mode)


def chat_ids(tokenizer, question: str, n_tokens: int) -> list[int]:
    """One question's prompt without the processor: encode_chat on one human turn, the tag in front."""
    text = question if "<image>" in question else "<image>\n" + question
    return encode_chat(tokenizer, [{"from": "human", "value": text}], n_tokens, add_generation_prompt=True)[0]


def padded_on_the_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    return ids, mask


@pytest.fixture(scope="module")
def model(make_tiny_vlm):
    model = make_tiny_vlm(seed=5).eval()
    with torch.no_grad():  # larger than the 0.02 init, so a random model says varied things
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def vlm(model, world_tokenizer, tiny_encoder) -> LoadedVLM:
    return LoadedVLM.from_parts(model, world_tokenizer, tiny_encoder)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, model, world_tokenizer, tiny_clip_dir):
    folder = tmp_path_factory.mktemp("inference") / "model"
    model.save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    shutil.copytree(tiny_clip_dir, folder / "tiny_clip")
    return folder


def test_the_processor_gives_the_ids_and_pixels_of_the_hand_built_path(vlm, world_tokenizer, tiny_encoder, tmp_path):
    processor = vlm.processor
    pictures = [picture(0), picture(1, "L"), picture(2, "RGBA"), tmp_path / "p.png"]
    picture(3, "P").save(pictures[-1])
    prompts = processor.apply_chat_template(
        [[{"role": "user", "content": q if "<image>" in q else "<image>\n" + q}] for q in QUESTIONS],
        add_generation_prompt=True)
    batch = processor(images=pictures, text=prompts, padding=True, padding_side="left", return_tensors="pt")

    rows = [chat_ids(world_tokenizer, q, tiny_encoder.num_tokens) for q in QUESTIONS]
    assert len({len(r) for r in rows}) > 1  # the padding is exercised
    ids, mask = padded_on_the_left(rows, world_tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    rgb = [p.convert("RGB") if isinstance(p, Image.Image) else load_image(p) for p in pictures]
    assert torch.equal(batch["pixel_values"], tiny_encoder.preprocess(rgb))
    # question_ids asks the last question with its picture moved in front, as answer() does.
    asked = [*QUESTIONS[:3], "<image>\nWhat shape is in the center?"]
    assert [processor.question_ids(q) for q in QUESTIONS] == [chat_ids(world_tokenizer, q, tiny_encoder.num_tokens)
                                                             for q in asked]


def test_load_vlm_is_the_model_with_its_encoder_and_its_processor(folder, vlm, tiny_encoder, world_tokenizer):
    loaded = load_vlm(folder, device="cpu")
    model, processor = loaded  # a pair ...
    assert (loaded.model, loaded.processor) == (model, processor)  # ... with names
    assert isinstance(processor, MiniMindVProcessor) and processor.num_image_tokens == tiny_encoder.num_tokens
    assert loaded.encoder is model.vision_encoder is not None
    assert processor.image_processor.to_dict() == tiny_encoder.processor.to_dict()
    # The same weights answer the same, loaded or built in memory; both as generate answers the
    # hand-built prompts with the encoder's tokens.
    pictures, questions = [picture(4), picture(5)], QUESTIONS[:2]
    got = answer(loaded, pictures, questions, max_new_tokens=8)
    assert got == answer(vlm, pictures, questions, max_new_tokens=8)
    tok = world_tokenizer
    ids, mask = padded_on_the_left([chat_ids(tok, q, tiny_encoder.num_tokens) for q in questions], tok.pad_token_id)
    out = vlm.model.generate(ids, attention_mask=mask, image_tokens=tiny_encoder(tiny_encoder.preprocess(pictures)),
                             max_new_tokens=8, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, suppress_tokens=suppressed_ids(tok))
    assert got == [s.strip() for s in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


def test_what_is_not_a_model_and_its_processor_is_refused(vlm, world_tokenizer):
    from minimind_v.viz import answer_with_attention, qa_widget

    with pytest.raises(ValueError, match="answer needs \\(model, processor\\).*MiniMindVLM"):
        answer(vlm.model, [picture(0)], ["What colour?"])
    with pytest.raises(ValueError, match="the second item is a .*Tokenizer.*not a MiniMindVProcessor"):
        answer((vlm.model, world_tokenizer), [picture(0)], ["What colour?"])
    with pytest.raises(ValueError, match="answer_with_attention needs"):
        answer_with_attention((vlm.model, world_tokenizer), picture(0), "What colour?")
    with pytest.raises(ValueError, match="qa_widget's model 'broken'"):
        qa_widget({"fine": vlm, "broken": (vlm.model, world_tokenizer)})


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'VLMBundle'"):
        inference.VLMBundle  # noqa: B018  (retired: LoadedVLM.from_parts)
