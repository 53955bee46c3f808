"""MiniMindVProcessor and the Auto classes: the same ids, pixels and answers as the path they replace.

The reference for every check is the old path, built here from its parts: ``encode_chat`` for the
prompt ids, the vision encoder's ``preprocess`` for the pixels, padding on the left by hand, and
``model.generate`` with the encoder's tokens. A saved folder must load through transformers'
Auto classes (no remote code) and answer exactly as the direct classes do, and a folder saved
before processors existed must load unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

import minimind_v  # noqa: F401  (registers the Auto classes)
from minimind_v.config import IGNORE_INDEX, MiniMindConfig
from minimind_v.data.images import load_image, to_rgb
from minimind_v.inference import LoadedVLM, answer, load_vlm, suppressed_ids
from minimind_v.model import llm as llm_module
from minimind_v.model.chat_inputs import picture_in_front, with_image_tags
from minimind_v.model.processing import PROCESSOR_CONFIG, MiniMindVProcessor, save_processor
from minimind_v.model.vlm import MiniMindVLM, VLMConfig
from minimind_v.tokenizer import (CHAT_TEMPLATE, IMAGE_TOKEN, encode_chat, image_placeholder, load_tokenizer,
                                  render_chat, train_tokenizer)
from minimind_v import tokenizer as tokenizer_module

QUESTIONS = [
    "What colour is the circle?",
    "<image>\nHow many objects are there?",
    "   Where is the red star?  ",
    "What shape is in the center?<image>",
    "颜色呢？ 😀",
]
# The same questions as answer() and question_ids() ask them: a lone tag after the words is moved in front.
ASKED = [*QUESTIONS[:3], "<image>\nWhat shape is in the center?", QUESTIONS[4]]
# The v1 MiniMind chat template (kept by a folder that declares it).
V1_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ system_message }}{% endif %}{% for message in messages %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<s>user\\n' + content + '</s>\\n<s>assistant\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ content + '</s>' + '\\n' }}{% endif %}{% endfor %}"
)


def picture(seed: int, mode: str = "RGB") -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    size = (40 + 7 * seed, 50 + 3 * seed)
    array = (torch.rand(*size, 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB").convert(mode)


def old_prompt(tokenizer, question: str, n_tokens: int, n_pictures: int = 1) -> list[int]:
    """The prompt as the old path built it: encode_chat on one human turn, tags in front."""
    text = question if "<image>" in question else "<image>\n" * n_pictures + question
    ids, labels = encode_chat(tokenizer, [{"from": "human", "value": text}], n_tokens,
                              add_generation_prompt=True, num_images=text.count("<image>"))
    assert set(labels) == {IGNORE_INDEX}
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask): each row right-aligned after pad_id, the old path's batch."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def as_images(pictures) -> list[Image.Image]:
    """Paths read, PIL images converted to RGB: what the old path gave the encoder's preprocess."""
    return [load_image(p) if isinstance(p, (str, Path)) else to_rgb(p) for p in pictures]


def old_answers(bundle, pictures, questions, n_pictures=None, max_new_tokens=10) -> list[str]:
    """answer() as it was: encode_chat prompts, left_pad, the encoder's tokens, generate."""
    tok, model, enc = bundle.processor.tokenizer, bundle.model, bundle.encoder
    n_pictures = n_pictures or [1] * len(questions)
    rows = [old_prompt(tok, q, model.config.num_image_tokens, k) for q, k in zip(questions, n_pictures)]
    ids, mask = left_pad(rows, tok.pad_token_id or 0)
    tokens = None if pictures is None else enc(enc.preprocess(as_images(pictures)))
    out = model.generate(ids, attention_mask=mask, image_tokens=tokens, max_new_tokens=max_new_tokens,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id or 0, do_sample=False,
                         suppress_tokens=suppressed_ids(tok) or None)
    return [s.strip() for s in tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)]


