"""The MiniMind decoder: a Llama-style language model small enough to read in one sitting.

RMSNorm -> grouped-query attention with rotary positions -> RMSNorm -> SwiGLU (or a
mixture of SwiGLU experts), repeated ``n_layers`` times, with the output head tied to the token
embeddings. Parameter names follow the original MiniMind code (``tok_embeddings``,
``layers.{i}.attention.wq`` ...), so its checkpoints map onto this model by name.

It is a transformers ``PreTrainedModel``: ``save_pretrained`` / ``from_pretrained`` (safetensors)
and ``generate`` (greedy, sampling, top-k, top-p, repetition penalty, streamers) work as usual, and
``attn_implementation`` ("sdpa" or "eager") chooses the attention path as for any transformers model.
Importing ``minimind_v`` registers it with ``AutoConfig`` / ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..config import IGNORE_INDEX, MiniMindConfig, check_attn_implementation
from .decoding import GrowingCache, RowLinear, decode_one_row, greedy_one_row, row_decoding, same_input
from .folders import check_model_folder, load_hub_id, looks_like_local_path


class RMSNorm(nn.Module):
    """Scale each vector to unit root-mean-square, then by a learned gain (no mean, no bias)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32: the mean of squares overflows/underflows easily in half precision.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def rope_tables(head_dim: int, max_positions: int, theta: float = 1e4):
    """cos/sin of angle ``pos * theta^(-2i/head_dim)`` for each position and pair i: (T, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2i], x[2i+1]) of every head by its position's angle.

    x: (B, H, T, head_dim); cos, sin: (B or 1, 1, T, head_dim/2). This is the original RoPE
    (and MiniMind v1) form: pairs are adjacent features, as in a complex number x[2i] + i*x[2i+1].
    Computed in float32, returned in x's dtype.
    """
    pairs = x.float().unflatten(-1, (-1, 2))  # (B, H, T, hd/2, 2): (x1, x2) in the last dim
    if pairs.stride(-1) != 1 or pairs.storage_offset() % 2:
        pairs = pairs.contiguous()
    # (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin) + i (x2 cos + x1 sin): the rotation as one complex
    # product, bit for bit the written-out one, in one pass over x where the written-out form takes
    # four (it runs twice per layer per step).
    rotated = torch.view_as_complex(pairs) * torch.complex(cos.float(), sin.float())
    return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


