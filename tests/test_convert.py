"""Converting the original MiniMind-V v1 checkpoints, checked against a v1 forward pass written
here from scratch (complex rotary, repeat_kv, explicit causal softmax, v1's MoE gate)."""

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minimind_v.convert import (
    CheckpointMismatchError,
    load_v1_into,
    load_v1_state_dict,
    main,
    model_from_v1,
    ours_to_v1,
    v1_config,
    v1_to_ours,
)
from minimind_v.model.llm import MiniMindForCausalLM
from minimind_v.model.vlm import MiniMindVLM, VLMConfig
from minimind_v.tokenizer import load_tokenizer

DIM, N_LAYERS, N_HEADS, N_KV, VISION_WIDTH, N_IMAGE = 64, 2, 4, 2, 48, 50

SENTENCES = [
    "The red circle is left of the blue square.",
    "A green triangle sits above a yellow star.",
    "What colour is the shape on the right?",
    "There are three shapes in the picture.",
    "一个红色的圆形在蓝色的方块旁边。",
] * 20


@pytest.fixture(scope="module")
def v1_tokenizer(tmp_path_factory):
    """A folder shaped like the original tokenizer: <unk>, <s>, </s> and no <|image|>."""
    folder = tmp_path_factory.mktemp("v1_tokenizer")
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(SENTENCES, trainer=trainer)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
        "model_max_length": 32768, "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return folder


def v1_layout(vocab, moe=False, vision=True, hidden=192, n_experts=4):
    """The v1 key names and shapes, written out from the v1 naming rules (not from our model)."""
    kv = N_KV * DIM // N_HEADS
    keys = {"tok_embeddings.weight": (vocab, DIM), "output.weight": (vocab, DIM), "norm.weight": (DIM,)}
    for i in range(N_LAYERS):
        p = f"layers.{i}."
        keys |= {p + "attention.wq.weight": (DIM, DIM), p + "attention.wk.weight": (kv, DIM),
                 p + "attention.wv.weight": (kv, DIM), p + "attention.wo.weight": (DIM, DIM),
                 p + "attention_norm.weight": (DIM,), p + "ffn_norm.weight": (DIM,)}
        experts = [f"experts.{j}." for j in range(n_experts)] + ["shared_experts."] if moe else [""]
        for e in experts:
            keys |= {f"{p}feed_forward.{e}w1.weight": (hidden, DIM), f"{p}feed_forward.{e}w2.weight": (DIM, hidden),
                     f"{p}feed_forward.{e}w3.weight": (hidden, DIM)}
        if moe:
            keys[p + "feed_forward.gate.weight"] = (n_experts, DIM)
    if vision:
        keys |= {"vision_proj.vision_proj.0.weight": (DIM, VISION_WIDTH), "vision_proj.vision_proj.0.bias": (DIM,)}
    return keys


def make_v1_checkpoint(vocab, moe=False, vision=True, seed=0):
    """A v1-layout state dict from a random model of ours, as v1's training script would save it
    after torch.compile: every key prefixed by "_orig_mod.", plus the rotary buffer."""
    torch.manual_seed(seed)
    config = VLMConfig(vocab_size=vocab, dim=DIM, n_layers=N_LAYERS, n_heads=N_HEADS, n_kv_heads=N_KV,
                       vision_width=VISION_WIDTH, use_moe=moe)
    model = MiniMindVLM(config) if vision else MiniMindForCausalLM(config)
    with torch.no_grad():  # larger than the 0.02 init, so every weight visibly matters
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    sd = ours_to_v1(model.state_dict())
    assert {k: tuple(v.shape) for k, v in sd.items()} == v1_layout(vocab, moe=moe, vision=vision)
    # v1 saves the one tied tensor under both names
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()
    compiled = {"_orig_mod." + k: v for k, v in sd.items()}
    compiled["_orig_mod.pos_cis"] = torch.polar(torch.ones(64, 8), torch.zeros(64, 8))  # a buffer to ignore
    return compiled, {k: v.clone() for k, v in sd.items()}


# ----------------------------------------------------------------------------- v1, from scratch


