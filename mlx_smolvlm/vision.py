"""The SigLIP vision tower of SmolVLM (``model.vision_model`` in Hugging Face checkpoints)."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .config import VisionConfig
from .device_ops import attention, gelu_tanh


def torch_arange_f32(start: float, stop: float, step: float) -> np.ndarray:
    """Reproduce ``torch.arange(start, stop, step)`` (float32, CPU) bit for bit.

    transformers buckets patch coordinates against these boundaries, and an ulp of difference
    moves a patch to the neighbouring position id. torch evaluates ``start + step * i`` in
    double, except that whole blocks of 16 are filled as two 8-wide vectors, each from its
    float32-rounded first element plus ``k * step``.

    Args:
        start: First value.
        stop: Exclusive end.
        step: Increment.
    """
    length = math.ceil((stop - start) / step)
    out = (start + step * np.arange(length)).astype(np.float32)
    n_vec = length // 16 * 16
    i = np.arange(n_vec)
    base = (start + step * (i // 8 * 8)).astype(np.float32).astype(np.float64)
    out[:n_vec] = (base + (i % 8) * step).astype(np.float32)
    return out


class VisionEmbeddings(nn.Module):
    """Patch embedding plus position embeddings bucketed to each image's valid patch area."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.patch_size = config.patch_size
        self.num_patches_per_side = config.num_patches_per_side
        self.patch_embedding = nn.Conv2d(
            config.num_channels,
            config.hidden_size,
            kernel_size=config.patch_size,
            stride=config.patch_size,
        )
        self.position_embedding = nn.Embedding(self.num_patches_per_side**2, config.hidden_size)
        n = self.num_patches_per_side
        # Leading underscore: a constant, not a parameter.
        self._boundaries = mx.array(torch_arange_f32(1 / n, 1.0, 1 / n))

    def position_ids(self, patch_attention_mask: mx.array) -> mx.array:
        """Position ids of each patch, as transformers' ``SmolVLMVisionEmbeddings`` computes them.

        The valid ``h x w`` area of every image is spread over the full ``n x n`` position grid;
        padding patches get id 0.

        Args:
            patch_attention_mask: ``(N, h_patches, w_patches)`` bool, True for valid patches.

        Returns:
            ``(N, h_patches * w_patches)`` int32 position ids.
        """
        N, H, W = patch_attention_mask.shape
        mask = patch_attention_mask.astype(mx.int32)
        step_h = 1.0 / mask[:, :, 0].sum(axis=1).astype(mx.float32)  # (N,)
        step_w = 1.0 / mask[:, 0, :].sum(axis=1).astype(mx.float32)  # (N,)
        frac_h = mx.minimum(mx.arange(H, dtype=mx.float32)[None] * step_h[:, None], 1.0 - 1e-6)
        frac_w = mx.minimum(mx.arange(W, dtype=mx.float32)[None] * step_w[:, None], 1.0 - 1e-6)
        # torch.bucketize(right=True): the number of boundaries <= x.
        bucket_h = (frac_h[..., None] >= self._boundaries).sum(axis=-1)  # (N, H)
        bucket_w = (frac_w[..., None] >= self._boundaries).sum(axis=-1)  # (N, W)
        pos = bucket_h[:, :, None] * self.num_patches_per_side + bucket_w[:, None, :]
        pos = pos.reshape(N, H * W).astype(mx.int32)
        return mx.where(patch_attention_mask.reshape(N, H * W), pos, 0)

    def __call__(self, pixel_values: mx.array, patch_attention_mask: mx.array) -> mx.array:
        """Embed ``(N, H, W, C)`` channels-last pixels into ``(N, h*w, hidden)`` patch tokens."""
        patches = self.patch_embedding(pixel_values)  # (N, h, w, hidden)
        N, h, w, D = patches.shape
        embeddings = patches.reshape(N, h * w, D)
        return embeddings + self.position_embedding(self.position_ids(patch_attention_mask))


class Attention(nn.Module):
    """Bidirectional multi-head attention."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, D) -> (B, n_heads, L, head_dim)
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_heads, -1).transpose(0, 2, 1, 3)
        out = attention(q, k, v, self.scale, mask)
        return self.out_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class MLP(nn.Module):
    """Two linear layers with tanh-approximated GELU (``gelu_pytorch_tanh``)."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(gelu_tanh(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        h = x + self.self_attn(self.layer_norm1(x), mask)
        return h + self.mlp(self.layer_norm2(h))


class Encoder(nn.Module):
    """The stack of encoder layers."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.layers = [EncoderLayer(config) for _ in range(config.num_hidden_layers)]

    def __call__(self, x: mx.array, mask: mx.array | None = None) -> mx.array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


def _is_torch_conv_layout(weight: mx.array) -> bool:
    """Whether a patch convolution is (out, in, k, k) rather than channels-last (out, k, k, in).

    The kernel is square and has more taps per side than the image has channels, so the two
    layouts differ in which pair of axes is equal.
    """
    return weight.ndim == 4 and weight.shape[2] == weight.shape[3] != weight.shape[1]


class VisionModel(nn.Module):
    """SigLIP encoder over variable-resolution (padded) images."""

    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def __call__(self, pixel_values: mx.array, patch_attention_mask: mx.array) -> mx.array:
        """Encode images.

        Args:
            pixel_values: ``(N, H, W, C)`` channels-last pixels.
            patch_attention_mask: ``(N, H // patch, W // patch)`` bool, True for valid patches.

        Returns:
            ``(N, (H // patch) * (W // patch), hidden)`` hidden states.
        """
        x = self.embeddings(pixel_values, patch_attention_mask)
        N = x.shape[0]
        mask = None
        if not patch_attention_mask.all().item():
            # Padding patches are masked out as keys: (N, 1, 1, L) broadcast over heads and queries.
            mask = patch_attention_mask.reshape(N, 1, 1, -1)
        return self.post_layernorm(self.encoder(x, mask))

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Convert checkpoint tensors of the vision tower to MLX layouts.

        Args:
            weights: Checkpoint tensors under our names (``weight_names.from_checkpoint_names``).
        """
        out = {}
        for k, v in weights.items():
            if k.endswith("embeddings.position_ids"):
                continue  # a buffer some checkpoints saved; recomputed from the mask here
            if k.endswith("patch_embedding.weight") and _is_torch_conv_layout(v):
                # PyTorch Conv2d weights are (out, in, kH, kW); MLX Conv2d is channels-last and
                # wants (out, kH, kW, in). MLX exports (ours, mlx-vlm's) are already so.
                v = v.transpose(0, 2, 3, 1)
            out[k] = v
        return out

    @staticmethod
    def unsanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Inverse of ``sanitize``: MLX layouts back to PyTorch ones.

        Args:
            weights: Model parameters under our names.
        """
        return {
            k: v.transpose(0, 3, 1, 2) if k.endswith("patch_embedding.weight") else v
            for k, v in weights.items()
        }