@pytest.fixture(scope="module")
def model(make_tiny_vlm):
    model = make_tiny_vlm(seed=3).eval()
    with torch.no_grad():  # larger than the 0.02 init, so a random model says varied things
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def bundle(model, world_tokenizer, tiny_encoder):
    model.attach_vision_encoder(tiny_encoder)
    return LoadedVLM.from_parts(model, world_tokenizer, tiny_encoder)


@pytest.fixture(scope="module")
def old_folder(tmp_path_factory, model, world_tokenizer, tiny_clip_dir) -> Path:
    """A folder as saved before processors existed: weights, tokenizer, the encoder inside."""
    folder = tmp_path_factory.mktemp("processor") / "old"
    model.save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    shutil.copytree(tiny_clip_dir, folder / "tiny_clip")
    assert not (folder / PROCESSOR_CONFIG).exists()
    return folder


@pytest.fixture(scope="module")
def new_folder(tmp_path_factory, old_folder, model) -> Path:
    """The same folder with the processor saved in it (what training writes)."""
    folder = Path(shutil.copytree(old_folder, tmp_path_factory.mktemp("processor") / "new"))
    save_processor(folder, model=model)
    return folder


# ----------------------------------------------------------------------------- the same ids and pixels


def test_processor_gives_the_old_ids_and_pixels(bundle, world_tokenizer, tiny_encoder):
    proc = bundle.processor
    N = tiny_encoder.num_tokens
    assert proc.placeholder_ids == image_placeholder(world_tokenizer, N)[1] == bundle.model.config.image_token_ids
    assert proc.image_token_id == world_tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    texts = [q if "<image>" in q else "<image>\n" + q for q in QUESTIONS]
    prompts = proc.apply_chat_template([[{"role": "user", "content": t}] for t in texts], add_generation_prompt=True)
    assert prompts == [render_chat([{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    pictures = [picture(0), picture(1, "L"), picture(2, "RGBA"), picture(3, "P"), picture(4)]
    batch = proc(images=pictures, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    rows = [old_prompt(world_tokenizer, q, N) for q in QUESTIONS]
    ids, mask = left_pad(rows, world_tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], ids) and torch.equal(batch["attention_mask"], mask)
    assert torch.equal(batch["pixel_values"], tiny_encoder.preprocess(as_images(pictures)))
    # Unpadded: exactly each prompt's ids; paths read as the old path read them.
    assert proc(text=prompts)["input_ids"] == rows == [old_prompt(world_tokenizer, q, N) for q in QUESTIONS]
    assert [proc.question_ids(q) for q in QUESTIONS] == [old_prompt(world_tokenizer, q, N) for q in ASKED]
    assert proc.question_ids("Same?", 2) == old_prompt(world_tokenizer, "Same?", N, 2)
    with pytest.raises(ValueError, match="special token"):
        proc.question_ids("a <s> b")
    # For ordinary text the piecewise ids equal tokenizing the expanded prompt as a whole.
    whole = [world_tokenizer(p.replace("<image>", IMAGE_TOKEN * N), add_special_tokens=False).input_ids
             for p in prompts]
    assert whole == rows


def test_paths_and_the_original_placeholder(tmp_path, tiny_encoder):
    """Image files give the pixels of the PIL images they hold; a tokenizer without <|image|> gets
    the v1 placeholder '<' * (n // 2) + '>' * (n - n // 2), expanded as encode_chat expands it."""
    texts = ["What colour is the circle? " * 3, "How many shapes are there? one two three"] * 20
    original = train_tokenizer(texts, vocab_size=300)
    original.chat_template = CHAT_TEMPLATE
    # Drop the image token: the original MiniMind tokenizer has none.
    tok_dir = tmp_path / "tok"
    original.save_pretrained(tok_dir)
    config = json.loads((tok_dir / "tokenizer_config.json").read_text())
    for key in ("image_token", "model_specific_special_tokens", "extra_special_tokens"):
        config.pop(key, None)
    backend = json.loads((tok_dir / "tokenizer.json").read_text())
    backend["added_tokens"] = [t for t in backend["added_tokens"] if t["content"] != IMAGE_TOKEN]
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (tok_dir / "tokenizer.json").write_text(json.dumps(backend))
    tok = load_tokenizer(tok_dir)
    assert IMAGE_TOKEN not in tok.get_added_vocab()
    proc = MiniMindVProcessor.from_encoder(tok, tiny_encoder)
    N = tiny_encoder.num_tokens
    assert proc.image_token_id is None
    assert tok.convert_ids_to_tokens(proc.placeholder_ids) == ["<"] * (N // 2) + [">"] * (N - N // 2)
    questions = ["What colour?<image>", "<image>How many?", "<image>\n<image>\ntwo pictures"]
    prompts = proc.apply_chat_template([[{"from": "human", "value": q}] for q in questions], add_generation_prompt=True)
    pictures = [picture(5), picture(6), picture(7, "LA")]
    paths = []
    for i, p in enumerate(pictures):
        paths.append(tmp_path / f"p{i}.png")
        p.save(paths[-1])
    batch = proc(images=[[paths[0]], [paths[1]], [paths[2], pictures[0]]], text=prompts)
    assert batch["input_ids"] == [old_prompt(tok, q, N, q.count("<image>")) for q in questions]
    assert torch.equal(batch["pixel_values"], tiny_encoder.preprocess(as_images(paths + [pictures[0]])))


def test_the_encoders_preprocessing_mode_is_followed_and_saved(tiny_clip_dir, world_tokenizer, old_folder, tmp_path):
    from minimind_v.model import vision

    encoder = vision.VisionEncoder.from_pretrained(tiny_clip_dir, preprocessing="resize")
    proc = MiniMindVProcessor.from_encoder(world_tokenizer, encoder)
    wide = [picture(40), picture(41, "L")]
    assert proc.preprocessing == "resize"
    assert torch.equal(proc(images=wide)["pixel_values"], encoder.preprocess(wide))
    assert not torch.equal(proc(images=wide)["pixel_values"], MiniMindVProcessor.from_encoder(
        world_tokenizer, vision.VisionEncoder.from_pretrained(tiny_clip_dir))(images=wide)["pixel_values"])
    folder = Path(shutil.copytree(old_folder, tmp_path / "resize"))
    proc.save_pretrained(folder)
    assert json.loads((folder / PROCESSOR_CONFIG).read_text())["preprocessing"] == "resize"
    assert AutoProcessor.from_pretrained(folder).preprocessing == "resize"


# ----------------------------------------------------------------------------- answers


def test_answer_equals_the_old_path(bundle):
    pictures = [picture(i) for i in range(len(QUESTIONS))]
    assert answer(bundle, pictures, QUESTIONS, max_new_tokens=10) == old_answers(bundle, pictures, ASKED)
    assert answer(bundle, None, QUESTIONS, max_new_tokens=10) == old_answers(bundle, None, ASKED)
    tokens = bundle.encoder(bundle.encoder.preprocess(pictures))
    assert answer(bundle, None, QUESTIONS, image_tokens=tokens, max_new_tokens=10) == \
        old_answers(bundle, pictures, ASKED)
    # As written, the tag stays after the words, as the old path left it.
    assert answer(bundle, pictures, QUESTIONS, max_new_tokens=10, picture_first=False) == \
        old_answers(bundle, pictures, QUESTIONS)


def test_a_lone_picture_is_moved_in_front_of_its_question():
    assert picture_in_front("What colour is the circle?\n<image>") == "<image>\nWhat colour is the circle?"
    assert picture_in_front("What is <image> here?") == "<image>\nWhat is here?"
    assert picture_in_front("Line one\nline two\n<image>") == "<image>\nLine one\nline two"
    for unchanged in ("<image>\nWhat colour?", "No picture here", "Is <image> like <image>?"):
        assert picture_in_front(unchanged) == unchanged
    assert with_image_tags("Where?\n<image>") == "<image>\nWhere?"
    assert with_image_tags("Where?\n<image>", picture_first=False) == "Where?\n<image>"
    assert with_image_tags("Where?", 2) == "<image>\n<image>\nWhere?"


def test_several_pictures_per_question(bundle):
    """images[i] may be a list: one picture per tag, in order; a question without tags gets one
    per picture in front. The pictures of the whole batch fill the placeholders in row order."""
    a, b, c, d = (picture(i) for i in (10, 11, 12, 13))
    questions = ["Is <image> the same as <image>?", "What colour is the circle?", "Which is bigger?"]
    groups = [[a, b], c, [d, a]]
    got = answer(bundle, groups, questions, max_new_tokens=10)
    assert got == old_answers(bundle, [a, b, c, d, a], questions, n_pictures=[2, 1, 2])
    # Each question alone gives the same answer as in the batch; swapping two pictures matters.
    assert got == [answer(bundle, [g], [q], max_new_tokens=10)[0] for g, q in zip(groups, questions)]
    assert answer(bundle, [[b, a]], questions[:1], max_new_tokens=10) != got[:1]
    # A question with no picture at all (an empty list) is asked as text, in the same batch.
    mixed = answer(bundle, [[], c], ["What is a circle?", questions[1]], max_new_tokens=10)
    assert mixed[1] == got[1]
    with pytest.raises(ValueError, match=r"question 1 .*'Compare <image>.*1 '<image>' tag\(s\) but 2 picture"):
        answer(bundle, [a, [b, c]], ["ok", "Compare <image>"])
    with pytest.raises(ValueError, match=r"question 0 .*2 '<image>' tag\(s\) but 1 picture"):
        answer(bundle, [a], ["<image> and <image>"])
    with pytest.raises(ValueError, match="3 picture entries for 2 questions"):
        answer(bundle, [a, b, c], ["one", "two"])
    with pytest.raises(ValueError, match=r"question 1 .*special token"):
        answer(bundle, [a, b], ["fine", "a </s> b"])


def test_processor_call_checks_tags_against_pictures(bundle):
    proc = bundle.processor
    prompts = ["<s>user\n<image>\nq</s>\n<s>assistant\n", "<s>user\nno tag</s>\n<s>assistant\n"]
    with pytest.raises(ValueError, match=r"1 '<image>' tag\(s\).*2 picture"):
        proc(images=[picture(0), picture(1)], text=prompts)
    with pytest.raises(ValueError, match=r"prompt 1 has 0 '<image>' tag\(s\) but 1 picture"):
        proc(images=[[picture(0)], [picture(1)]], text=prompts)
    with pytest.raises(ValueError, match="URL"):
        proc(images=["https://example.com/a.png"], text=prompts[:1])
    with pytest.raises(ValueError, match="padding=True"):
        proc(text=prompts, return_tensors="pt")
    # No pictures: the placeholders stay (the text-only baseline), no pixel_values.
    out = proc(text=prompts)
    assert "pixel_values" not in out and out["input_ids"][0].count(proc.placeholder_ids[0]) == proc.num_image_tokens


def test_chat_template_blocks_and_tokenize(bundle):
    """transformers' content blocks render as the training data's '<image>\\n' tags, and
    tokenize=True gives what the two steps give."""
    proc = bundle.processor
    a, b = picture(20), picture(21)
    conversation = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "image", "image": a},
                                                 {"type": "text", "text": "What colour?"}]},
                    {"role": "assistant", "content": "red"},
                    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image", "image": b}]}]
    text = proc.apply_chat_template(conversation, add_generation_prompt=True)
    assert text == ("<s>system\nBe brief.</s>\n<s>user\n<image>\nWhat colour?</s>\n<s>assistant\nred</s>\n"
                    "<s>user\nAnd <image></s>\n<s>assistant\n")
    out = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    expected = proc(images=[a, b], text=[text], return_tensors="pt")
    assert torch.equal(out["input_ids"], expected["input_ids"])
    assert torch.equal(out["pixel_values"], expected["pixel_values"])
    with pytest.raises(ValueError, match="expected 'user'"):
        proc.apply_chat_template([{"role": "assistant", "content": "hi"}])


# ----------------------------------------------------------------------------- system turns


def test_encode_chat_passes_system_turns_through(world_tokenizer):
    tok = world_tokenizer
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    for system in ({"from": "system", "value": "Be brief."}, {"role": "system", "content": "Be brief."}):
        ids, labels = encode_chat(tok, [system] + turns, 5)
        plain_ids, plain_labels = encode_chat(tok, turns, 5)
        head = tok("<s>system\nBe brief.</s>\n", add_special_tokens=False).input_ids
        assert tok.decode(ids[:len(head)]) == "<s>system\nBe brief.</s>\n"
        assert labels[:len(head)] == [IGNORE_INDEX] * len(head)  # no loss on the system turn
        assert [l for l in labels if l != IGNORE_INDEX] == [l for l in plain_labels if l != IGNORE_INDEX]
        rendered = render_chat([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "<image>\nWhat colour?"},
                                {"role": "assistant", "content": "red"}])
        assert tok.decode(ids) == rendered.replace("<image>", IMAGE_TOKEN * 5)
        assert rendered == tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                    {"role": "user", "content": "<image>\nWhat colour?"},
                                                    {"role": "assistant", "content": "red"}], tokenize=False)
    # chat-format turns are the same turns
    assert encode_chat(tok, [{"role": "user", "content": "<image>\nWhat colour?"},
                             {"role": "assistant", "content": "red"}], 5) == encode_chat(tok, turns, 5)
    with pytest.raises(ValueError, match=r"turn 2 is from 'system', expected 'human'"):
        encode_chat(tok, turns + [{"from": "system", "value": "late"}], 5)
    with pytest.raises(ValueError, match="a system turn"):
        encode_chat(tok, [{"from": "system", "value": "<image>"}, {"from": "human", "value": "q"}], 5)
    # several pictures: num_images tags, each a placeholder, in order
    two = [{"from": "human", "value": "<image> or <image>?"}, {"from": "gpt", "value": "left"}]
    ids, _ = encode_chat(tok, two, 5, num_images=2)
    assert ids.count(tok.convert_tokens_to_ids(IMAGE_TOKEN)) == 10
    with pytest.raises(ValueError, match="2 '<image>' tags, expected exactly 1"):
        encode_chat(tok, two, 5)


