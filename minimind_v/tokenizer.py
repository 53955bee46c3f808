"""The tokenizer: a byte-level BPE, the MiniMind chat format, and the image placeholder.

Text becomes ids in three layers:

1. a byte-level BPE (HuggingFace ``tokenizers``): every string is first turned into bytes, so
   any text -- English, Chinese, emoji, runs of spaces -- encodes and decodes back exactly;
2. the chat format of MiniMind, one block per message::

       <s>user\n{question}</s>\n<s>assistant\n{answer}</s>\n

3. the image: the prompt's ``<image>`` tag becomes ``num_tokens`` placeholder tokens whose
   embeddings the model later replaces by the projected image patches.

Special tokens and their ids (the first three as in the original MiniMind tokenizer)::

    <unk> = 0   <s> = 1   </s> = 2   <|image|> = 3   (the last one only in tokenizers trained here)

The original MiniMind-V tokenizer has no image token; with it the placeholder falls back to the
v1 convention, the string ``'<' * 25 + '>' * 25`` (50 ordinary tokens).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable, Sequence

from tqdm.auto import tqdm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from .config import IGNORE_INDEX  # the label of tokens that carry no loss (-100), defined once

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<|image|>"
# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <|image|>=3.
SPECIAL_TOKENS = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN)

IMAGE_TAG = "<image>"  # how the dataset marks the image inside a prompt

# The tokenizer's own length limit only drives truncation warnings; the model's context length
# lives in the model config. 32768 is what the original MiniMind tokenizer declares.
DEFAULT_MODEL_MAX_LENGTH = 32768

CHAT_ROLES = ("system", "user", "assistant")
SEED_ROLES = {"human": "user", "gpt": "assistant"}  # the dataset's "from" -> chat role
SEED_NAMES = {"user": "human", "assistant": "gpt", "system": "system"}  # chat role -> the dataset's "from"

# The same format as render_chat(), for tokenizer.apply_chat_template().
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('chat role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)

_BYTE_ALPHABET_SIZE = 256


# ----------------------------------------------------------------------------- training


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path | None = None,
    vocab_size: int = 6400,
    min_frequency: int = 2,
    model_max_length: int = DEFAULT_MODEL_MAX_LENGTH,
    progress: bool = False,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a transformers tokenizer.

    The vocabulary holds the 4 special tokens, the 256 byte symbols, then learned merges until
    `vocab_size` is reached -- or fewer when a small corpus runs out of pairs seen at least
    `min_frequency` times; `len(tokenizer)` tells the actual size. Saved to `out_dir` if given.
    """
    smallest = len(SPECIAL_TOKENS) + _BYTE_ALPHABET_SIZE
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(f"vocab_size must be an int >= {smallest} (4 special tokens + 256 bytes), got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 0:
        raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")

    backend = Tokenizer(models.BPE())
    # add_prefix_space=False: a text's first word is not given a leading space, so decode(encode(x)) == x.
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 byte symbols from the start: no text can ever fall back to <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    counted = {"texts": 0}

    def checked_texts():
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise ValueError(f"texts[{i}] is {type(text).__name__}, expected str")
            counted["texts"] += 1
            yield text

    stream = checked_texts()
    if progress:
        total = len(texts) if hasattr(texts, "__len__") else None
        stream = tqdm(stream, total=total, desc="reading texts for BPE", unit="text")
    start = time.perf_counter()
    backend.train_from_iterator(stream, trainer=trainer)
    seconds = time.perf_counter() - start
    if counted["texts"] == 0:
        raise ValueError("texts is empty: the tokenizer needs at least one training text")

    for expected_id, token in enumerate(SPECIAL_TOKENS):  # guards the ids the model relies on
        assert backend.token_to_id(token) == expected_id, (token, backend.token_to_id(token))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        # Padding is <unk> (id 0) as in the original: padded positions get label IGNORE_INDEX,
        # so the id never matters for the loss, and keeping it apart from </s> means no
        # "mask the pad id" shortcut can ever hide the real end-of-answer token.
        pad_token=UNK_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,  # keep decode exact
        chat_template=CHAT_TEMPLATE,
    )
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    if progress:
        saved = f", saved to {out_dir}" if out_dir is not None else ""
        print(f"byte-level BPE: vocab {len(tokenizer)} (asked {vocab_size}) from {counted['texts']} texts "
              f"in {seconds:.1f}s{saved}")
    return tokenizer


# ----------------------------------------------------------------------------- loading