def v1_rms(x, w, eps=1e-5):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def v1_rotary(x, pos_cis):
    """(B, T, H, hd): each interleaved pair is a complex number, turned by its position's angle."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * pos_cis[None, :, None, :]).flatten(3).type_as(x)


def v1_repeat_kv(x, n_rep):
    B, T, H, hd = x.shape
    return x[:, :, :, None, :].expand(B, T, H, n_rep, hd).reshape(B, T, H * n_rep, hd)


def v1_swiglu(sd, p, x):
    return F.silu(x @ sd[p + "w1.weight"].T) * (x @ sd[p + "w3.weight"].T) @ sd[p + "w2.weight"].T


def v1_moe(sd, p, x, top_k=2):
    """v1's gate: softmax over experts, top-k, weights renormalised; plus the shared expert."""
    flat = x.reshape(-1, x.shape[-1])
    scores = (flat @ sd[p + "gate.weight"].T).softmax(-1)
    weight, idx = torch.topk(scores, k=top_k, dim=-1, sorted=False)
    weight = weight / (weight.sum(-1, keepdim=True) + 1e-20)
    n_experts = sd[p + "gate.weight"].shape[0]
    every = torch.stack([v1_swiglu(sd, f"{p}experts.{e}.", flat) for e in range(n_experts)], 1)  # (N, E, D)
    chosen = every.gather(1, idx[..., None].expand(-1, -1, flat.shape[-1]))  # (N, k, D)
    y = (chosen * weight[..., None]).sum(1) + v1_swiglu(sd, p + "shared_experts.", flat)
    return y.view_as(x)


def v1_forward(sd, input_ids, image_tokens=None, image_ids=None, n_heads=N_HEADS, theta=1e4):
    """Logits of the v1 model for v1-named weights ``sd``."""
    h = sd["tok_embeddings.weight"][input_ids]
    if image_tokens is not None:  # find each '<'*25+'>'*25 run and put the projected image there
        proj = image_tokens @ sd["vision_proj.vision_proj.0.weight"].T + sd["vision_proj.vision_proj.0.bias"]
        h, n, k = h.clone(), len(image_ids), 0
        for b in range(input_ids.shape[0]):
            row = input_ids[b].tolist()
            for start in range(len(row) - n + 1):
                if row[start:start + n] == image_ids:
                    h[b, start:start + n] = proj[k]
                    k += 1
        assert k == image_tokens.shape[0]
    B, T, dim = h.shape
    hd = dim // n_heads
    freqs = 1.0 / theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd)
    pos_cis = torch.polar(torch.ones(T, hd // 2), torch.outer(torch.arange(T).float(), freqs))
    mask = torch.triu(torch.full((T, T), float("-inf")), diagonal=1)
    n_layers = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k)))
    for i in range(n_layers):
        p = f"layers.{i}."
        x = v1_rms(h, sd[p + "attention_norm.weight"])
        q = (x @ sd[p + "attention.wq.weight"].T).view(B, T, n_heads, hd)
        k = (x @ sd[p + "attention.wk.weight"].T).view(B, T, -1, hd)
        v = (x @ sd[p + "attention.wv.weight"].T).view(B, T, -1, hd)
        q, k = v1_rotary(q, pos_cis), v1_rotary(k, pos_cis)
        n_rep = n_heads // k.shape[2]
        q, k, v = q.transpose(1, 2), v1_repeat_kv(k, n_rep).transpose(1, 2), v1_repeat_kv(v, n_rep).transpose(1, 2)
        scores = F.softmax((q @ k.transpose(-2, -1)) / math.sqrt(hd) + mask, dim=-1)
        h = h + (scores @ v).transpose(1, 2).reshape(B, T, -1) @ sd[p + "attention.wo.weight"].T
        x = v1_rms(h, sd[p + "ffn_norm.weight"])
        h = h + (v1_moe(sd, p + "feed_forward.", x) if p + "feed_forward.gate.weight" in sd
                 else v1_swiglu(sd, p + "feed_forward.", x))
    return v1_rms(h, sd["norm.weight"]) @ sd["output.weight"].T


def prompt_with_image(tokenizer, image_ids):
    before = tokenizer("<s>user\n", add_special_tokens=False).input_ids
    after = tokenizer("\nWhat colour is the shape?</s>\n<s>assistant\n", add_special_tokens=False).input_ids
    return before + image_ids + after


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_loaded_v1_checkpoint_matches_v1_forward(v1_tokenizer, moe, attention):
    tok = load_tokenizer(v1_tokenizer)
    compiled, v1 = make_v1_checkpoint(len(tok), moe=moe)
    config = v1_config(compiled, tokenizer=tok, n_heads=N_HEADS, attention=attention)
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size) == \
        (DIM, N_LAYERS, N_HEADS, N_KV, len(tok))
    assert (config.hidden_dim, config.use_moe, config.vision_width, config.num_image_tokens) == \
        (192, moe, VISION_WIDTH, N_IMAGE)
    if moe:
        assert (config.n_routed_experts, config.n_shared_experts) == (4, 1)
    # v1's placeholder: 25 '<' then 25 '>' tokens
    lt, gt = tok.convert_tokens_to_ids("<"), tok.convert_tokens_to_ids(">")
    assert config.image_token_ids == [lt] * 25 + [gt] * 25

    model = load_v1_into(MiniMindVLM(config).eval(), compiled)
    torch.manual_seed(1)
    text = tok("The red circle is left of the blue square.", add_special_tokens=False).input_ids
    first = prompt_with_image(tok, config.image_token_ids)
    second = text + config.image_token_ids  # the image at another place, then text to fill the row
    second += (text * 3)[: len(first) - len(second)]
    ids = torch.tensor([first, second])
    assert ids.shape[1] > N_IMAGE
    images = torch.randn(2, N_IMAGE, VISION_WIDTH)
    with torch.no_grad():
        got = model(ids, image_tokens=images, use_cache=False).logits
        want = v1_forward(v1, ids, images, config.image_token_ids)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        # The picture really enters: other image tokens give other logits.
        other = model(ids, image_tokens=torch.randn(2, N_IMAGE, VISION_WIDTH), use_cache=False).logits
    assert (other - got).abs().max() > 0.1


