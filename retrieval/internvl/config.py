"""InternVL-C/G configuration: the nested layout of the published ``config.json`` as dataclasses.

Keys this code does not use are kept in ``extra`` so ``save_pretrained`` writes back what it read.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

_T = TypeVar("_T", bound="_DictConfig")


@dataclass
class _DictConfig:
    """Dataclass <-> dict with unknown keys preserved in ``extra``."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls: type[_T], data: dict[str, Any]) -> _T:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _DictConfig) else value
        return dict(sorted(out.items()))


@dataclass
class InternVisionConfig(_DictConfig):
    """InternViT (vision tower). Defaults are InternViT-6B of InternVL-14B-224px."""

    hidden_size: int = 3200
    num_attention_heads: int = 25
    num_hidden_layers: int = 48
    intermediate_size: int = 12800
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    #: "rms_norm" (absent in the published config, which always means RMSNorm) or "layer_norm"
    norm_type: str = "rms_norm"
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu"
    use_flash_attn: bool = True
    initializer_range: float = 0.02
    #: initial value of the layer-scale vectors ls1/ls2
    initializer_factor: float = 0.1
    drop_path_rate: float = 0.0
    dropout: float = 0.0
    attention_dropout: float = 0.0
    model_type: str = "intern_vit_6b"


@dataclass
class QLLaMAConfig(_DictConfig):
    """QLLaMA (LLaMA-7B decoder with learnable queries and cross-attention to the vision tokens)."""

    hidden_size: int = 4096
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    num_hidden_layers: int = 32
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-6
    vocab_size: int = 49954
    hidden_act: str = "silu"
    #: layers ``i`` with ``i % cross_attention_frequency == 0`` cross-attend to the vision tokens
    cross_attention_frequency: int = 2
    num_query_token: int = 96
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    initializer_range: float = 0.02
    model_type: str = "llama"
    architectures: list[str] = field(default_factory=lambda: ["LlamaForCausalLM"])


@dataclass
class InternVLConfig(_DictConfig):
    """Top-level InternVL-C/G config (``model_type: "internvl"``)."""

    vision_config: InternVisionConfig = field(default_factory=InternVisionConfig)
    qllama_config: QLLaMAConfig = field(default_factory=QLLaMAConfig)
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    num_query_token: int = 96
    #: input resolution override; the position embedding is resized (bicubic) to it
    force_image_size: int | None = None
    hidden_size: int = 4096
    max_txt_len: int = 32
    label_smoothing: float = 0.0
    initializer_range: float = 0.02
    use_backbone_lora: int = 0
    use_qllama_lora: int = 0
    model_type: str = "internvl"
    architectures: list[str] = field(default_factory=lambda: ["InternVLModel"])

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, dict):
            self.vision_config = InternVisionConfig.from_dict(self.vision_config)
        if isinstance(self.qllama_config, dict):
            self.qllama_config = QLLaMAConfig.from_dict(self.qllama_config)
        # the reference copies the top-level value into the QLLaMA config
        self.qllama_config.num_query_token = self.num_query_token

    @property
    def image_size(self) -> int:
        """Input resolution the model runs at (``force_image_size`` or the vision tower's)."""
        return int(self.force_image_size or self.vision_config.image_size)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> InternVLConfig:
        """Read ``config.json`` from a model folder (or the file itself)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"InternVL config not found: {file}")
        with open(file, encoding="utf-8") as fh:
            data = json.load(fh)
        if data.get("model_type") != "internvl":
            raise ValueError(f"{file}: model_type is {data.get('model_type')!r}, expected 'internvl'")
        return cls.from_dict(data)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write ``config.json`` into folder ``path`` (created if needed); returns the file path."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        file = folder / "config.json"
        file.write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return file
