"""Configuration dataclasses read from a SmolVLM / Idefics3 checkpoint's ``config.json``.

Field names are Hugging Face's keys and defaults are transformers' defaults, so a config file
means the same model here as in ``transformers``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MODEL_TYPES = ("smolvlm", "idefics3")
TEXT_MODEL_TYPES = ("llama",)
VISION_MODEL_TYPES = ("smolvlm_vision", "idefics3_vision", "idefics3")


TEXT_ONLY_ERROR = (
    "This model is text only (a GGUF decoder loaded without its vision mmproj): it takes no "
    "images or video"
)


class ConfigError(ValueError):
    """A configuration that this port cannot build a model from."""


@dataclass
class BaseConfig:
    """Shared ``from_dict`` and ``to_dict`` for all config dataclasses."""

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> BaseConfig:
        """Build the config from a Hugging Face dict, ignoring keys it does not know.

        Args:
            params: The (sub-)dictionary of ``config.json``.

        Raises:
            ConfigError: If ``params`` is not a dict or a required key is missing.
        """
        if not isinstance(params, dict):
            raise ConfigError(f"{cls.__name__} expects a JSON object, got {type(params).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in params]
        if missing:
            raise ConfigError(f"{cls.__name__} is missing required key(s) {missing}")
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """The fields under their Hugging Face keys, nested configs as dicts (derived
        attributes set in ``__post_init__`` are not fields and are left out)."""
        return dataclasses.asdict(self)


@dataclass
class TextConfig(BaseConfig):
    """The Llama decoder (``text_config``); defaults are ``LlamaConfig``'s."""

    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_parameters: dict[str, Any] | None = None
    attention_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in TEXT_MODEL_TYPES:
            raise ConfigError(
                f"text_config.model_type {self.model_type!r} is not supported (expected one of "
                f"{list(TEXT_MODEL_TYPES)})"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"text_config.hidden_act {self.hidden_act!r} is not supported")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"text_config.num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        # Newer configs keep RoPE settings under `rope_parameters`; transformers gives those
        # priority over a top-level `rope_theta`.
        if self.rope_parameters is not None:
            rope_type = self.rope_parameters.get("rope_type", self.rope_parameters.get("type"))
            if rope_type not in (None, "default"):
                raise ConfigError(
                    f"text_config.rope_parameters.rope_type {rope_type!r} is not supported "
                    "(only 'default' RoPE)"
                )
            self.rope_theta = float(self.rope_parameters.get("rope_theta", self.rope_theta))


@dataclass
class VisionConfig(BaseConfig):
    """The SigLIP vision tower (``vision_config``); defaults are ``SmolVLMVisionConfig``'s."""

    model_type: str = "smolvlm_vision"
    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.model_type not in VISION_MODEL_TYPES:
            raise ConfigError(
                f"vision_config.model_type {self.model_type!r} is not supported (expected one of "
                f"{list(VISION_MODEL_TYPES)})"
            )
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(f"vision_config.hidden_act {self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"vision_config.hidden_size ({self.hidden_size}) is not a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        self.head_dim = self.hidden_size // self.num_attention_heads
        self.num_patches_per_side = self.image_size // self.patch_size


@dataclass
class ModelConfig(BaseConfig):
    """The whole vision-language model (root of ``config.json``)."""

    model_type: str
    text_config: TextConfig = field(default_factory=TextConfig)
    # None: a text-only model (a GGUF decoder loaded without its mmproj).
    vision_config: VisionConfig | None = field(default_factory=VisionConfig)
    scale_factor: int = 2
    image_token_id: int = 128257
    # transformers ties `lm_head` to `embed_tokens` from the root key only.
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported (expected one of {list(MODEL_TYPES)})"
            )
        # A missing or null text config means transformers' defaults, and so does a missing
        # vision config; a null one means no vision tower.
        if not isinstance(self.text_config, TextConfig):
            self.text_config = TextConfig.from_dict(self.text_config or {})
        if self.vision_config is None:
            self.image_seq_len = 0
            return
        if not isinstance(self.vision_config, VisionConfig):
            self.vision_config = VisionConfig.from_dict(self.vision_config)
        # Tokens per full tile, as transformers computes it; the connector checks at run time
        # that the patch grid of each image is divisible by scale_factor.
        side = self.vision_config.num_patches_per_side
        self.image_seq_len = side * side // self.scale_factor**2


def load_config(model_dir: Path) -> ModelConfig:
    """Read ``config.json`` from a checkpoint directory.

    Args:
        model_dir: The checkpoint directory.

    Raises:
        FileNotFoundError: If ``config.json`` is missing.
        ConfigError: If it is not valid JSON or describes an unsupported model; the message
            names the file.
    """
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"No config.json in {model_dir}")
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    try:
        return ModelConfig.from_dict(params)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{path}: {err}") from err
