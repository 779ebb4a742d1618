"""InternVL-C / InternVL-G (InternVL-14B-224px): InternViT + QLLaMA + attention-pooling projectors.

- InternVL-C image embedding: ``clip_projector`` (attention pooling) over the InternViT tokens.
- InternVL-G image embedding: ``normalise(clip_projector2(queries)) + normalise(clip_projector(tokens))``.
- Text embedding (both): QLLaMA final hidden state at the last real token ``@ text_projection``.
All three are unnormalised, as in the reference. No ``inference_mode`` here: the model stays trainable.
"""

from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn

from retrieval.internvl.config import InternVLConfig
from retrieval.internvl.pooling import AttentionPoolingBlock
from retrieval.internvl.qllama import QLLaMA, text_attention_mask
from retrieval.internvl.vision import InternVisionEmbeddings, InternVisionModel, resize_position_embedding
from retrieval.weights import load_state_dict, load_strict

logger = logging.getLogger(__name__)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


class InternVLModel(nn.Module):
    """The InternVL-C/G embedding model; parameter names equal the published checkpoint's."""

    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        if config.use_backbone_lora or config.use_qllama_lora:
            raise ValueError(
                "LoRA-wrapped InternVL checkpoints are not supported: merge the LoRA weights first"
            )
        self.config = config
        vision_cfg, text_cfg = config.vision_config, config.qllama_config
        self.vision_model = InternVisionModel(vision_cfg, image_size=config.image_size)
        self.qllama = QLLaMA(text_cfg, vision_hidden_size=vision_cfg.hidden_size)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, text_cfg.hidden_size))
        self.text_projection = nn.Parameter(torch.zeros(text_cfg.hidden_size, config.clip_embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.clip_projector = AttentionPoolingBlock(
            vision_cfg.hidden_size, config.attn_pool_num_heads, config.clip_embed_dim
        )
        self.clip_projector2 = AttentionPoolingBlock(
            text_cfg.hidden_size, config.attn_pool_num_heads, config.clip_embed_dim
        )
        self.itm_head = nn.Linear(text_cfg.hidden_size, 2)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Random initialisation for training from scratch (loading a checkpoint overwrites all of it)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, InternVisionEmbeddings):
                nn.init.trunc_normal_(module.class_embedding, std=std)
                nn.init.trunc_normal_(module.position_embedding, std=std)
        nn.init.normal_(self.query_tokens, std=std)
        nn.init.normal_(self.text_projection, std=self.config.qllama_config.hidden_size**-0.5)

    # ---- image side -------------------------------------------------------------------------------
    def vision_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, S, S) -> InternViT tokens (B, 1 + (S/p)², Cv)."""
        return self.vision_model(pixel_values)[0]

    def query_hidden_states(self, vision_tokens: torch.Tensor) -> torch.Tensor:
        """Vision tokens (B, Nv, Cv) -> QLLaMA final-norm output of the learnable queries (B, Q, Ct)."""
        queries = self.query_tokens.expand(vision_tokens.shape[0], -1, -1)  # (B, Q, Ct)
        # queries attend to each other without a causal mask; cross-attention in the selected layers
        return self.qllama.model(queries, mask=None, vision_hidden_states=vision_tokens)

    def encode_image_c(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternVL-C image embedding (B, D), unnormalised."""
        return self.clip_projector(self.vision_tokens(pixel_values))

    def encode_image_g(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """InternVL-G image embedding (B, D): sum of the two normalised projections (not re-normalised)."""
        tokens = self.vision_tokens(pixel_values)
        backbone = _normalise(self.clip_projector(tokens))
        queries = _normalise(self.clip_projector2(self.query_hidden_states(tokens)))
        return queries + backbone

    # ---- text side --------------------------------------------------------------------------------
    def text_hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Right-padded ids (B, L), pad 0 -> QLLaMA final-norm output (B, L, Ct); causal + padding mask."""
        embeds = self.qllama.model.embed_tokens(input_ids)  # (B, L, Ct)
        return self.qllama.model(embeds, mask=text_attention_mask(input_ids))

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embedding (B, D), unnormalised: hidden state at the last real token ``@ text_projection``."""
        hidden = self.text_hidden_states(input_ids)
        last = (input_ids > 0).sum(1) - 1  # (B,) position of EOS (right padding)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, Ct)
        return pooled @ self.text_projection

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """InternVL-C contrastive logits: (logits_per_image (B, T), logits_per_text (T, B))."""
        image = _normalise(self.encode_image_c(pixel_values))
        text = _normalise(self.encode_text(input_ids))
        logits = self.logit_scale.exp() * image @ text.t()
        return logits, logits.t()

    # ---- persistence ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> InternVLModel:
        """Build from ``config.json`` and load the safetensors weights strictly (names and shapes checked).

        The model is built on the meta device and the stored tensors are assigned, so weights are held once.
        """
        config = InternVLConfig.from_pretrained(path)
        state = load_state_dict(path)
        _align_vision_flags(config, state)
        with torch.device("meta"):
            model = cls(config)
        _adapt_position_embedding(model, state)
        load_strict(model, state, source=str(path), assign=True)
        del state  # the parameters now own the tensors; casting below frees each stored one in turn
        model.qllama.model.reset_rotary(torch.device("cpu"))  # non-persistent buffers are still on meta
        model.to(device=device or "cpu", dtype=dtype or torch.float32)
        model.qllama.model.reset_rotary()  # float32 frequencies, after any half-precision cast
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (optionally cast, e.g. to bfloat16)."""
        from safetensors.torch import save_file

        self.config.save_pretrained(path)
        state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _align_vision_flags(config: InternVLConfig, state: dict[str, torch.Tensor]) -> None:
    """Take InternViT's norm type from the stored tensors when the config's ``norm_type`` disagrees.

    The clip_benchmark InternViT ignores ``norm_type`` (always RMSNorm, weight only); later InternViT
    versions honour it (LayerNorm, weight + bias). ``norm1.bias`` in the file tells which code wrote it.
    Other flags (``qkv_bias``, ``qk_normalization``) are read by both, so a mismatch there is an error
    reported by the strict load.
    """
    key = "vision_model.encoder.layers.0.norm1."
    if key + "weight" not in state:
        return  # no vision layers stored: the strict check reports it
    stored = "layer_norm" if key + "bias" in state else "rms_norm"
    if config.vision_config.norm_type != stored:
        logger.warning(
            "vision_config.norm_type=%r but the stored norms are %s; using %r",
            config.vision_config.norm_type, stored, stored,
        )  # fmt: skip
        config.vision_config.norm_type = stored


def _adapt_position_embedding(model: InternVLModel, state: dict[str, torch.Tensor]) -> None:
    """Resize a stored position embedding to the ``force_image_size`` grid (bicubic, as the reference)."""
    key = "vision_model.embeddings.position_embedding"
    if key not in state:
        return
    stored, wanted = state[key], model.vision_model.embeddings.position_embedding
    if stored.shape == wanted.shape or stored.ndim != 3 or stored.shape[-1] != wanted.shape[-1]:
        return
    old_grid, new_grid = math.isqrt(stored.shape[1] - 1), model.vision_model.embeddings.grid
    if old_grid**2 + 1 != stored.shape[1]:
        return  # not a square grid: let the strict check report it
    logger.info(
        "resizing position embedding from %dx%d to %dx%d patches", old_grid, old_grid, new_grid, new_grid
    )
    state[key] = resize_position_embedding(stored, old_grid, new_grid)
