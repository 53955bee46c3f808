"""Reading and writing the original MiniMind-V v1 checkpoints.

The v1 code saves a plain PyTorch state dict (``512_vlm_sft.pth``, ``768_llm.pth`` ...). This
package names its parameters as v1 does, so converting is mostly bookkeeping:

- the projection is ``vision_proj.vision_proj.0.*`` in v1 and ``vision_proj.layers.0.*`` here;
- v1 ties the output head to the token embeddings and saves the one tensor under both names;
- ``torch.compile`` and DDP prefix every name with ``_orig_mod.`` / ``module.``;
- buffers derived from the config (the rotary table ``pos_cis``, the causal ``mask``) are not
  weights and are rebuilt from the config, so they are dropped.

The file holds no config, so :func:`v1_config` reads the sizes off the tensor shapes. Only the
number of attention heads cannot be seen in a shape (``wq`` is ``dim x dim`` whatever the head
count): it defaults to v1's 16.

Loading is strict: a missing, unexpected or misshapen tensor is an error that lists every one of
them, never a silent partial load. Command line::

    python -m minimind_v.convert to-hf --pth 512_vlm_sft.pth --tokenizer TOKENIZER_DIR --out DIR
    python -m minimind_v.convert to-v1 --model DIR --out 512_vlm_sft.pth
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint_files import DERIVED_BUFFER, StateDict, clean_state_dict, load_v1_state_dict
from .config import MiniMindConfig
from .model.folders import describe_model_type, read_folder_config
from .model.llm import MiniMindForCausalLM
from .model.vlm import MiniMindVLM, VLMConfig
from .runfiles import atomic_torch_save

V1_NUM_HEADS = 16  # every v1 model (small and base) uses 16 query heads
V1_NUM_IMAGE_TOKENS = 50  # CLIP ViT-B/32: 7x7 patches + CLS

V1_PROJ_PREFIX = "vision_proj.vision_proj."
OUR_PROJ_PREFIX = "vision_proj.layers."
TIED = ("tok_embeddings.weight", "output.weight")  # one tensor, saved under both names


class CheckpointMismatchError(ValueError):
    """The checkpoint's tensors do not fit the model; the message lists every difference."""


# ----------------------------------------------------------------------------- key mapping


def _with_tied_partner(state_dict: StateDict) -> StateDict:
    """v1 saves the tied head under both names; a safetensors save keeps only one. Restore both."""
    present = [k for k in TIED if k in state_dict]
    if len(present) == 1:
        state_dict = dict(state_dict)
        other = TIED[1 - TIED.index(present[0])]
        state_dict[other] = state_dict[present[0]]
    return state_dict


