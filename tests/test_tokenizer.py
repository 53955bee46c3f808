"""Tests for minimind_v.tokenizer: byte-level BPE, chat format, image placeholder, loss labels."""

import json
import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind_v.tokenizer import (
    CHAT_TEMPLATE,
    IGNORE_INDEX,
    IMAGE_TOKEN,
    encode_chat,
    has_image_token,
    image_placeholder,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "star"]
PLACES = ["left of", "right of", "above", "below"]
ZH_COLORS = ["红色", "绿色", "蓝色", "黄色"]
ZH_SHAPES = ["圆形", "方块", "三角形", "星星"]


def make_corpus(n: int, seed: int = 0) -> list[str]:
    """Short English and Chinese sentences about shapes, with some numbers and punctuation."""
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        if i % 3 == 2:
            texts.append(f"一个{rng.choice(ZH_COLORS)}的{rng.choice(ZH_SHAPES)}在{rng.choice(ZH_COLORS)}"
                         f"的{rng.choice(ZH_SHAPES)}旁边。")
        else:
            texts.append(f"The {rng.choice(COLORS)} {rng.choice(SHAPES)} is {rng.choice(PLACES)} the "
                         f"{rng.choice(COLORS)} {rng.choice(SHAPES)}. There are {rng.randint(1, 9)} shapes.")
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(make_corpus(1500), vocab_size=500)


# The v1 MiniMind chat template: the user block itself opens the assistant block.
ORIGINAL_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ system_message }}{% endif %}{% for message in messages %}"
    "{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<s>user\\n' + content + '</s>\\n<s>assistant\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ content + '</s>' + '\\n' }}{% endif %}{% endfor %}"
)