def attention_dtype(q: torch.Tensor, eager: bool) -> torch.dtype | None:
    """float32 where the fused attention must run in it: under bfloat16 autocast on a CPU, whose
    bfloat16 kernel's backward is slower there than the float32 one (the products around it stay in
    bfloat16). None: q's own dtype."""
    if not eager and q.device.type == "cpu" and q.dtype == torch.bfloat16 and torch.is_autocast_enabled("cpu"):
        return torch.float32
    return None


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd): each key/value head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions and an optional key/value cache."""

    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = RowLinear(config.dim, config.n_heads * self.head_dim, bias=False)
        self.wk = RowLinear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = RowLinear(config.dim, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = RowLinear(config.n_heads * self.head_dim, config.dim, bias=False)
        self.dropout = config.dropout

    def forward(self, x, cos, sin, mask, cache=None, eager=False):
        B, T, _ = x.shape
        # (B, T, dim) -> (B, heads, T, head_dim)
        q, k, v = same_input(x, self.wq, self.wk, self.wv)  # one product when decoding one row
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Rotated in float32 and rounded back to q's dtype before any cast: the numbers every recorded
        # run trained with (rotating straight into float32 would skip that rounding and change them).
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        dtype = attention_dtype(q, eager)
        if dtype is not None:
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        if cache is not None:  # append this step's keys/values, get the whole history
            k, v = cache.update(k, v, self.layer_idx)
        n_rep = self.n_heads // self.n_kv_heads
        dropout = self.dropout if self.training else 0.0
        if eager:
            # Written out, so the attention weights can be returned and drawn.
            k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
            scores = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (B, H, T, S)
            if mask is None:
                mask = torch.ones(T, k.shape[2], dtype=torch.bool, device=x.device).tril(k.shape[2] - T)
            scores = scores.masked_fill(~mask, float("-inf"))
            weights = F.softmax(scores.float(), dim=-1).type_as(q)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            with torch.autocast("cpu", enabled=False) if dtype is not None else nullcontext():
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and T > 1,
                    enable_gqa=n_rep > 1,
                )
        out = out.transpose(1, 2).reshape(B, T, -1)  # (B, H, T, hd) -> (B, T, dim)
        return self.wo(out), weights


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.w1 = RowLinear(config.dim, config.hidden_dim, bias=False)
        self.w2 = RowLinear(config.hidden_dim, config.dim, bias=False)
        self.w3 = RowLinear(config.dim, config.hidden_dim, bias=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        gate, up = same_input(x, self.w1, self.w3)  # one product when decoding one row
        return self.dropout(self.w2(F.silu(gate) * up))


class MoEGate(nn.Module):
    """Routes each token to its top-k experts with softmax scores."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_experts = config.n_routed_experts
        self.norm_topk_prob = config.norm_topk_prob
        self.alpha = config.aux_loss_alpha
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.dim))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)

    def forward(self, x: torch.Tensor):
        """x: (N, dim) -> expert indices (N, k), routing weights (N, k), auxiliary loss."""
        scores = F.linear(x.float(), self.weight.float()).softmax(dim=-1)  # (N, E)
        topk_weight, topk_idx = scores.topk(self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
        aux_loss = scores.new_zeros(())
        if self.training and self.alpha > 0:
            # Switch-style balance loss: E * sum_e (fraction of routings to e) * (mean score of e);
            # it is smallest when tokens are spread evenly over the experts.
            load = F.one_hot(topk_idx, self.n_experts).float().mean(dim=(0, 1))  # (E,)
            importance = scores.mean(dim=0)  # (E,)
            aux_loss = self.alpha * self.n_experts * (load * importance).sum()
        return topk_idx, topk_weight.type_as(x), aux_loss


class MoEFeedForward(nn.Module):
    """A mixture of SwiGLU experts: each token goes to its top-k routed experts, plus a shared one."""

    def __init__(self, config: MiniMindConfig):
        super().__init__()
        self.experts = nn.ModuleList(FeedForward(config) for _ in range(config.n_routed_experts))
        self.gate = MoEGate(config)
        self.shared_experts = FeedForward(config) if config.n_shared_experts else None
        self.aux_loss = None

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, dim)
        idx, weight, self.aux_loss = self.gate(flat)
        out = torch.zeros_like(flat)
        # One batched call per expert on the tokens routed to it (a loop over experts, not tokens).
        for e, expert in enumerate(self.experts):
            token, slot = (idx == e).nonzero(as_tuple=True)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weight[token, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(shape)


class TransformerBlock(nn.Module):
    def __init__(self, config: MiniMindConfig, layer_idx: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_idx)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = MoEFeedForward(config) if config.use_moe else FeedForward(config)

    def forward(self, x, cos, sin, mask, cache=None, eager=False):
        h, weights = self.attention(self.attention_norm(x), cos, sin, mask, cache, eager)
        x = x + h
        return x + self.feed_forward(self.ffn_norm(x)), weights


@dataclass
class MiniMindOutput(CausalLMOutputWithPast):
    """transformers' causal-LM output plus the MoE load-balancing loss (zero for dense models)."""

    aux_loss: torch.FloatTensor | None = None


class MiniMindForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindConfig
    base_model_prefix = "minimind"
    main_input_name = "input_ids"
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}
    _no_split_modules = ["TransformerBlock"]
    _supports_sdpa = True

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = RowLinear(config.dim, config.vocab_size, bias=False)
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        # Derived from the config, so not saved with the weights.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, MiniMindForCausalLM):
            # Buffers are not in the checkpoint; rebuild them (from_pretrained may create them on "meta").
            cfg = module.config
            cos, sin = rope_tables(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta)
            module.rope_cos, module.rope_sin = cos.to(module.rope_cos.device), sin.to(module.rope_sin.device)

    # -- attention: transformers' attn_implementation, limited to the two this model has --
    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check: bool = False, **kwargs):
        # Refused before transformers looks further: any other name (flash, flex, a hub kernel)
        # would mean code this model does not have, or a download.
        check_attn_implementation(attn_implementation)
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, **kwargs)

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True  # forward reads config._attn_implementation at every call

    @property
    def uses_eager_attention(self) -> bool:
        """Whether the written-out attention runs (attn_implementation "eager") instead of the fused kernel."""
        return self.config._attn_implementation == "eager"

    # -- loading: local folders are checked first and read as safetensors only ----------
    @classmethod
    def folder_hints(cls, folder: str) -> dict[str, str]:
        """What to say when a folder of another model_type is given (model_type -> advice)."""
        return {"minimind_v": "load it with MiniMindVLM.from_pretrained or minimind_v.inference.load_vlm"}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, require_complete: bool = False, **kwargs):
        """transformers' ``from_pretrained``, safe for folders of unknown origin.

        A local folder is checked before anything is loaded: its config.json must name this
        class's model_type (else :class:`ModelFolderError` saying what the folder is), and its
        weights must be ``model.safetensors`` (``pytorch_model.bin`` is a pickle that could run
        code: refused). A folder with a training checkpoint but no ``complete.json`` gives an
        :class:`IncompleteModelWarning` (an error with ``require_complete=True``). A hub id is
        read from the cache, or from the hub when it answers; never ~20 s of retries offline.
        """

        source = os.fspath(pretrained_model_name_or_path)
        local = Path(source).expanduser()
        load = super().from_pretrained
        if local.exists() or looks_like_local_path(source):
            check_model_folder(local, (cls.config_class.model_type,), cls.folder_hints(source), require_complete)
            if kwargs.get("use_safetensors") is False:
                raise ValueError("this package loads model folders from safetensors only (use_safetensors=False refused)")
            kwargs.update(use_safetensors=True, weights_only=True)
            kwargs.setdefault("local_files_only", True)
            return load(str(local), *model_args, **kwargs)
        kwargs["weights_only"] = True  # a hub repo with only a .bin is read as data, never as code
        if "local_files_only" in kwargs:
            return load(source, *model_args, **kwargs)
        return load_hub_id(source, lambda **hub: load(source, *model_args, **kwargs, **hub),
                           f"{cls.__name__} model")

    # -- generation: never past the model's maximum length ------------------------------
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' ``generate``, with the answer capped to the positions the prompt leaves.

        RoPE tables end at ``max_position_embeddings``: a request for more new tokens than fit
        would stream part of an answer and then fail. It is cut to fit (with a warning) and ends
        cleanly at the limit; a prompt that alone fills the model is a ValueError.
        """
        prompt = inputs if inputs is not None else kwargs.get("input_ids")
        if prompt is None:
            prompt = kwargs.get("inputs_embeds")
            length = None if prompt is None else prompt.shape[1]
        else:
            length = prompt.shape[-1]
        if length is not None:
            limit = self.config.max_position_embeddings
            room = limit - length
            if room <= 0:
                raise ValueError(
                    f"the prompt has {length} tokens, but the model's maximum length (max_position_embeddings) "
                    f"is {limit}: no room is left for an answer; shorten the prompt"
                )
            config = generation_config if generation_config is not None else self.generation_config
            asked = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
            if asked is None:
                max_length = kwargs.get("max_length", getattr(config, "max_length", None))
                asked = None if max_length is None else max_length - length
            if asked is None or asked > room:
                if asked is not None:
                    warnings.warn(
                        f"max_new_tokens={asked} cut to {room}: the prompt has {length} tokens and the model's "
                        f"maximum length (max_position_embeddings) is {limit}", stacklevel=2,
                    )
                kwargs.pop("max_length", None)
                kwargs["max_new_tokens"] = room
        one_row = self._greedy_one_row_request(inputs, generation_config, kwargs)
        if (one_row is None and kwargs.get("use_cache", True) and kwargs.get("cache") is None
                and kwargs.get("past_key_values") is None):
            kwargs["cache"] = GrowingCache(self.config.n_layers)  # appends in place (decoding.py)
        # Batch-1 steps read the weights on every core (decoding.py); inference mode skips autograd's
        # bookkeeping on every operation.
        with row_decoding(self), torch.inference_mode():
            if one_row is not None:  # one prompt, greedy: the same tokens without transformers' loop
                out = greedy_one_row(self, **one_row)
            else:
                out = super().generate(inputs, generation_config, **kwargs)
        # A plain tensor again (inference tensors cannot enter a later autograd graph, e.g. as training ids).
        return out.clone() if torch.is_tensor(out) else out

    # What a batch-1 greedy request may carry and still take decoding.greedy_one_row; anything else
    # (sampling, beams, penalties, scores asked for, a generation config of the caller's) goes
    # through transformers' loop.
    _GREEDY_ONE_ROW_KWARGS = frozenset({"attention_mask", "image_tokens", "pixel_values", "max_new_tokens",
                                        "eos_token_id", "pad_token_id", "streamer", "do_sample",
                                        "suppress_tokens", "min_new_tokens", "use_cache",
                                        "prompt_lookup_num_tokens"})
    # Keys of this model's own generation config that leave greedy search as it is.
    _GREEDY_CONFIG_KEYS = frozenset({"bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                                     "output_attentions", "output_hidden_states", "_from_model_config",
                                     "transformers_version"})

    def _greedy_one_row_request(self, inputs, generation_config, kwargs) -> dict | None:
        """The arguments of ``decoding.greedy_one_row`` when this request is one prompt decoded
        greedily on the CPU with nothing transformers' loop would add; else None."""
        ids = inputs
        if (generation_config is not None or not torch.is_tensor(ids) or ids.dim() != 2 or ids.shape[0] != 1
                or ids.device.type != "cpu" or self.training or self.config.use_moe or self.uses_eager_attention
                or not set(kwargs) <= self._GREEDY_ONE_ROW_KWARGS
                or kwargs.get("do_sample") or kwargs.get("use_cache") is False
                or int(kwargs.get("max_new_tokens") or 0) < 1):
            return None
        own = self.generation_config.to_diff_dict()  # what this model's config sets apart from transformers' defaults
        if not set(own) <= self._GREEDY_CONFIG_KEYS or own.get("output_attentions") or own.get("output_hidden_states"):
            return None
        mask = kwargs.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            return None
        eos = kwargs.get("eos_token_id", self.generation_config.eos_token_id)
        return dict(input_ids=ids, max_new_tokens=int(kwargs["max_new_tokens"]),
                    eos_token_ids=[] if eos is None else torch.as_tensor(eos).flatten().tolist(),
                    suppress_tokens=kwargs.get("suppress_tokens") or (),
                    min_new_tokens=int(kwargs.get("min_new_tokens") or 0), streamer=kwargs.get("streamer"),
                    lookahead=int(kwargs.get("prompt_lookup_num_tokens") or 0),
                    **{k: kwargs[k] for k in ("attention_mask", "image_tokens", "pixel_values")  # for the prompt
                       if kwargs.get(k) is not None})

    def get_input_embeddings(self):
        return self.tok_embeddings

    def set_input_embeddings(self, value):
        self.tok_embeddings = value

    def get_output_embeddings(self):
        return self.output

    def set_output_embeddings(self, value):
        self.output = value

    def _one_row_step(self, h, mask, cache, inspecting: bool) -> bool:
        """Is this one new token of one sequence, decoded inside ``row_decoding`` (decoding.py)?"""
        return (h.shape[:2] == (1, 1) and mask is None and not inspecting and not self.training
                and not self.config.use_moe and isinstance(cache, GrowingCache) and self.output.takes_row_path(h))

    def _attention_mask(self, attention_mask, T, S, past_len, device, outputs_at_padding_unused=False):
        """Boolean (B, 1, T, S) mask, or None when none is needed: plain causal attention from position 0,
        or one new token (it sees every key) without padding, or right padding whose outputs nobody reads."""
        if attention_mask is None and past_len == 0:
            return None  # lets the fused kernel use its own causal path
        if outputs_at_padding_unused and past_len == 0 and bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all()):
            # Padding only on the right: a real token's causal window holds no padding, so plain causal
            # attention gives it the same output, and the kernel skips the blocks above the diagonal
            # (an explicit mask makes it compute them all). Only the padding's own outputs change.
            return None
        if T == 1 and (attention_mask is None or bool(attention_mask[:, :S].all())):
            return None  # one new token sees every key: nothing to mask (decoding without padding)
        q_pos = torch.arange(past_len, past_len + T, device=device)
        causal = torch.arange(S, device=device)[None, :] <= q_pos[:, None]  # (T, S)
        mask = causal[None, None]
        if attention_mask is not None:
            mask = mask & attention_mask[:, None, None, :S].bool()
            # A left-padding query sees no key at all; let it see itself so softmax stays finite.
            own_position = torch.arange(S, device=device)[None, :] == q_pos[:, None]  # (T, S)
            mask = mask | own_position[None, None]
        return mask

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> MiniMindOutput:
        """Next-token logits, and the loss when ``labels`` are given.

        ``labels`` are the input ids with ignored positions set to -100; they are shifted here.
        With labels, logits are computed only at the positions that carry a loss (the output head
        is the most expensive matmul of a small model), and ``logits`` is returned as None.
        ``output_attentions=True`` runs the eager attention path and returns each layer's
        (B, heads, T, S) attention weights.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.tok_embeddings(input_ids)
        B, T, _ = inputs_embeds.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None and not self.training:
            cache = GrowingCache(self.config.n_layers)
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=inputs_embeds.device)[None]
        max_pos = self.config.max_position_embeddings
        if past_len + T > max_pos or int(position_ids.max()) >= max_pos:
            raise ValueError(
                f"sequence of {past_len + T} tokens is longer than the model's maximum length "
                f"max_position_embeddings={max_pos}"
            )
        cos = self.rope_cos[position_ids][:, None]  # (B or 1, 1, T, hd/2)
        sin = self.rope_sin[position_ids][:, None]
        eager = output_attentions or self.uses_eager_attention
        # With labels, only positions that carry a target are read, and padding never does (but a mixture
        # of experts' balance loss counts every position's routing, padding included).
        padding_unused = labels is not None and not (output_hidden_states or eager or self.config.use_moe)
        mask = self._attention_mask(attention_mask, T, past_len + T, past_len, inputs_embeds.device,
                                    outputs_at_padding_unused=padding_unused)

        h = self.dropout(inputs_embeds)
        all_attn, all_hidden = [], []
        if self._one_row_step(h, mask, cache, eager or output_hidden_states):
            h = decode_one_row(self, h, cos.view(-1), sin.view(-1), cache)  # the same layers, fewer calls
        else:
            for layer in self.layers:
                if output_hidden_states:
                    all_hidden.append(h)
                h, weights = layer(h, cos, sin, mask, cache, eager)
                all_attn.append(weights)
        h = self.norm(h)
        if output_hidden_states:
            all_hidden.append(h)

        aux_loss = sum(
            (l.feed_forward.aux_loss for l in self.layers if self.config.use_moe),
            h.new_zeros(()),
        )
        loss, logits = None, None
        if labels is not None:
            # Position t predicts token t+1; keep only the positions where a target exists.
            targets = labels[:, 1:]
            keep = targets != IGNORE_INDEX  # (B, T-1)
            selected = self.output(h[:, :-1][keep])  # (n_targets, vocab)
            loss = F.cross_entropy(selected.float(), targets[keep]) if keep.any() else h.sum() * 0
            loss = loss + aux_loss
        else:
            logits = self.output(h[:, -logits_to_keep:] if logits_to_keep else h)
        return MiniMindOutput(
            loss=loss,
            logits=logits,
            cache=cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
            aux_loss=aux_loss,
        )
