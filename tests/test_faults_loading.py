"""Faults on the way in: folders of the wrong kind, damaged or half-written folders, pickles that
would run code, prompts at the model's maximum length, garbage checkpoint files, hub ids offline.

Every case must end in a clear error naming what was wrong and where (or, for the maximum
length, in an answer that stops at the limit), and no loading path may unpickle code.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import huggingface_hub
import pytest
import torch

from minimind_v import chat
from minimind_v.config import MiniMindConfig
from minimind_v.convert import load_v1_state_dict
from minimind_v.convert import main as convert_main
from minimind_v.inference import LoadedVLM, answer, load_vlm
from minimind_v.model.folders import HubUnreachableError, IncompleteModelWarning, ModelFolderError
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.model.vision import VisionEncoder, VisionModelNotFoundError
from minimind_v.model.processing import MiniMindVProcessor
from minimind_v.model.vlm import MiniMindVLM
from minimind_v.runfiles import mark_complete
from minimind_v.tokenizer import load_tokenizer

QUESTION = "What colour is the circle?"


# ----------------------------------------------------------------------------- folders


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory, make_tiny_vlm, world_tokenizer, tiny_clip_dir) -> Path:
    """A good MiniMind-V folder: weights, tokenizer and its encoder inside (tiny_clip/)."""
    folder = tmp_path_factory.mktemp("faults") / "vlm"
    make_tiny_vlm().save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    shutil.copytree(tiny_clip_dir, folder / "tiny_clip")
    return folder


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory, world_tokenizer) -> Path:
    """A MiniMind text LM folder (what train.llm writes): no projection, model_type minimind."""
    folder = tmp_path_factory.mktemp("faults") / "llm"
    MiniMindForCausalLM(MiniMindConfig(vocab_size=len(world_tokenizer), dim=32, n_layers=1, n_heads=4,
                                       n_kv_heads=2, max_position_embeddings=128)).save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image(tiny_world) -> Path:
    return sorted((tiny_world / "eval_images").glob("*.png"))[0]


def copy_of(folder: Path, tmp_path: Path, name: str = "copy") -> Path:
    return Path(shutil.copytree(folder, tmp_path / name))


def evil_pickle(path: Path, marker: Path, torch_format: bool = True) -> Path:
    """A checkpoint whose unpickling creates ``marker`` (``open(marker, "w")`` via __reduce__):
    what a malicious pytorch_model.bin or .pth does, without harming anything."""

    class Payload:
        def __reduce__(self):
            return open, (str(marker), "w")

    state = {"tok_embeddings.weight": Payload()}
    if torch_format:
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state))
    return path


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "raw-pickle"])
def test_the_evil_pickle_really_runs_code_when_unpickled_unsafely(tmp_path, torch_format):
    """The control for every pickle test below: an unsafe load does create the marker."""
    marker = tmp_path / "marker"
    path = evil_pickle(tmp_path / "evil.pth", marker, torch_format)
    try:
        torch.load(path, weights_only=False)
    except RuntimeError:  # the raw pickle: torch reads it as its legacy magic number, running it first
        pass
    assert marker.exists()


def test_a_good_folder_loads_and_answers(vlm_folder, image):
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteModelWarning)  # no checkpoint.pt: nothing to warn about
        bundle = load_vlm(vlm_folder, device="cpu")
    (reply,) = answer(bundle, [image], [QUESTION], max_new_tokens=3)
    assert isinstance(reply, str)


# ----------------------------------------------------------------------------- folders of the wrong kind


def bad_folder(kind: str, vlm_folder: Path, lm_folder: Path, tiny_clip_dir: Path, tmp_path: Path) -> Path:
    if kind == "text-lm":
        return lm_folder
    if kind == "clip":
        return tiny_clip_dir
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "garbage-config":
        (folder / "config.json").write_bytes(b"\x00\xffnot json{")
    elif kind == "config-not-an-object":
        (folder / "config.json").write_text("[1, 2, 3]")
    elif kind == "checkpoint-only":
        (folder / "checkpoint.pt").write_bytes(b"never read")
    return folder


BAD_FOLDERS = {
    "text-lm": (ModelFolderError, r"is a MiniMind text LM folder, not a MiniMind-V folder: train the VLM stages first"),
    "clip": (ModelFolderError, r"is a CLIP folder \(a vision encoder\), not a MiniMind-V folder"),
    "empty": (FileNotFoundError, r"is not a saved MiniMind-V folder \(no config\.json\)"),
    "garbage-config": (ModelFolderError, r"config\.json is not readable JSON"),
    "config-not-an-object": (ModelFolderError, r"config\.json holds a JSON list"),
    "checkpoint-only": (FileNotFoundError, r"no config\.json\) \(it holds checkpoint\.pt: training started but never saved"),
}


@pytest.mark.parametrize("kind", list(BAD_FOLDERS))
def test_load_vlm_says_what_a_wrong_folder_is(kind, vlm_folder, lm_folder, tiny_clip_dir, tmp_path):
    folder = bad_folder(kind, vlm_folder, lm_folder, tiny_clip_dir, tmp_path)
    error, message = BAD_FOLDERS[kind]
    started = time.monotonic()
    with pytest.raises(error, match=message) as info:
        load_vlm(folder, device="cpu")
    assert str(folder) in str(info.value)
    assert time.monotonic() - started < 5  # decided from config.json, no hub, no waiting


@pytest.mark.parametrize("kind", ["text-lm", "clip", "garbage-config"])
def test_chat_says_what_a_wrong_folder_is(kind, vlm_folder, lm_folder, tiny_clip_dir, tmp_path, image, capsys):
    folder = bad_folder(kind, vlm_folder, lm_folder, tiny_clip_dir, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        chat.main(["--model", str(folder), "--image", str(image), "--device", "cpu", QUESTION])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.startswith("error: ") and str(folder) in err and "Traceback" not in err


def test_a_missing_folder_or_a_name_is_not_sent_to_the_hub(tmp_path):
    for name in (str(tmp_path / "nowhere"), "someone/some-vlm"):
        started = time.monotonic()
        with pytest.raises(FileNotFoundError, match="no MiniMind-V folder at"):
            load_vlm(name, device="cpu")
        assert time.monotonic() - started < 2


def test_the_decoder_classes_check_the_folder_kind_too(vlm_folder, lm_folder):
    with pytest.raises(ModelFolderError, match="is a MiniMind text LM folder, not a MiniMind-V folder"):
        MiniMindVLM.from_pretrained(lm_folder)
    with pytest.raises(ModelFolderError, match="is a MiniMind-V folder, not a MiniMind text LM folder: load it with"):
        MiniMindForCausalLM.from_pretrained(vlm_folder)
    assert isinstance(MiniMindForCausalLM.from_pretrained(lm_folder), MiniMindForCausalLM)


def test_a_half_trained_folder_warns_or_is_refused(vlm_folder, tmp_path):
    folder = copy_of(vlm_folder, tmp_path)
    (folder / "checkpoint.pt").write_bytes(b"never read")  # training saved, then was killed
    with pytest.warns(IncompleteModelWarning, match=r"holds checkpoint\.pt but no complete\.json: its training never finished"):
        load_vlm(folder, device="cpu")
    with pytest.raises(ModelFolderError, match=r"training never finished .*--resume"):
        load_vlm(folder, device="cpu", require_complete=True)
    mark_complete(folder)  # the trainer's last word: now it is a finished folder
    with warnings.catch_warnings():
        warnings.simplefilter("error", IncompleteModelWarning)
        load_vlm(folder, device="cpu", require_complete=True)


# ----------------------------------------------------------------------------- pickles never run


def test_a_model_folder_with_only_a_pickle_is_refused(vlm_folder, lm_folder, tmp_path):
    marker = tmp_path / "marker"
    for cls, source in ((MiniMindVLM, vlm_folder), (MiniMindForCausalLM, lm_folder)):
        folder = copy_of(source, tmp_path, cls.__name__)
        (folder / "model.safetensors").unlink()
        evil_pickle(folder / "pytorch_model.bin", marker)
        with pytest.raises(ValueError, match=r"holds pytorch_model\.bin and no model\.safetensors: .*can run code"):
            cls.from_pretrained(folder)
        if cls is MiniMindVLM:
            with pytest.raises(ValueError, match=rf"{folder} holds pytorch_model\.bin"):
                load_vlm(folder, device="cpu")
    assert not marker.exists()


def test_a_pickle_beside_the_safetensors_is_never_read(vlm_folder, tmp_path, image):
    marker = tmp_path / "marker"
    folder = copy_of(vlm_folder, tmp_path)
    evil_pickle(folder / "pytorch_model.bin", marker)
    evil_pickle(folder / "tiny_clip" / "pytorch_model.bin", marker)
    bundle = load_vlm(folder, device="cpu")
    answer(bundle, [image], [QUESTION], max_new_tokens=2)
    assert not marker.exists()


def test_a_vision_folder_with_only_a_pickle_is_refused(vlm_folder, tiny_clip_dir, tmp_path):
    marker = tmp_path / "marker"
    clip = copy_of(tiny_clip_dir, tmp_path, "clip")
    (clip / "model.safetensors").unlink()
    evil_pickle(clip / "pytorch_model.bin", marker)
    with pytest.raises(ValueError, match=rf"{clip} holds pytorch_model\.bin and no model\.safetensors"):
        VisionEncoder.from_pretrained(clip)
    # The same encoder inside a VLM folder, reached through load_vlm.
    folder = copy_of(vlm_folder, tmp_path, "vlm")
    shutil.rmtree(folder / "tiny_clip")
    shutil.copytree(clip, folder / "tiny_clip")
    with pytest.raises(ValueError, match=r"tiny_clip holds pytorch_model\.bin"):
        load_vlm(folder, device="cpu")
    assert not marker.exists()


@pytest.mark.parametrize("torch_format", [True, False], ids=["torch.save", "raw-pickle"])
def test_convert_never_runs_a_pickle(torch_format, tmp_path, world_tokenizer_dir, capsys):
    marker = tmp_path / "marker"
    pth = evil_pickle(tmp_path / "512_vlm_sft.pth", marker, torch_format)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["to-hf", "--pth", str(pth), "--tokenizer", str(world_tokenizer_dir), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert f"{pth} is not a plain state dict" in err
    assert re.search(r"torch.load\(weights_only=True\) refused it, so nothing in it was run \(Unsupported \w+", err)
    assert "allowlist" not in err  # torch's advice to trust the file is not passed on
    # A v1 transformers folder whose weights are that pickle: the same refusal.
    folder = tmp_path / "v1_folder"
    folder.mkdir()
    evil_pickle(folder / "pytorch_model.bin", marker, torch_format)
    with pytest.raises(ValueError, match=r"pytorch_model\.bin is not a plain state dict"):
        load_v1_state_dict(folder)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_convert_to_v1_refuses_a_pickled_folder(lm_folder, tmp_path, capsys):
    marker = tmp_path / "marker"
    folder = copy_of(lm_folder, tmp_path)
    (folder / "model.safetensors").unlink()
    evil_pickle(folder / "pytorch_model.bin", marker)
    with pytest.raises(SystemExit) as exit_info:
        convert_main(["to-v1", "--model", str(folder), "--out", str(tmp_path / "back.pth")])
    assert exit_info.value.code == 1
    assert "pytorch_model.bin and no model.safetensors" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "back.pth").exists()


# ----------------------------------------------------------------------------- garbage checkpoints


def garbage_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pth"
    torch.save({"tok_embeddings.weight": torch.randn(64, 32)}, good)
    files = {
        "empty": b"",
        "random": bytes(range(256)) * 4,
        "pickle-stop-opcode": b".garbage",  # the unpickler pops an empty stack: an IndexError inside torch
        "truncated": good.read_bytes()[: good.stat().st_size // 2],
        "text": b"this is not a checkpoint\n",
    }
    out = {}
    for name, data in files.items():
        out[name] = tmp_path / f"{name}.pth"
        out[name].write_bytes(data)
    return out


def test_convert_to_hf_on_garbage_names_the_file(tmp_path, world_tokenizer_dir, capsys):
    for name, path in garbage_files(tmp_path).items():
        with pytest.raises(SystemExit) as exit_info:
            convert_main(["to-hf", "--pth", str(path), "--tokenizer", str(world_tokenizer_dir),
                          "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 1, name
        assert err.startswith(f"error: {path}"), (name, err)
        assert "Traceback" not in err
        expected = (r"is empty \(0 bytes\)" if name == "empty" else
                    r"is not a PyTorch checkpoint, or is truncated or damaged|is not a plain state dict \(or no checkpoint")
        assert re.search(expected, err) and "xpected a" in err, (name, err)  # what it should have been


def test_state_dict_with_tensors_of_the_wrong_rank_is_a_clear_error(tmp_path, world_tokenizer_dir, capsys):
    path = tmp_path / "flat.pth"
    torch.save({"tok_embeddings.weight": torch.ones(64), "layers.0.attention.wk.weight": torch.ones(8)}, path)
    with pytest.raises(SystemExit):
        convert_main(["to-hf", "--pth", str(path), "--tokenizer", str(world_tokenizer_dir), "--out", str(tmp_path / "o")])
    assert "'tok_embeddings.weight' (the token embeddings) has shape (64,), expected a non-empty 2-D tensor" in (
        capsys.readouterr().err)


# ----------------------------------------------------------------------------- the maximum length


class Collect:
    """A streamer that keeps what generate streams (its first put is the prompt)."""

    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, value):
        self.puts.append(value.reshape(-1).tolist())

    def end(self):
        self.ended = True


def prompt_ids(tokenizer, encoder, num_image_tokens: int) -> list[int]:
    """The generation prompt of QUESTION with one picture of ``num_image_tokens`` tokens."""
    return MiniMindVProcessor(encoder.processor, tokenizer, num_image_tokens=num_image_tokens).question_ids(QUESTION)


def short_model_bundle(make_tiny_vlm, world_tokenizer, tiny_encoder, max_positions: int) -> LoadedVLM:
    model = make_tiny_vlm(max_position_embeddings=max_positions).eval()
    return LoadedVLM.from_parts(model, world_tokenizer, tiny_encoder)


def test_the_answer_stops_at_the_models_maximum_length(make_tiny_vlm, world_tokenizer, tiny_encoder, image):
    prompt_length = len(prompt_ids(world_tokenizer, tiny_encoder, tiny_encoder.num_tokens))
    bundle = short_model_bundle(make_tiny_vlm, world_tokenizer, tiny_encoder, prompt_length + 3)
    never_stop = [world_tokenizer.eos_token_id, world_tokenizer.convert_tokens_to_ids("<|image|>")]
    streamer = Collect()
    with pytest.warns(UserWarning, match=rf"max_new_tokens=50 cut to 3: the prompt has {prompt_length} tokens"):
        (reply,) = answer(bundle, [image], [QUESTION], max_new_tokens=50, streamer=streamer,
                          suppress_tokens=never_stop)
    assert isinstance(reply, str) and streamer.ended
    assert len(streamer.puts) == 1 + 3  # the prompt, then exactly the 3 tokens that fit

    # generate itself, as evaluate and the widget call it: the sequence ends exactly at the limit.
    ids = torch.tensor([prompt_ids(world_tokenizer, tiny_encoder, tiny_encoder.num_tokens)])
    tokens = tiny_encoder(tiny_encoder.preprocess(__import__("PIL.Image").Image.open(image)))
    with pytest.warns(UserWarning, match="cut to 3"):
        out = bundle.model.generate(ids, image_tokens=tokens, max_new_tokens=500, do_sample=False,
                                    eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == prompt_length + 3 == bundle.model.config.max_position_embeddings


def test_a_prompt_that_fills_the_model_is_a_clear_error(make_tiny_vlm, world_tokenizer, tiny_encoder, image):
    prompt_length = len(prompt_ids(world_tokenizer, tiny_encoder, tiny_encoder.num_tokens))
    bundle = short_model_bundle(make_tiny_vlm, world_tokenizer, tiny_encoder, prompt_length - 2)
    streamer = Collect()
    with pytest.raises(ValueError, match=rf"question 0 .* makes a prompt of {prompt_length} tokens .* "
                                         rf"maximum length \(max_position_embeddings\) is {prompt_length - 2}"):
        answer(bundle, [image], [QUESTION], streamer=streamer)
    assert streamer.puts == []  # refused before anything streamed
    with pytest.raises(ValueError, match=rf"the prompt has {prompt_length} tokens, but the model's maximum length"):
        bundle.model.generate(torch.tensor([prompt_ids(world_tokenizer, tiny_encoder, tiny_encoder.num_tokens)]),
                              max_new_tokens=1)


def test_chat_ends_cleanly_at_the_limit(make_tiny_vlm, world_tokenizer, tiny_clip_dir, tiny_encoder, image, tmp_path, capsys):
    prompt_length = len(prompt_ids(world_tokenizer, tiny_encoder, 5))
    folder = tmp_path / "short"
    make_tiny_vlm(max_position_embeddings=prompt_length + 2).save_pretrained(folder)
    world_tokenizer.save_pretrained(folder)
    shutil.copytree(tiny_clip_dir, folder / "tiny_clip")
    with pytest.warns(UserWarning, match="cut to 2"):
        reply = chat.main(["--model", str(folder), "--image", str(image), "--device", "cpu",
                           "--max-new-tokens", "64", QUESTION])
    assert capsys.readouterr().out.strip() == reply.strip()


# ----------------------------------------------------------------------------- hub ids fail fast


@pytest.fixture
def hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


@pytest.fixture
def hub_unreachable(monkeypatch):
    """Online as far as huggingface_hub knows, but its endpoint refuses connections."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")  # the discard port