def v1_to_ours(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename v1 keys to this package's (only the projection differs). Tensors are shared, not copied."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(OUR_PROJ_PREFIX):
            raise ValueError(f"{key!r} is already in this package's layout, not v1's")
        out[OUR_PROJ_PREFIX + key[len(V1_PROJ_PREFIX):] if key.startswith(V1_PROJ_PREFIX) else key] = value
    return _with_tied_partner(out)


def ours_to_v1(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename this package's keys to v1's, with the tied head under both of its names."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith(V1_PROJ_PREFIX):
            raise ValueError(f"{key!r} is already in the v1 layout")
        if DERIVED_BUFFER.match(key):
            continue
        out[V1_PROJ_PREFIX + key[len(OUR_PROJ_PREFIX):] if key.startswith(OUR_PROJ_PREFIX) else key] = value
    return _with_tied_partner(out)


def _v1_name(our_key: str) -> str:
    return V1_PROJ_PREFIX + our_key[len(OUR_PROJ_PREFIX):] if our_key.startswith(OUR_PROJ_PREFIX) else our_key


# ----------------------------------------------------------------------------- config from shapes


def _require(state_dict: StateDict, key: str, what: str, ndim: int = 2) -> torch.Tensor:
    if key not in state_dict:
        raise ValueError(f"not a MiniMind v1 state dict: no {key!r} ({what}); "
                         f"its first keys are {list(state_dict)[:6]}")
    tensor = state_dict[key]
    if tensor.dim() != ndim or 0 in tensor.shape:
        raise ValueError(f"not a MiniMind v1 state dict: {key!r} ({what}) has shape {tuple(tensor.shape)}, "
                         f"expected a non-empty {ndim}-D tensor")
    return tensor


def v1_config(state_dict: Mapping[str, torch.Tensor], tokenizer=None, **overrides) -> VLMConfig:
    """The :class:`VLMConfig` of a v1 checkpoint, read off its tensor shapes.

    Inferred: ``dim``, ``vocab_size`` (embeddings), ``n_layers`` (layer indices), ``n_kv_heads``
    (``wk``'s rows / head size), ``hidden_dim`` (``w1``), the MoE layout (number of routed experts,
    a shared expert or not), ``vision_width`` and ``projector`` (the projection). Not visible in any
    shape: ``n_heads`` (default 16, as in v1) and ``num_experts_per_tok`` (default 2) -- pass them
    as overrides when they differ. With a ``tokenizer``, ``image_token_ids`` are its placeholder
    ids (v1: ``'<' * 25 + '>' * 25``) and bos/eos/pad come from it. ``overrides`` win over
    everything inferred.
    """
    sd = _with_tied_partner(clean_state_dict(state_dict))
    embeddings = _require(sd, "tok_embeddings.weight", "the token embeddings")
    vocab_size, dim = embeddings.shape
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    if not layer_ids:
        raise ValueError("not a MiniMind v1 state dict: no 'layers.{i}.*' tensors")
    n_layers = max(layer_ids) + 1

    n_heads = overrides.get("n_heads", V1_NUM_HEADS)
    if dim % n_heads:
        raise ValueError(f"dim {dim} is not divisible by n_heads={n_heads}; pass the checkpoint's real "
                         "head count (n_heads=..., --n-heads on the command line)")
    head_dim = dim // n_heads
    kv_rows = _require(sd, "layers.0.attention.wk.weight", "the first key projection").shape[0]
    if kv_rows % head_dim or n_heads % (kv_rows // head_dim or 1):
        raise ValueError(f"wk has {kv_rows} rows, which is no whole number of key heads of size "
                         f"{head_dim} dividing n_heads={n_heads}; pass the real n_heads (--n-heads)")

    inferred = dict(vocab_size=vocab_size, dim=dim, n_layers=n_layers, n_heads=n_heads,
                    n_kv_heads=kv_rows // head_dim, num_image_tokens=V1_NUM_IMAGE_TOKENS)
    ffn = "layers.0.feed_forward."
    expert_ids = {int(m.group(1)) for k in sd if (m := re.match(re.escape(ffn) + r"experts\.(\d+)\.", k))}
    if expert_ids:
        gate = _require(sd, ffn + "gate.weight", "the MoE router")
        inferred.update(use_moe=True, n_routed_experts=gate.shape[0],
                        n_shared_experts=int(ffn + "shared_experts.w1.weight" in sd),
                        hidden_dim=_require(sd, ffn + "experts.0.w1.weight", "the first expert").shape[0])
    else:
        inferred.update(use_moe=False, hidden_dim=_require(sd, ffn + "w1.weight", "the first FFN").shape[0])

    first = V1_PROJ_PREFIX + "0.weight"
    if first in sd:
        inferred["vision_width"] = _require(sd, first, "the projection").shape[1]
        inferred["projector"] = "mlp" if V1_PROJ_PREFIX + "2.weight" in sd else "linear"

    if tokenizer is not None:
        from .tokenizer import image_placeholder

        if len(tokenizer) > vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the checkpoint's embedding "
                             f"table only {vocab_size}: they do not belong together")
        n_image = overrides.get("num_image_tokens", inferred["num_image_tokens"])
        inferred["image_token_ids"] = image_placeholder(tokenizer, n_image)[1]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is not None:
                inferred[name] = getattr(tokenizer, name)
    return VLMConfig(**{**inferred, **overrides})


_LM_FIELDS = [p for p in inspect.signature(MiniMindConfig.__init__).parameters if p not in ("self", "kwargs")]


def lm_config(config: MiniMindConfig) -> MiniMindConfig:
    """The decoder-only part of a (VLM) config: for checkpoints without a projection (``*_llm.pth``)."""
    return MiniMindConfig(**{name: getattr(config, name) for name in _LM_FIELDS})


# ----------------------------------------------------------------------------- strict loading


def _mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per missing, unexpected or misshapen tensor, in v1 names."""
    lines = [f"missing: {_v1_name(k)} {tuple(v.shape)}" for k, v in expected.items() if k not in given]
    lines += [f"unexpected: {_v1_name(k)} {tuple(v.shape)}" for k, v in given.items() if k not in expected]
    lines += [f"misshapen: {_v1_name(k)} is {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
              for k, v in given.items() if k in expected and v.shape != expected[k].shape]
    return lines


def load_v1_into(model: MiniMindForCausalLM, state_dict) -> MiniMindForCausalLM:
    """Copy a v1 checkpoint (path or dict) into ``model``, all or nothing.

    A :class:`MiniMindVLM` needs the projection; a :class:`MiniMindForCausalLM` takes a
    language-model-only checkpoint (``*_llm.pth``). Any difference raises
    :class:`CheckpointMismatchError` listing every missing, unexpected and misshapen tensor,
    before a single weight is copied.
    """
    ours = v1_to_ours(load_v1_state_dict(state_dict))
    expected = model.state_dict()
    problems = _mismatches(expected, ours)
    emb, out = (ours.get(k) for k in TIED)
    if emb is not None and out is not None and emb.shape == out.shape and not torch.equal(emb, out):
        problems.append("untied: output.weight differs from tok_embeddings.weight, but this model "
                        "(like v1) ties the output head to the embeddings")
    if problems:
        raise CheckpointMismatchError(
            f"the checkpoint does not fit {type(model).__name__} "
            f"(dim {model.config.dim}, {model.config.n_layers} layers, {model.config.n_heads} heads): "
            f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)
        )
    model.load_state_dict(ours, strict=True)
    return model


def model_from_v1(state_dict, tokenizer=None, **overrides) -> MiniMindForCausalLM:
    """A model built from a v1 checkpoint's shapes and loaded with its weights: a
    :class:`MiniMindVLM` when it has the projection, else a :class:`MiniMindForCausalLM`."""
    sd = load_v1_state_dict(state_dict)
    config = v1_config(sd, tokenizer=tokenizer, **overrides)
    if V1_PROJ_PREFIX + "0.weight" in sd:
        model = MiniMindVLM(config)
    else:
        model = MiniMindForCausalLM(lm_config(config))
    return load_v1_into(model, sd).eval()


def model_to_v1(model: MiniMindForCausalLM) -> StateDict:
    """``model``'s weights in the v1 layout, ready for ``torch.save``."""
    return ours_to_v1({k: v.detach().cpu() for k, v in model.state_dict().items()})


# ----------------------------------------------------------------------------- command line


def _v1_folder_overrides(path: Path) -> dict:
    """Hyper-parameters that a v1 transformers folder's config.json states (shapes cannot tell them)."""
    config_file = path / "config.json" if path.is_dir() else None
    if config_file is None or not config_file.is_file():
        return {}
    raw = read_folder_config(path, "v1 transformers folder")
    names = ("n_heads", "num_experts_per_tok", "norm_topk_prob", "norm_eps", "rope_theta")
    return {name: raw[name] for name in names if raw.get(name) is not None}


def _summary(model: MiniMindForCausalLM) -> str:
    c = model.config
    ffn = (f"MoE {c.n_routed_experts} experts (top-{c.num_experts_per_tok}, {c.n_shared_experts} shared)"
           if c.use_moe else "dense FFN") + f" width {c.hidden_dim}"
    vision = (f", projection {c.vision_width}->{c.dim} ({c.projector})" if isinstance(model, MiniMindVLM) else
              ", language model only")
    n_params = sum(p.numel() for p in model.parameters())
    return (f"dim {c.dim}, {c.n_layers} layers, {c.n_heads} heads / {c.n_kv_heads} KV, vocab {c.vocab_size}, "
            f"{ffn}{vision}; {n_params / 1e6:.1f}M parameters")


def convert_to_hf(pth, tokenizer_dir, out, vision_model: str | None = None, n_heads: int | None = None) -> Path:
    """v1 checkpoint -> a ``save_pretrained`` folder (safetensors + config + tokenizer)."""
    from .tokenizer import load_tokenizer

    pth, out = Path(pth), Path(out)
    sd = load_v1_state_dict(pth)
    tokenizer = load_tokenizer(tokenizer_dir)
    overrides = _v1_folder_overrides(pth)
    if n_heads is not None:
        overrides["n_heads"] = n_heads
    if vision_model is not None:
        overrides["vision_model"] = vision_model
    model = model_from_v1(sd, tokenizer=tokenizer, **overrides)
    if isinstance(model, MiniMindVLM):  # v1 squeezed each whole picture to 224x224; it never centre-cropped
        model.config.vision_preprocessing = "resize"
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    print(f"converted {pth.name}: {_summary(model)} -> {out}")
    return out


def convert_to_v1(model_dir, out) -> Path:
    """A ``save_pretrained`` folder -> a v1-layout ``.pth`` state dict."""
    model_dir, out = Path(model_dir), Path(out)
    model_type = read_folder_config(model_dir).get("model_type")
    classes = {VLMConfig.model_type: MiniMindVLM, MiniMindConfig.model_type: MiniMindForCausalLM}
    if model_type not in classes:
        raise ValueError(f"{model_dir} is {describe_model_type(model_type)}, not a MiniMind or MiniMind-V folder "
                         f"(model_type {model_type!r}; expected one of {sorted(classes)})")
    model = classes[model_type].from_pretrained(str(model_dir))  # checked, safetensors only
    state_dict = model_to_v1(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(state_dict, out)  # a kill mid-write never leaves half a .pth
    print(f"wrote {len(state_dict)} tensors in the v1 layout ({_summary(model)}) -> {out}")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minimind_v.convert", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    to_hf = commands.add_parser("to-hf", help="v1 .pth -> save_pretrained folder with the tokenizer")
    to_hf.add_argument("--pth", required=True, help="v1 checkpoint: .pth file, or a v1 transformers folder")
    to_hf.add_argument("--tokenizer", help="tokenizer folder of the original project (default: the --pth "
                                           "folder, when it holds one)")
    to_hf.add_argument("--out", required=True, help="folder to write")
    to_hf.add_argument("--vision-model", default=None,
                       help="vision encoder the folder will name (default openai/clip-vit-base-patch32)")
    to_hf.add_argument("--n-heads", type=int, default=None,
                       help=f"query heads (default {V1_NUM_HEADS}, or the folder's config.json)")
    to_v1 = commands.add_parser("to-v1", help="save_pretrained folder -> v1-layout .pth state dict")
    to_v1.add_argument("--model", required=True, help="folder written by save_pretrained / to-hf")
    to_v1.add_argument("--out", required=True, help=".pth file to write")
    args = parser.parse_args(argv)
    try:
        if args.command == "to-hf":
            tokenizer_dir = args.tokenizer
            if tokenizer_dir is None:
                if not (Path(args.pth).is_dir() and (Path(args.pth) / "tokenizer.json").is_file()):
                    parser.error("to-hf needs --tokenizer (the original project's tokenizer folder)")
                tokenizer_dir = args.pth
            convert_to_hf(args.pth, tokenizer_dir, args.out, args.vision_model, args.n_heads)
        else:
            convert_to_v1(args.model, args.out)
    except (ValueError, OSError) as err:  # bad or missing files: a message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
