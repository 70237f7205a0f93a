"""SmolVLM / Idefics3: vision tower, pixel-shuffle connector and Llama decoder."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .cache import KVCache
from .config import TEXT_ONLY_ERROR, ModelConfig
from .language import TextModel
from .quantized_matvec import project
from .vision import VisionModel
from .weight_names import from_checkpoint_names, to_hf_names


class ModalityProjection(nn.Module):
    """Linear map from shuffled vision features to the decoder width."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        in_dim = config.vision_config.hidden_size * config.scale_factor**2
        self.proj = nn.Linear(in_dim, config.text_config.hidden_size, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.proj(x)


class Connector(nn.Module):
    """Pixel shuffle (space-to-depth by ``scale_factor``) followed by the projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.scale_factor = config.scale_factor
        self.modality_projection = ModalityProjection(config)

    def pixel_shuffle(self, x: mx.array) -> mx.array:
        """Fold each ``s x s`` block of patches into one token, as transformers does.

        Args:
            x: ``(N, side * side, D)`` patch features of square patch grids.

        Returns:
            ``(N, (side / s) ** 2, D * s * s)`` features.

        Raises:
            ValueError: If the patch grid is not square or ``s`` does not divide its side.
        """
        s = self.scale_factor
        N, L, D = x.shape
        side = math.isqrt(L)
        if side * side != L or side % s:
            raise ValueError(
                f"The connector needs a square patch grid whose side is divisible by scale_factor "
                f"{s}; got {L} patches per image (pad images to a square multiple of "
                f"{s} patches)"
            )
        x = x.reshape(N, side, side // s, D * s)  # merge s neighbours along a row
        x = x.transpose(0, 2, 1, 3)  # (N, side / s, side, D * s)
        x = x.reshape(N, side // s, side // s, D * s * s)  # merge s neighbours along a column
        x = x.transpose(0, 2, 1, 3)  # back to row-major (N, rows, cols, D * s * s)
        return x.reshape(N, L // (s * s), D * s * s)

    def __call__(self, x: mx.array) -> mx.array:
        return self.modality_projection(self.pixel_shuffle(x))


def _as_array(x: mx.array | np.ndarray, name: str) -> mx.array:
    """Accept NumPy or MLX input."""
    if isinstance(x, mx.array):
        return x
    if isinstance(x, np.ndarray):
        return mx.array(x)
    raise TypeError(f"{name} must be an mlx or numpy array, got {type(x).__name__}")


class Model(nn.Module):
    """The vision-language model; parameter names follow Hugging Face minus the ``model.`` prefix."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        if config.vision_config is not None:
            self.vision_model = VisionModel(config.vision_config)
            self.connector = Connector(config)
        self.text_model = TextModel(config.text_config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(
                config.text_config.hidden_size, config.text_config.vocab_size, bias=False
            )

    def encode_images(
        self,
        pixel_values: mx.array | np.ndarray,
        pixel_attention_mask: mx.array | np.ndarray | None = None,
    ) -> mx.array:
        """Vision tower plus connector for the real (not all-zero) images of a batch.

        Args:
            pixel_values: ``(B, n_images, C, H, W)`` as Hugging Face processors produce them,
                any float dtype; cast to the model's dtype.
            pixel_attention_mask: ``(B, n_images, H, W)`` bool/int, nonzero on valid pixels.
                Defaults to all valid.

        Returns:
            ``(n_real_images, image_seq_len, text_hidden)`` features, batch-major.

        Raises:
            ValueError: If shapes do not match each other or the vision config, or the model
                is text only.
        """
        if self.config.vision_config is None:
            raise ValueError(TEXT_ONLY_ERROR)
        pixel_values = _as_array(pixel_values, "pixel_values")
        vcfg = self.config.vision_config
        if pixel_values.ndim != 5 or pixel_values.shape[2] != vcfg.num_channels:
            raise ValueError(
                f"pixel_values must be (batch, images, {vcfg.num_channels}, height, width); "
                f"got shape {tuple(pixel_values.shape)}"
            )
        B, n_images, C, H, W = pixel_values.shape
        dtype = self.vision_model.embeddings.patch_embedding.weight.dtype
        pixels = pixel_values.astype(dtype).reshape(B * n_images, C, H, W)

        # Padding images are all zeros; transformers drops them before the vision tower.
        real = np.array(mx.any(pixels != 0, axis=(1, 2, 3)))
        if self.config.model_type == "smolvlm" and real.size and not real.any():
            # SmolVLM (unlike Idefics3) keeps the first image when every image is padding.
            real[0] = True
        if not real.any():
            return mx.zeros(
                (0, self.config.image_seq_len, self.config.text_config.hidden_size), dtype
            )
        keep = mx.array(np.flatnonzero(real))
        pixels = pixels[keep]

        if pixel_attention_mask is None:
            pixel_mask = mx.ones((pixels.shape[0], H, W), dtype=mx.bool_)
        else:
            pixel_mask = _as_array(pixel_attention_mask, "pixel_attention_mask")
            if tuple(pixel_mask.shape) != (B, n_images, H, W):
                raise ValueError(
                    f"pixel_attention_mask has shape {tuple(pixel_mask.shape)}, expected "
                    f"{(B, n_images, H, W)} to match pixel_values"
                )
            pixel_mask = pixel_mask.reshape(B * n_images, H, W)[keep] != 0

        # A patch is valid if any of its pixels is (transformers' unfold + sum > 0).
        p = vcfg.patch_size
        h, w = H // p, W // p
        patch_mask = pixel_mask[:, : h * p, : w * p].reshape(-1, h, p, w, p).any(axis=(2, 4))

        # MLX convolutions are channels-last: (N, C, H, W) -> (N, H, W, C).
        hidden = self.vision_model(pixels.transpose(0, 2, 3, 1), patch_mask)
        return self.connector(hidden)

    def _merge_image_features(
        self, input_ids: mx.array, inputs_embeds: mx.array, image_features: mx.array
    ) -> mx.array:
        """Write image features, in order, over the ``<image>`` token embeddings."""
        B, L, D = inputs_embeds.shape
        features = image_features.reshape(-1, image_features.shape[-1])
        is_image = input_ids.reshape(-1) == self.config.image_token_id
        n_tokens = int(is_image.sum().item())
        if n_tokens != features.shape[0] or features.shape[1] != D:
            raise ValueError(
                f"Image features and <image> tokens do not match: input_ids has {n_tokens} "
                f"<image> tokens (id {self.config.image_token_id}) but the images give "
                f"{features.shape[0]} feature rows of width {features.shape[1]} "
                f"({tuple(image_features.shape)}; the decoder width is {D})"
            )
        # Row i of `features` goes to the i-th image token (batch-major order).
        index = mx.maximum(mx.cumsum(is_image.astype(mx.int32)) - 1, 0)
        gathered = features.astype(inputs_embeds.dtype)[index]
        merged = mx.where(is_image[:, None], gathered, inputs_embeds.reshape(B * L, D))
        return merged.reshape(B, L, D)

    def __call__(
        self,
        input_ids: mx.array | np.ndarray,
        pixel_values: mx.array | np.ndarray | None = None,
        pixel_attention_mask: mx.array | np.ndarray | None = None,
        cache: list[KVCache] | None = None,
        image_features: mx.array | None = None,
        mask: mx.array | None = None,
        logits_to_keep: int | None = None,
    ) -> mx.array:
        """Logits for ``input_ids``, with images scattered into the ``<image>`` positions.

        Args:
            input_ids: ``(B, L)`` token ids, checked to lie in the vocabulary unless they are a
                single-token MLX array (the decoding hot path).
            pixel_values: ``(B, n_images, C, H, W)`` images (see ``encode_images``).
            pixel_attention_mask: ``(B, n_images, H, W)`` valid-pixel mask.
            cache: From ``make_cache()``; updated in place.
            image_features: Output of ``encode_images``, instead of ``pixel_values``.
            mask: Optional decoder attention mask broadcastable to
                ``(B, n_heads, L, cache_offset + L)``, boolean or additive; default causal.
            logits_to_keep: Only compute the logits of the last this many positions (1 during
                generation: the head over a long prompt is a large share of prefill).

        Returns:
            ``(B, L, vocab)`` logits (``(B, logits_to_keep, vocab)`` when given).

        Raises:
            ValueError: On malformed inputs, or when the number of ``<image>`` tokens differs
                from the number of image feature rows.
        """
        is_mlx = isinstance(input_ids, mx.array)
        input_ids = _as_array(input_ids, "input_ids")
        if input_ids.ndim != 2 or not mx.issubdtype(input_ids.dtype, mx.integer):
            raise ValueError(
                f"input_ids must be integer (batch, tokens); got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        # Out-of-range ids would gather garbage embeddings. The check synchronizes, so a
        # one-token MLX step (a sampled token during decoding) skips it.
        vocab = self.config.text_config.vocab_size
        if input_ids.shape[1] > 1 or not is_mlx:
            if input_ids.size and not ((input_ids.min() >= 0) & (input_ids.max() < vocab)).item():
                raise ValueError(f"input_ids has token ids outside the vocabulary [0, {vocab})")
        if pixel_values is not None and image_features is not None:
            raise ValueError("Pass either pixel_values or image_features, not both")
        inputs_embeds = self.text_model.embed_tokens(input_ids)
        if pixel_values is not None:
            image_features = self.encode_images(pixel_values, pixel_attention_mask)
        if image_features is not None:
            image_features = _as_array(image_features, "image_features")
            inputs_embeds = self._merge_image_features(input_ids, inputs_embeds, image_features)
        h = self.text_model(inputs_embeds, mask=mask, cache=cache)
        if logits_to_keep is not None:
            h = h[:, -logits_to_keep:]
        tied = self.config.tie_word_embeddings
        return project(h, self.text_model.embed_tokens if tied else self.lm_head)[0]

    def make_cache(self) -> list[KVCache]:
        """One empty ``KVCache`` per decoder layer."""
        return [KVCache() for _ in self.text_model.layers]

    def parameter_count(self) -> int:
        """Number of parameters (elements), without evaluating lazy arrays."""
        return sum(v.size for _, v in tree_flatten(self.parameters()))

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint tensors onto this model's parameter names and layouts.

        Args:
            weights: Tensors keyed by Hugging Face names (``model.text_model...``,
                ``lm_head.weight``) or exported ones (``language_model...``).

        Raises:
            ValueError: If the config ties ``lm_head`` to the embeddings but the checkpoint
                carries a different ``lm_head.weight``.
        """
        weights = from_checkpoint_names(weights)
        if self.config.tie_word_embeddings and "lm_head.weight" in weights:
            # Tied checkpoints saved by torch.save may still carry the shared tensor twice.
            head = weights.pop("lm_head.weight")
            embed = weights.get("text_model.embed_tokens.weight")
            if embed is None or not mx.array_equal(head, embed).item():
                raise ValueError(
                    "config.json sets tie_word_embeddings but the checkpoint's lm_head.weight "
                    "differs from model.text_model.embed_tokens.weight"
                )
        weights = VisionModel.sanitize(weights)
        return self.text_model.sanitize(weights)

    def hf_weights(self) -> dict[str, mx.array]:
        """This model's parameters under Hugging Face names and layouts (inverse of ``sanitize``)."""
        return to_hf_names(VisionModel.unsanitize(dict(tree_flatten(self.parameters()))))