@pytest.mark.parametrize("hub", ["hub_offline", "hub_unreachable"])
def test_hub_ids_fail_fast_saying_there_is_no_such_local_folder(hub, request, vlm_folder, tmp_path):
    request.getfixturevalue(hub)
    reason = "HF_HUB_OFFLINE is set" if hub == "hub_offline" else "http://127.0.0.1:9 cannot be reached"
    folder = copy_of(vlm_folder, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["vision_model"] = "nobody-here/no-such-clip"
    (folder / "config.json").write_text(json.dumps(config))
    calls = [
        (lambda: VisionEncoder.from_pretrained("nobody-here/no-such-clip"), VisionModelNotFoundError),
        (lambda: load_vlm(folder, device="cpu"), VisionModelNotFoundError),
        (lambda: MiniMindVLM.from_pretrained("nobody-here/no-such-vlm"), HubUnreachableError),
        (lambda: load_tokenizer("nobody-here/no-such-tokenizer"), ValueError),
    ]
    for call, error in calls:
        started = time.monotonic()
        with pytest.raises(error) as info:
            call()
        message = str(info.value)
        assert "there is no local folder of that name" in message and reason in message, message
        assert "nobody-here/no-such-" in message
        assert time.monotonic() - started < 5, message  # not ~20 s of retries