def test_language_model_only_checkpoint(v1_tokenizer):
    tok = load_tokenizer(v1_tokenizer)
    compiled, v1 = make_v1_checkpoint(len(tok), vision=False, seed=3)
    model = model_from_v1(compiled, n_heads=N_HEADS)
    assert type(model) is MiniMindForCausalLM and model.config.model_type == "minimind"
    ids = torch.tensor([tok("<s>user\nhello</s>\n<s>assistant\n", add_special_tokens=False).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, use_cache=False).logits, v1_forward(v1, ids), atol=1e-4, rtol=1e-4)
    # The LM-only file lacks the projection a VLM needs; a VLM file has one the LM cannot hold.
    with pytest.raises(CheckpointMismatchError, match=r"missing: vision_proj\.vision_proj\.0\.weight"):
        load_v1_into(MiniMindVLM(v1_config(compiled, n_heads=N_HEADS)), compiled)
    vlm_sd, _ = make_v1_checkpoint(len(tok))
    with pytest.raises(CheckpointMismatchError, match=r"unexpected: vision_proj\.vision_proj\.0\.bias"):
        load_v1_into(MiniMindForCausalLM(model.config), vlm_sd)


def test_mismatched_checkpoint_lists_every_problem(v1_tokenizer):
    tok = load_tokenizer(v1_tokenizer)
    _, v1 = make_v1_checkpoint(len(tok))
    model = MiniMindVLM(v1_config(v1, tokenizer=tok, n_heads=N_HEADS))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bad = dict(v1)
    del bad["layers.1.attention.wv.weight"]
    bad["layers.0.attention.rotary_scale"] = torch.ones(3)
    bad["vision_proj.vision_proj.0.bias"] = torch.zeros(DIM + 1)
    with pytest.raises(CheckpointMismatchError) as info:
        load_v1_into(model, bad)
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "missing: layers.1.attention.wv.weight (32, 64)" in message
    assert "unexpected: layers.0.attention.rotary_scale (3,)" in message
    assert "misshapen: vision_proj.vision_proj.0.bias is (65,), the model expects (64,)" in message
    # All or nothing: not one weight was copied.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # An untied head cannot be held by a tied model.
    untied = dict(v1, **{"output.weight": v1["output.weight"] + 1})
    with pytest.raises(CheckpointMismatchError, match="untied"):
        load_v1_into(model, untied)


def test_config_inference_errors():
    _, v1 = make_v1_checkpoint(300)
    with pytest.raises(ValueError, match="n_heads"):
        v1_config(v1, n_heads=3)  # 64 is not divisible by 3
    with pytest.raises(ValueError, match="n_heads"):
        v1_config(v1, n_heads=1)  # one head of size 64: wk's 32 rows are no whole number of heads
    with pytest.raises(ValueError, match="tok_embeddings"):
        v1_config({"norm.weight": torch.ones(4)})