def load_tokenizer(path_or_name: str | Path, keep_chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Load a tokenizer folder (ours, or the original MiniMind one) or a hub name.

    The folder's chat template is kept: a saved model renders its prompts with the template it
    was saved with. A folder without one gets this module's CHAT_TEMPLATE (the format
    `encode_chat` trains on); so does every folder with ``keep_chat_template=False``.
    A missing pad token becomes <unk> (or </s> where there is no <unk>).
    """
    from .model.folders import load_hub_id, looks_like_local_path

    source = str(path_or_name)
    try:
        if Path(source).expanduser().is_dir():
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(Path(source).expanduser()), local_files_only=True)
        elif Path(source).exists():
            raise FileNotFoundError(f"{source} is a file, not a tokenizer folder")
        elif looks_like_local_path(source):
            raise FileNotFoundError(f"no tokenizer folder at {source}")
        else:  # a hub name: from the cache, or from the hub only when it answers (no long retries)
            tokenizer = load_hub_id(source, lambda **hub: PreTrainedTokenizerFast.from_pretrained(source, **hub),
                                    "tokenizer")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {source!r}: {err}") from err

    vocab = tokenizer.get_vocab()
    missing = [token for token in (BOS_TOKEN, EOS_TOKEN) if token not in vocab]
    if missing:
        raise ValueError(f"tokenizer {str(path_or_name)!r} lacks {missing}: the MiniMind chat format needs "
                         f"{BOS_TOKEN} and {EOS_TOKEN} as single tokens")
    if tokenizer.bos_token is None:
        tokenizer.bos_token = BOS_TOKEN
    if tokenizer.eos_token is None:
        tokenizer.eos_token = EOS_TOKEN
    if tokenizer.pad_token is None:
        tokenizer.pad_token = UNK_TOKEN if UNK_TOKEN in vocab else EOS_TOKEN
    if tokenizer.model_max_length > 10 * DEFAULT_MODEL_MAX_LENGTH:  # transformers' "unset" sentinel is ~1e30
        tokenizer.model_max_length = DEFAULT_MODEL_MAX_LENGTH
    if not keep_chat_template or not tokenizer.chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def has_image_token(tokenizer: PreTrainedTokenizerFast) -> bool:
    """True for tokenizers trained here (with <|image|>), False for the original MiniMind one."""
    return IMAGE_TOKEN in tokenizer.get_added_vocab()


# ----------------------------------------------------------------------------- chat format


def _where(record_id) -> str:
    return "" if record_id is None else f"record {record_id!r}: "


def _chat_pieces(messages: Sequence[dict], add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """The chat string cut into (text, is_answer) pieces; answers include their closing </s>.

    The "\\n" after an answer's </s> is not part of the answer: generation stops at </s>, so the
    model never has to predict what follows it.
    """
    pieces = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {message!r}")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise ValueError(f"messages[{i}]['role'] must be one of {CHAT_ROLES}, got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]['content'] must be str, got {type(content).__name__}")
        pieces.append((f"{BOS_TOKEN}{role}\n", False))
        if role == "assistant":
            pieces.append((content + EOS_TOKEN, True))
            pieces.append(("\n", False))
        else:
            pieces.append((content + EOS_TOKEN + "\n", False))
    if add_generation_prompt:
        pieces.append((f"{BOS_TOKEN}assistant\n", False))
    return pieces


def render_chat(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The chat string for [{"role", "content"}, ...]; equal to apply_chat_template(tokenize=False)."""
    return "".join(text for text, _ in _chat_pieces(messages, add_generation_prompt))


def conversations_to_messages(conversations: Sequence[dict], record_id=None) -> list[dict]:
    """Turns -> chat messages [{"role", "content"}, ...].

    A turn is seed-format ``{"from": "human"|"gpt"|"system", "value": str}`` or chat-format
    ``{"role": "user"|"assistant"|"system", "content": str}`` (the two may mix). System turns
    may come first; then turns alternate human, gpt, human, ... starting with human.
    """
    where = _where(record_id)
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError(f"{where}conversations must be a non-empty list of turns, got {conversations!r}")
    messages = []
    for i, turn in enumerate(conversations):
        if isinstance(turn, dict) and "from" in turn and "value" in turn:
            speaker, value, seed = turn["from"], turn["value"], True
            role = {**SEED_ROLES, "system": "system"}.get(speaker) if isinstance(speaker, str) else None
        elif isinstance(turn, dict) and "role" in turn and "content" in turn:
            speaker, value, seed = turn["role"], turn["content"], False
            role = speaker if speaker in CHAT_ROLES else None
        else:
            raise ValueError(f"{where}turn {i} must be a dict with 'from' and 'value' (or 'role' and 'content'), "
                             f"got {turn!r}")
        in_system_block = all(m["role"] == "system" for m in messages)
        if not (role == "system" and in_system_block):
            answered = sum(m["role"] != "system" for m in messages)
            expected = "user" if answered % 2 == 0 else "assistant"
            if role != expected:
                name = SEED_NAMES[expected] if seed else expected
                order = "human, gpt" if seed else "user, assistant"
                raise ValueError(f"{where}turn {i} is from {speaker!r}, expected {name!r} (turns must alternate "
                                 f"{order}, ..., after any system turns)")
        if not isinstance(value, str):
            raise ValueError(f"{where}turn {i} {'value' if seed else 'content'} must be str, "
                             f"got {type(value).__name__}")
        messages.append({"role": role, "content": value})
    return messages


# ----------------------------------------------------------------------------- image placeholder


