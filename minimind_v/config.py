"""Model configurations: the MiniMind decoder's hyper-parameters and the named presets.

The presets follow the original project: ``small`` (dim 512, 8 layers, ~27M parameters) and
``base`` (dim 768, 16 layers, ~109M). ``tiny`` is the book's embedded default, small enough to
train on a laptop CPU in minutes.
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

# The label of tokens that carry no loss (PyTorch cross-entropy's ignore_index); the one
# definition the tokenizer's labels and the model's loss share.
IGNORE_INDEX = -100

# The attention implementations the decoder has: PyTorch's fused kernel, or written out
# (slower, and able to return the attention weights). transformers' ``attn_implementation``
# chooses between them, as for any of its models.
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")

PRESETS: dict[str, dict] = {
    # The book's offline default: trains in minutes on two CPU cores.
    "tiny": dict(dim=128, n_layers=4, n_heads=4, n_kv_heads=4),
    # The original MiniMind-V sizes.
    "small": dict(dim=512, n_layers=8, n_heads=16, n_kv_heads=8),
    "base": dict(dim=768, n_layers=16, n_heads=16, n_kv_heads=8),
}


def swiglu_hidden_dim(dim: int, multiple_of: int = 64) -> int:
    """The feed-forward width: 8/3 of ``dim`` (SwiGLU's three matrices cost what a 4x MLP's two
    do), rounded up to a multiple of ``multiple_of`` for efficient matmuls."""
    return multiple_of * math.ceil((8 * dim / 3) / multiple_of)


class MiniMindConfig(PretrainedConfig):
    """Hyper-parameters of the MiniMind decoder (RMSNorm, RoPE, GQA, SwiGLU, optional MoE).

    The original's names (``dim``, ``n_layers``, ``n_heads``, ``n_kv_heads``) are the fields;
    transformers' generic names (``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
    ``num_key_value_heads``) read and write the same values through ``attribute_map``, so its
    utilities (generate, caches) find them and the two can never disagree.

    The attention implementation is transformers' ``attn_implementation`` ("sdpa", the default,
    or "eager"), chosen as for any of its models: ``from_pretrained(..., attn_implementation=...)``,
    ``model.set_attn_implementation(...)`` or ``MiniMindConfig(attn_implementation=...)``.
    ``attention=`` (and ``config.attention``) is the older name of the same setting, kept so
    that folders saved with it load unchanged.
    """

    model_type = "minimind"
    attribute_map = {
        "hidden_size": "dim",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
    }

    def __init__(
        self,
        vocab_size: int = 6400,
        dim: int = 512,
        n_layers: int = 8,
        n_heads: int = 16,
        n_kv_heads: int = 8,
        hidden_dim: int | None = None,
        multiple_of: int = 64,
        norm_eps: float = 1e-5,
        rope_theta: float = 1e4,
        max_position_embeddings: int = 1024,
        dropout: float = 0.0,
        attention: str | None = None,
        use_moe: bool = False,
        n_routed_experts: int = 4,
        num_experts_per_tok: int = 2,
        n_shared_experts: int = 1,
        norm_topk_prob: bool = True,
        aux_loss_alpha: float = 0.1,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        bos_token_id: int = 1,
        eos_token_id: int = 2,
        pad_token_id: int = 0,
        **kwargs,
    ):
        # transformers' names, when given (older config.json files hold both spellings), are the
        # same fields: read them before the checks so that every derived value follows them.
        dim = kwargs.pop("hidden_size", dim)
        n_layers = kwargs.pop("num_hidden_layers", n_layers)
        n_heads = kwargs.pop("num_attention_heads", n_heads)
        n_kv_heads = kwargs.pop("num_key_value_heads", n_kv_heads)
        if dim % n_heads:
            raise ValueError(f"dim ({dim}) must be divisible by n_heads ({n_heads})")
        if n_heads % n_kv_heads:
            raise ValueError(
                f"n_kv_heads ({n_kv_heads}) must divide n_heads ({n_heads}): each key/value "
                "head is shared by a whole group of query heads"
            )
        if (dim // n_heads) % 2:
            raise ValueError(f"head size dim/n_heads = {dim // n_heads} must be even for RoPE")
        implementation = kwargs.get("attn_implementation")
        if implementation is None and attention is not None:
            implementation = kwargs["attn_implementation"] = attention
        check_attn_implementation(implementation)
        if use_moe and not 1 <= num_experts_per_tok <= n_routed_experts:
            raise ValueError(
                f"num_experts_per_tok ({num_experts_per_tok}) must be between 1 and "
                f"n_routed_experts ({n_routed_experts})"
            )
        self.vocab_size = vocab_size
        self.dim = dim
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.multiple_of = multiple_of
        self.hidden_dim = hidden_dim or swiglu_hidden_dim(dim, multiple_of)
        self.norm_eps = norm_eps
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.dropout = dropout
        self.use_moe = use_moe
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_shared_experts = n_shared_experts
        self.norm_topk_prob = norm_topk_prob
        self.aux_loss_alpha = aux_loss_alpha
        self.use_cache = use_cache
        super().__init__(
            tie_word_embeddings=tie_word_embeddings,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def attention(self) -> str:
        """The attention implementation in use: "sdpa" (also when none was chosen yet) or "eager"."""
        return self._attn_implementation or "sdpa"

    @attention.setter
    def attention(self, value: str) -> None:
        check_attn_implementation(value)
        self._attn_implementation = value


def check_attn_implementation(implementation) -> None:
    """ValueError unless ``implementation`` is None (the default, sdpa) or one the decoder has."""
    if implementation is not None and implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {ATTENTION_IMPLEMENTATIONS} (the MiniMind decoder's own "
            f"attention: fused, or written out with its weights), got {implementation!r}"
        )


def config_from_preset(name: str, **overrides) -> MiniMindConfig:
    """A :class:`MiniMindConfig` for a named size (``tiny``, ``small``, ``base``), with overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return MiniMindConfig(**{**PRESETS[name], **overrides})