def test_round_trip_v1_ours_v1_is_exact(v1_tokenizer):
    tok = load_tokenizer(v1_tokenizer)
    for moe in (False, True):
        compiled, v1 = make_v1_checkpoint(len(tok), moe=moe)
        clean = load_v1_state_dict(compiled)
        assert set(clean) == set(v1)  # prefixes stripped, pos_cis dropped
        ours = v1_to_ours(clean)
        assert "vision_proj.layers.0.weight" in ours and not any(k.startswith("vision_proj.vision") for k in ours)
        back = ours_to_v1(ours)
        assert set(back) == set(v1) and all(torch.equal(back[k], v1[k]) for k in v1)
        # ... and through a model: load, read the weights back out.
        model = model_from_v1(compiled, tokenizer=tok, n_heads=N_HEADS)
        back = ours_to_v1(model.state_dict())
        assert set(back) == set(v1) and all(torch.equal(back[k], v1[k]) for k in v1)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such.pth"):
        load_v1_state_dict(tmp_path / "no_such.pth")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="list.pth is not a state dict"):
        load_v1_state_dict(tmp_path / "list.pth")
    torch.save({"tok_embeddings.weight": torch.ones(2, 2), "step": 7}, tmp_path / "mixed.pth")
    with pytest.raises(ValueError, match=r"'step' \(int\)"):
        load_v1_state_dict(tmp_path / "mixed.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.pth"):
        load_v1_state_dict(tmp_path / "text.pth")
    torch.save({"opt": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")  # a pickled module, not data
    with pytest.raises(ValueError, match="pickled.pth is not a plain state dict"):
        load_v1_state_dict(tmp_path / "pickled.pth")
    # A training script's wrapper dict is opened; DDP's "module." goes like "_orig_mod.".
    torch.save({"model": {"module.norm.weight": torch.ones(3)}, "step": 1}, tmp_path / "wrapped.pth")
    assert list(load_v1_state_dict(tmp_path / "wrapped.pth")) == ["norm.weight"]


def test_cli_round_trip_through_files(v1_tokenizer, tmp_path, capsys):
    tok = load_tokenizer(v1_tokenizer)
    compiled, v1 = make_v1_checkpoint(len(tok), moe=True, seed=5)
    torch.save(compiled, tmp_path / "64_vlm_sft.pth")
    folder = tmp_path / "hf"
    main(["to-hf", "--pth", str(tmp_path / "64_vlm_sft.pth"), "--tokenizer", str(v1_tokenizer),
          "--out", str(folder), "--n-heads", str(N_HEADS), "--vision-model", "clip-local"])
    assert "64_vlm_sft.pth" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()}

    # The folder alone is enough: config, weights and the tokenizer's placeholder agree with v1.
    model = MiniMindVLM.from_pretrained(folder).eval()
    assert model.config.vision_model == "clip-local" and model.config.use_moe
    folder_tok = load_tokenizer(folder)
    lt, gt = folder_tok.convert_tokens_to_ids("<"), folder_tok.convert_tokens_to_ids(">")
    assert model.config.image_token_ids == [lt] * 25 + [gt] * 25
    ids = torch.tensor([prompt_with_image(folder_tok, model.config.image_token_ids)])
    images = torch.randn(1, N_IMAGE, VISION_WIDTH)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, image_tokens=images, use_cache=False).logits,
                                   v1_forward(v1, ids, images, model.config.image_token_ids), atol=1e-4, rtol=1e-4)

    main(["to-v1", "--model", str(folder), "--out", str(tmp_path / "back.pth")])
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert set(back) == set(v1) and all(torch.equal(back[k], v1[k]) for k in v1)
    assert "output.weight" in back and "tok_embeddings.weight" in back

    # Clear errors, naming the file, with a non-zero exit.
    with pytest.raises(SystemExit) as exit_info:
        main(["to-hf", "--pth", str(tmp_path / "missing.pth"), "--tokenizer", str(v1_tokenizer),
              "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 1 and "missing.pth" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["to-v1", "--model", str(tmp_path), "--out", str(tmp_path / "y.pth")])
    assert "no config.json" in capsys.readouterr().err


@pytest.mark.parametrize("weights_file", ["pytorch_model.bin", "model.safetensors"])
def test_cli_reads_a_v1_transformers_folder(v1_tokenizer, tmp_path, weights_file):
    """A v1 transformers folder: weights, a config.json that states n_heads, the tokenizer files.
    A safetensors save keeps only one name of the tied head; the other is restored."""
    from safetensors.torch import save_file

    tok = load_tokenizer(v1_tokenizer)
    _, v1 = make_v1_checkpoint(len(tok), seed=7)
    v1_folder = tmp_path / "minimind-v-v1"
    v1_folder.mkdir()
    if weights_file.endswith(".bin"):
        torch.save(v1, v1_folder / weights_file)
    else:
        save_file({k: v.clone() for k, v in v1.items() if k != "output.weight"}, str(v1_folder / weights_file))
    (v1_folder / "config.json").write_text(json.dumps({"model_type": "minimind", "dim": DIM, "n_heads": N_HEADS}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (v1_folder / name).write_bytes((v1_tokenizer / name).read_bytes())

    main(["to-hf", "--pth", str(v1_folder), "--out", str(tmp_path / "hf")])  # heads and tokenizer from the folder
    model = MiniMindVLM.from_pretrained(tmp_path / "hf")
    assert model.config.n_heads == N_HEADS and model.config.n_kv_heads == N_KV
    back = ours_to_v1(model.state_dict())
    assert set(back) == set(v1) and all(torch.equal(back[k], v1[k]) for k in v1)