# ----------------------------------------------------------------------------- saved folders and Auto classes


def test_auto_classes_round_trip_and_answer_as_the_direct_classes(new_folder, old_folder, bundle):
    files = sorted(p.name for p in new_folder.iterdir())
    assert PROCESSOR_CONFIG in files and "chat_template.jinja" in files
    assert not [f for f in files if f.endswith((".py", ".bin", ".pt", ".pth"))]  # no code, no pickle
    assert "auto_map" not in json.loads((new_folder / PROCESSOR_CONFIG).read_text())
    assert "auto_map" not in json.loads((new_folder / "config.json").read_text())

    assert type(AutoConfig.from_pretrained(new_folder)) is VLMConfig
    processor = AutoProcessor.from_pretrained(new_folder)
    assert type(processor) is MiniMindVProcessor and processor.num_image_tokens == bundle.processor.num_image_tokens
    assert processor.image_processor.to_dict() == bundle.encoder.processor.to_dict()
    assert processor.chat_template == CHAT_TEMPLATE
    for auto in (AutoModelForImageTextToText, AutoModelForCausalLM):
        assert type(auto.from_pretrained(new_folder)) is MiniMindVLM

    # Generation through the Auto classes (the encoder its config names is loaded on first use)
    # equals the direct classes' answers.
    model = AutoModelForImageTextToText.from_pretrained(new_folder).eval()
    pictures = [picture(30), picture(31)]
    questions = ["What colour is the circle?", "How many objects are there?"]
    prompts = processor.apply_chat_template([[{"role": "user", "content": "<image>\n" + q}] for q in questions],
                                            add_generation_prompt=True)
    inputs = processor(images=pictures, text=prompts, padding=True, padding_side="left", return_tensors="pt")
    tok = processor.tokenizer
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, suppress_tokens=suppressed_ids(tok))
    new_tokens = out[:, inputs["input_ids"].shape[1]:]
    auto_answers = [s.strip() for s in tok.batch_decode(new_tokens, skip_special_tokens=True)]
    assert auto_answers == old_answers(bundle, pictures, questions)
    for folder in (new_folder, old_folder):
        loaded = load_vlm(folder, device="cpu")
        assert answer(loaded, pictures, questions, max_new_tokens=10) == auto_answers