def image_placeholder(tokenizer: PreTrainedTokenizerFast, num_tokens: int) -> tuple[str, list[int]]:
    """The text that stands for one image, and its `num_tokens` ids.

    With <|image|>: that token repeated. Without it (the original tokenizer): the v1 string
    '<' * (n // 2) + '>' * (n - n // 2), which must tokenize to exactly n ids.
    """
    if not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if has_image_token(tokenizer):
        return IMAGE_TOKEN * num_tokens, [tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)] * num_tokens
    text = "<" * (num_tokens // 2) + ">" * (num_tokens - num_tokens // 2)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != num_tokens:
        raise ValueError(f"this tokenizer has no {IMAGE_TOKEN} token and the fallback placeholder "
                         f"'<'*{num_tokens // 2} + '>'*{num_tokens - num_tokens // 2} encodes to {len(ids)} ids, "
                         f"not {num_tokens} (its BPE merges '<' or '>'); use a tokenizer with {IMAGE_TOKEN}")
    return text, ids


# ----------------------------------------------------------------------------- encoding


def encode_chat(
    tokenizer: PreTrainedTokenizerFast,
    conversations: Sequence[dict],
    num_image_tokens: int,
    record_id=None,
    add_generation_prompt: bool = False,
    num_images: int = 1,
) -> tuple[list[int], list[int]]:
    """Turns (see :func:`conversations_to_messages`) -> (input_ids, labels), both as long as the
    rendered chat.

    labels[i] == input_ids[i] on assistant answer tokens (answer text + its </s>) and
    IGNORE_INDEX elsewhere (system turns, headers, questions, image placeholders, the "\\n"
    between blocks); the model shifts them by one itself. The conversation holds exactly
    ``num_images`` <image> tags (one picture each, in order), in human turns; each becomes
    `num_image_tokens` placeholder ids. num_image_tokens=0 encodes a text-only chat (no tag
    allowed). add_generation_prompt=True appends "<s>assistant\\n" to build an inference prompt
    with the same ids training saw.

    Each answer is tokenized as its own piece, and so is each placeholder. That fixes the answer
    boundaries exactly (no token straddles question and answer) and matches generation, where the
    prompt ends at "assistant\\n" and the model starts a fresh token. For ordinary text the ids
    equal tokenizing render_chat(...) as a whole.
    """
    where = _where(record_id)
    messages = conversations_to_messages(conversations, record_id)
    if not isinstance(num_image_tokens, int) or num_image_tokens < 0:
        raise ValueError(f"{where}num_image_tokens must be a non-negative int, got {num_image_tokens!r}")
    if not isinstance(num_images, int) or num_images < 0:
        raise ValueError(f"{where}num_images must be a non-negative int, got {num_images!r}")

    special_strings = [t for t in tokenizer.all_special_tokens if t]
    for i, message in enumerate(messages):
        clashes = [t for t in special_strings if t in message["content"]]
        if clashes:  # they would be read as control tokens and break the chat structure
            raise ValueError(f"{where}turn {i} contains the special token text {clashes}")

    tag_turns = [i for i, m in enumerate(messages) if IMAGE_TAG in m["content"]]
    if num_image_tokens == 0:
        if tag_turns:
            raise ValueError(f"{where}num_image_tokens=0 (text-only) but turn {tag_turns[0]} has an {IMAGE_TAG!r} tag")
    else:
        total = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if total != num_images:
            raise ValueError(f"{where}conversation has {total} {IMAGE_TAG!r} tags, expected exactly {num_images}")
        for i in tag_turns:
            if messages[i]["role"] != "user":
                what = "an answer" if messages[i]["role"] == "assistant" else "a system turn"
                raise ValueError(f"{where}the {IMAGE_TAG!r} tag is in turn {i}, {what}; it belongs in a human turn")
        if tag_turns:
            placeholder_text, placeholder_ids = image_placeholder(tokenizer, num_image_tokens)

    # Cut the chat into pieces of kind "text" | "image" | "answer"; adjacent text pieces merge so
    # the prompt is tokenized as one string, as apply_chat_template + tokenizer would.
    pieces: list[list] = []

    def add(text: str, kind: str) -> None:
        if kind == "text" and pieces and pieces[-1][1] == "text":
            pieces[-1][0] += text
        elif text:
            pieces.append([text, kind])

    for text, is_answer in _chat_pieces(messages, add_generation_prompt):
        if is_answer:
            add(text, "answer")
        elif num_image_tokens and IMAGE_TAG in text:
            first, *rest = text.split(IMAGE_TAG)
            add(first, "text")
            for after in rest:
                add(placeholder_text, "image")
                add(after, "text")
        else:
            add(text, "text")

    to_encode = [text for text, kind in pieces if kind != "image"]
    encoded = iter(tokenizer(to_encode, add_special_tokens=False).input_ids if to_encode else [])  # one batched call
    input_ids: list[int] = []
    labels: list[int] = []
    for text, kind in pieces:
        ids = placeholder_ids if kind == "image" else next(encoded)
        input_ids.extend(ids)
        labels.extend(ids if kind == "answer" else [IGNORE_INDEX] * len(ids))
    return input_ids, labels
