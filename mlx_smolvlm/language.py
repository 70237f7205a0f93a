"""The Llama decoder of SmolVLM (``model.text_model`` in Hugging Face checkpoints)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import KVCache
from .config import TextConfig
from .device_ops import Rotary, attention, silu_mul
from .quantized_matvec import decode_layers, layer_plans, project


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        dim = config.hidden_size
        bias = config.attention_bias
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=bias)

    def __call__(
        self,
        x: mx.array,
        rotary: Rotary,
        mask: mx.array | str | None = None,
        cache: KVCache | None = None,
    ) -> mx.array:
        B, L, _ = x.shape
        # (B, L, n_heads * head_dim) -> (B, n_heads, L, head_dim)
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.reshape(B, L, self.n_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = k.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = v.reshape(B, L, self.n_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q, k = rotary(q), rotary(k)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask)
        return project(out.transpose(0, 2, 1, 3).reshape(B, L, -1), self.o_proj)[0]


class MLP(nn.Module):
    """SwiGLU feed-forward block."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        dim, hidden, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = project(x, self.gate_proj, self.up_proj)
        return project(silu_mul(gate, up), self.down_proj)[0]


class DecoderLayer(nn.Module):
    """Pre-norm decoder block."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self,
        x: mx.array,
        rotary: Rotary,
        mask: mx.array | str | None = None,
        cache: KVCache | None = None,
    ) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), rotary, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """Token embeddings, decoder layers and the final norm (no ``lm_head``)."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def __call__(
        self,
        inputs_embeds: mx.array,
        mask: mx.array | None = None,
        cache: list[KVCache] | None = None,
    ) -> mx.array:
        """Run the decoder on ``(B, L, hidden)`` embeddings.

        Args:
            inputs_embeds: ``(B, L, hidden)`` input embeddings.
            mask: Optional attention mask broadcastable to ``(B, n_heads, L, offset + L)``,
                boolean (True attends) or additive. Defaults to causal.
            cache: One ``KVCache`` per layer, or None for a cache-free pass.

        Returns:
            ``(B, L, hidden)`` final hidden states.
        """
        h = inputs_embeds
        if mask is None and h.shape[1] > 1:
            # MLX aligns the causal mask lower-right, so it also holds after a cached prefix.
            mask = "causal"
        layer_caches = cache if cache is not None else [None] * len(self.layers)
        # transformers' Llama rotates the two halves of each head (`rotate_half`), which is
        # MLX's non-traditional RoPE. Every layer's cache is at the same positions.
        offset = 0 if cache is None else cache[0].offset
        cfg = self.config
        plans = None if cache is None else layer_plans(self.layers, h, mask, cache)
        if plans is not None:
            h = decode_layers(plans, cfg, h, mask, cache, offset)
        else:
            rotary = Rotary(cfg.head_dim, cfg.rope_theta, offset, h.shape[1])
            for layer, layer_cache in zip(self.layers, layer_caches, strict=True):
                h = layer(h, rotary, mask, layer_cache)
        return self.norm(h)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Drop RoPE buffers that old checkpoints saved; RoPE is recomputed here.

        Args:
            weights: Checkpoint tensors under our names (``weight_names.from_checkpoint_names``).
        """
        return {k: v for k, v in weights.items() if not k.endswith("rotary_emb.inv_freq")}