def test_an_old_folder_builds_its_processor(old_folder, new_folder, tiny_encoder, world_tokenizer):
    old = AutoProcessor.from_pretrained(old_folder)  # no processor_config.json: tokenizer + encoder named in config
    new = AutoProcessor.from_pretrained(new_folder)
    assert type(old) is MiniMindVProcessor and old.num_image_tokens == new.num_image_tokens == tiny_encoder.num_tokens
    assert old.image_processor.to_dict() == new.image_processor.to_dict()
    prompts = old.apply_chat_template([[{"role": "user", "content": "<image>\n" + q}] for q in QUESTIONS[2:4:2]] +
                                      [[{"role": "user", "content": QUESTIONS[3]}]], add_generation_prompt=True)
    a, b = old(images=[picture(0), picture(1)], text=prompts), new(images=[picture(0), picture(1)], text=prompts)
    assert a["input_ids"] == b["input_ids"] and torch.equal(a["pixel_values"], b["pixel_values"])
    with pytest.raises(FileNotFoundError, match="local model folder only"):
        MiniMindVProcessor.from_pretrained("someone/some-model")


def test_a_folder_keeps_its_chat_template(new_folder, tmp_path):
    folder = Path(shutil.copytree(new_folder, tmp_path / "v1"))
    processor = AutoProcessor.from_pretrained(folder)
    processor.chat_template = processor.tokenizer.chat_template = V1_TEMPLATE
    processor.save_pretrained(folder)
    for loaded in (load_tokenizer(folder), AutoProcessor.from_pretrained(folder), load_vlm(folder).processor):
        assert loaded.chat_template == V1_TEMPLATE
    # Rendered with the folder's template (v1 puts the system text bare in front).
    text = AutoProcessor.from_pretrained(folder).apply_chat_template(
        [{"role": "system", "content": "S."}, {"role": "user", "content": "q"}])
    assert text == "S.<s>user\nq</s>\n<s>assistant\n"
    assert load_tokenizer(folder, keep_chat_template=False).chat_template == CHAT_TEMPLATE