def make_original_style_folder(path, texts, vocab_size=500):
    """A folder shaped like the original MiniMind tokenizer: 3 specials, no image token."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    path.mkdir(parents=True, exist_ok=True)
    backend.save(str(path / "tokenizer.json"))
    special = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    config = {
        "add_bos_token": False, "add_eos_token": False, "add_prefix_space": False,
        "added_tokens_decoder": {str(i): {"content": t, **special} for i, t in enumerate(["<unk>", "<s>", "</s>"])},
        "additional_special_tokens": [], "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "legacy": True, "model_max_length": 32768, "pad_token": "<unk>",
        "sp_model_kwargs": {}, "spaces_between_special_tokens": False,
        "tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
        "chat_template": ORIGINAL_CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


ROUND_TRIP_TEXTS = [
    "The red circle is left of the blue square.",
    "一个红色的圆形在蓝色的方块旁边。",
    "emoji 😀🎉 and a flag 🇨🇳, accents: café, naïve",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\n\nnewlines\r\n and   runs of     spaces",
    "完全没见过的字：龘靐齉",
    "<image>\n<s>not a real turn</s> 3.14159 x=y+1",
    "",
    "\n",
]


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids or "<unk>" in text  # byte alphabet: never unknown


def test_special_tokens_have_fixed_ids(tokenizer):
    assert [tokenizer.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>", IMAGE_TOKEN]] == [0, 1, 2, 3]
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert tokenizer.pad_token_id == 0
    # Special tokens in text are single ids, never split into bytes.
    assert tokenizer("<s></s><|image|>", add_special_tokens=False).input_ids == [1, 2, 3]


def test_bpe_learns_merges_up_to_vocab_size(tokenizer):
    assert len(tokenizer) == 500
    words = tokenizer("The red circle", add_special_tokens=False).input_ids
    assert len(words) < len("The red circle")  # frequent words are merged into few tokens


def test_tiny_corpus_gives_smaller_vocab():
    tok = train_tokenizer(["abab abab", "abab"], vocab_size=6400, min_frequency=1)
    assert 4 + 256 < len(tok) < 6400  # specials + bytes + the few merges a tiny corpus has
    assert tok.decode(tok("abab 中文", add_special_tokens=False).input_ids) == "abab 中文"


def test_training_rejects_bad_input():
    with pytest.raises(ValueError, match=r"texts\[1\]"):
        train_tokenizer(["fine", 42])
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([])
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


# ----------------------------------------------------------------------------- chat format

TWO_TURNS = [
    {"role": "user", "content": "What is left of the square?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "颜色呢？"},
    {"role": "assistant", "content": "红色。"},
]
TWO_TURNS_TEXT = (
    "<s>user\nWhat is left of the square?</s>\n<s>assistant\nA red circle.</s>\n"
    "<s>user\n颜色呢？</s>\n<s>assistant\n红色。</s>\n"
)


def test_chat_template_renders_the_minimind_format(tokenizer):
    assert tokenizer.apply_chat_template(TWO_TURNS, tokenize=False) == TWO_TURNS_TEXT
    prompt = TWO_TURNS[:3]
    expected = "<s>user\nWhat is left of the square?</s>\n<s>assistant\nA red circle.</s>\n<s>user\n颜色呢？</s>\n<s>assistant\n"
    assert tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == expected
    with_system = [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:2]
    assert tokenizer.apply_chat_template(with_system, tokenize=False) == (
        "<s>system\nBe brief.</s>\n<s>user\nWhat is left of the square?</s>\n<s>assistant\nA red circle.</s>\n")


@pytest.mark.parametrize("messages", [TWO_TURNS, TWO_TURNS[:1], TWO_TURNS[:3],
                                      [{"role": "system", "content": "Be brief."}] + TWO_TURNS])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_equals_jinja_template(tokenizer, messages, add_generation_prompt):
    rendered = render_chat(messages, add_generation_prompt=add_generation_prompt)
    assert rendered == tokenizer.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt)


def test_render_chat_rejects_unknown_roles(tokenizer):
    with pytest.raises(ValueError, match="role"):
        render_chat([{"role": "robot", "content": "hi"}])
    with pytest.raises(Exception, match="robot"):
        tokenizer.apply_chat_template([{"role": "robot", "content": "hi"}], tokenize=False)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip_gives_identical_ids(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == len(tokenizer)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 0)
    assert loaded.model_max_length == tokenizer.model_max_length
    for text in ROUND_TRIP_TEXTS + [TWO_TURNS_TEXT]:
        assert loaded(text).input_ids == tokenizer(text).input_ids
    assert image_placeholder(loaded, 50) == image_placeholder(tokenizer, 50)


def test_train_tokenizer_writes_out_dir(tmp_path):
    train_tokenizer(make_corpus(200), out_dir=tmp_path / "tok", vocab_size=400)
    loaded = load_tokenizer(tmp_path / "tok")
    assert has_image_token(loaded)
    assert loaded.convert_tokens_to_ids(IMAGE_TOKEN) == 3


def test_original_style_folder_loads_and_falls_back_to_angle_brackets(tmp_path):
    folder = make_original_style_folder(tmp_path / "original", make_corpus(600))
    original = load_tokenizer(folder)
    assert not has_image_token(original)
    assert [original.convert_tokens_to_ids(t) for t in ["<unk>", "<s>", "</s>"]] == [0, 1, 2]
    assert original.pad_token_id == 0
    text, ids = image_placeholder(original, 50)
    assert text == "<" * 25 + ">" * 25
    assert len(ids) == 50
    assert set(ids) == {original.convert_tokens_to_ids("<"), original.convert_tokens_to_ids(">")}
    # A folder keeps its own template (keep_chat_template=False puts the book's in its place).
    assert original.apply_chat_template(TWO_TURNS, tokenize=False) == TWO_TURNS_TEXT
    kept = load_tokenizer(folder, keep_chat_template=True)
    assert kept.chat_template == original.chat_template == ORIGINAL_CHAT_TEMPLATE
    assert load_tokenizer(folder, keep_chat_template=False).chat_template == CHAT_TEMPLATE
    # The v1 template gives the same string for alternating user/assistant turns.
    assert kept.apply_chat_template(TWO_TURNS, tokenize=False) == TWO_TURNS_TEXT


def test_fallback_placeholder_refuses_a_bpe_that_merges_brackets(tmp_path):
    folder = make_original_style_folder(tmp_path / "merges", ["<<<< >>>> <<>>"] * 200 + make_corpus(100))
    with pytest.raises(ValueError, match="encodes to"):
        image_placeholder(load_tokenizer(folder), 50)


def test_load_rejects_folder_without_chat_tokens(tmp_path):
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.train_from_iterator(["plain text"], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                                   show_progress=False))
    (tmp_path / "plain").mkdir()
    backend.save(str(tmp_path / "plain" / "tokenizer.json"))
    with pytest.raises(ValueError, match="<s>"):
        load_tokenizer(tmp_path / "plain")
    with pytest.raises(ValueError, match="no_such_folder"):
        load_tokenizer(tmp_path / "no_such_folder")


# ----------------------------------------------------------------------------- image placeholder


def test_image_placeholder_with_image_token(tokenizer):
    text, ids = image_placeholder(tokenizer, 50)
    assert text == IMAGE_TOKEN * 50
    assert ids == [3] * 50
    assert tokenizer(text, add_special_tokens=False).input_ids == ids


# ----------------------------------------------------------------------------- encode_chat

SEED_RECORD = [
    {"from": "human", "value": "<image>\nWhat is left of the square?"},
    {"from": "gpt", "value": "A red circle."},
    {"from": "human", "value": "颜色呢？"},
    {"from": "gpt", "value": "红色，很亮 😀。"},
]


def labelled_runs(input_ids, labels):
    """Contiguous runs of trained tokens, as lists of ids."""
    runs, current = [], []
    for token, label in zip(input_ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


@pytest.mark.parametrize("make_tokenizer", ["ours", "original"])
def test_encode_chat_labels_exactly_the_answers(tokenizer, tmp_path, make_tokenizer):
    tok = tokenizer if make_tokenizer == "ours" else load_tokenizer(
        make_original_style_folder(tmp_path / "original", make_corpus(600)))
    input_ids, labels = encode_chat(tok, SEED_RECORD, num_image_tokens=50, record_id="r1")
    assert len(input_ids) == len(labels)
    answers = [SEED_RECORD[1]["value"] + "</s>", SEED_RECORD[3]["value"] + "</s>"]
    assert [tok.decode(run) for run in labelled_runs(input_ids, labels)] == answers

    # Independent truth: tokenizing the whole rendered chat gives the same ids, and the
    # tokens whose character span lies inside an answer are exactly the labelled ones.
    placeholder_text, placeholder_ids = image_placeholder(tok, 50)
    messages = [{"role": "user", "content": SEED_RECORD[0]["value"].replace("<image>", placeholder_text)},
                {"role": "assistant", "content": SEED_RECORD[1]["value"]},
                {"role": "user", "content": SEED_RECORD[2]["value"]},
                {"role": "assistant", "content": SEED_RECORD[3]["value"]}]
    rendered = render_chat(messages)
    whole = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    assert whole.input_ids == input_ids
    spans, cursor = [], 0
    for answer in answers:
        start = rendered.index("<s>assistant\n" + answer, cursor) + len("<s>assistant\n")
        spans.append((start, start + len(answer)))
        cursor = start + len(answer)
    inside = [any(s <= a and b <= e for s, e in spans) for a, b in whole.offset_mapping]
    assert inside == [label != IGNORE_INDEX for label in labels]

    # The image occupies exactly num_image_tokens placeholder ids, all unlabelled.
    start = next(i for i in range(len(input_ids)) if input_ids[i:i + 50] == placeholder_ids)
    assert all(label == IGNORE_INDEX for label in labels[start:start + 50])
    assert "What is left" in tok.decode(input_ids[:start + 60])


def test_encode_chat_answer_boundary_matches_generation(tokenizer):
    # An answer starting with spaces: the prompt's "\n" stays its own token, as at generation time.
    record = [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "   spaced answer"}]
    input_ids, labels = encode_chat(tokenizer, record, 4)
    assert [tokenizer.decode(run) for run in labelled_runs(input_ids, labels)] == ["   spaced answer</s>"]
    prompt_ids, prompt_labels = encode_chat(tokenizer, record[:1], 4, add_generation_prompt=True)
    assert input_ids[:len(prompt_ids)] == prompt_ids
    assert set(prompt_labels) == {IGNORE_INDEX}
    assert tokenizer.decode(prompt_ids) == render_chat(
        [{"role": "user", "content": IMAGE_TOKEN * 4 + "\nq"}], add_generation_prompt=True)


def test_encode_chat_text_only(tokenizer):
    input_ids, labels = encode_chat(tokenizer, SEED_RECORD[2:], num_image_tokens=0)
    assert tokenizer.decode(input_ids) == "<s>user\n颜色呢？</s>\n<s>assistant\n红色，很亮 😀。</s>\n"
    assert [tokenizer.decode(r) for r in labelled_runs(input_ids, labels)] == ["红色，很亮 😀。</s>"]


@pytest.mark.parametrize("conversations, match", [
    ([{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "a"}], "0 '<image>' tags"),
    ([{"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "a"}], "2 '<image>' tags"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"},
      {"from": "human", "value": "<image> again"}, {"from": "gpt", "value": "b"}], "2 '<image>' tags"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image>"}], "an answer"),
    ([{"from": "gpt", "value": "a"}, {"from": "human", "value": "<image>"}], "expected 'human'"),
    ([{"from": "human", "value": "<image>"}, {"from": "human", "value": "q"}], "expected 'gpt'"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": None}], "must be str"),
    ([{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a </s> b"}], "special token"),
    ([], "non-empty"),
])
def test_encode_chat_rejects_bad_records(tokenizer, conversations, match):
    with pytest.raises(ValueError, match=match) as info:
        encode_chat(tokenizer, conversations, num_image_tokens=50, record_id="000123")
    assert "000123" in str(info.value)


def test_encode_chat_text_only_rejects_image_tag(tokenizer):
    with pytest.raises(ValueError, match="text-only"):
        encode_chat(tokenizer, SEED_RECORD, num_image_tokens=0)


def test_the_world_tokenizer_spells_each_chat_role_in_one_token(world_tokenizer):
    # Trained on the world's turns behind their role names (recipe.world_texts), the BPE has
    # learned "user" and "assistant" whole; every turn of every sample carries one of them.
    chat = render_chat([{"role": "user", "content": "What colour is the circle?"},
                        {"role": "assistant", "content": "red"}])
    pieces = world_tokenizer.convert_ids_to_tokens(world_tokenizer(chat, add_special_tokens=False).input_ids)
    assert pieces[:3] == ["<s>", "user", "Ċ"], pieces  # Ċ: how byte-level BPE writes "\n"
    assert pieces[-6:] == ["<s>", "assistant", "Ċ", "red", "</s>", "Ċ"], pieces