# ----------------------------------------------------------------------------- the config's debts


def test_config_names_attention_and_one_ignore_index(new_folder, monkeypatch):
    assert llm_module.IGNORE_INDEX is tokenizer_module.IGNORE_INDEX is IGNORE_INDEX == -100
    config = MiniMindConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) \
        == (64, 3, 4, 2)
    config.hidden_size = 96  # one field under two names: they cannot disagree
    assert config.dim == 96 and "hidden_size" not in config.to_dict()
    # An older config.json holds both spellings and "attention": read as before.
    old = MiniMindConfig(**{**config.to_dict(), "hidden_size": 96, "num_hidden_layers": 3, "attention": "eager"})
    assert (old.dim, old.n_layers, old._attn_implementation, old.attention) == (96, 3, "eager", "eager")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        MiniMindConfig(attn_implementation="flash_attention_2")

    # attn_implementation, as for any transformers model: the same logits, and the eager path really runs.
    sdpa = MiniMindVLM.from_pretrained(new_folder).eval()
    eager = MiniMindVLM.from_pretrained(new_folder, attn_implementation="eager").eval()
    assert (sdpa.config._attn_implementation, eager.config._attn_implementation) == ("sdpa", "eager")
    assert eager.uses_eager_attention and not sdpa.uses_eager_attention
    fused = torch.nn.functional.scaled_dot_product_attention
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        torch.testing.assert_close(eager(ids).logits, sdpa(ids).logits, atol=1e-5, rtol=1e-5)
        assert len(calls) == sdpa.config.n_layers  # only the sdpa model called the fused kernel
        sdpa.set_attn_implementation("eager")
        sdpa(ids)
    assert len(calls) == sdpa.config.n_layers
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        AutoModelForCausalLM.from_pretrained(new_folder, attn_implementation="flex_attention")
