"""An independent reference for original-format InternVL-Chat checkpoints, written from the official code.

Semantics follow OpenGVLab/InternVL ``internvl_chat/internvl/model/internvl_chat/modeling_intern_vit.py``
(InternViT: patch conv + CLS + position embedding, pre-norm blocks ``x + ls1 * attn(norm1(x))``,
``x + ls2 * mlp(norm2(x))``, q/k RMSNorm over all heads when ``qk_normalization``),
``modeling_internvl_chat.py`` (``extract_feature``: hidden state ``select_layer``, drop CLS,
``pixel_shuffle`` v1/v2, ``mlp1``; ``chat``) and
``internvl/model/phi3/modeling_phi3.py`` (``Phi3SuScaledRotaryEmbedding``, the sliding-window causal mask of
``_prepare_4d_causal_attention_mask``). The LLM layers are transformers' own class for the family, loaded with
the ORIGINAL parameter names; nothing here imports ``chat``.
"""

from __future__ import annotations

import inspect
import math
import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM


def cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (deprecated for 5.40): use what forward takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv_cache(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values

# ------------------------------------------------------------------------------------------------ vision


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def vit_hidden_states(
    state: dict[str, torch.Tensor], vc: dict[str, Any], pixels: torch.Tensor
) -> list[torch.Tensor]:
    """InternVisionModel forward; returns [embeddings, layer 1 out, ..., layer L out] (``hidden_states``)."""
    w = {k[len("vision_model.") :]: v.float() for k, v in state.items() if k.startswith("vision_model.")}
    eps, heads = vc["layer_norm_eps"], vc["num_attention_heads"]
    rms = vc["norm_type"] == "rms_norm"
    x = F.conv2d(
        pixels,
        w["embeddings.patch_embedding.weight"],
        w["embeddings.patch_embedding.bias"],
        stride=vc["patch_size"],
    )  # [B, C, h, w]
    b, c = x.shape[:2]
    x = x.flatten(2).transpose(1, 2)  # [B, N, C]
    x = torch.cat([w["embeddings.class_embedding"].expand(b, 1, -1), x], dim=1)
    x = x + w["embeddings.position_embedding"]  # same grid: the bicubic resize is the identity

    def norm(t: torch.Tensor, prefix: str) -> torch.Tensor:
        if rms:
            return _rms_norm(t, w[prefix + ".weight"], eps)
        return F.layer_norm(t, (c,), w[prefix + ".weight"], w[prefix + ".bias"], eps)

    states = [x]
    for i in range(vc["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        h = norm(x, p + "norm1")
        n = h.shape[1]
        qkv = F.linear(h, w[p + "attn.qkv.weight"], w.get(p + "attn.qkv.bias"))
        qkv = qkv.reshape(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B, heads, N, d]
        if vc["qk_normalization"]:  # RMSNorm over all heads at once (embed_dim wide)
            q = _rms_norm(q.transpose(1, 2).flatten(-2), w[p + "attn.q_norm.weight"], eps)
            k = _rms_norm(k.transpose(1, 2).flatten(-2), w[p + "attn.k_norm.weight"], eps)
            q = q.view(b, n, heads, -1).transpose(1, 2)
            k = k.view(b, n, heads, -1).transpose(1, 2)
        attn = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        x = x + F.linear(out, w[p + "attn.proj.weight"], w[p + "attn.proj.bias"]) * w[p + "ls1"]
        h = norm(x, p + "norm2")
        h = F.linear(
            F.gelu(F.linear(h, w[p + "mlp.fc1.weight"], w[p + "mlp.fc1.bias"])),
            w[p + "mlp.fc2.weight"],
            w[p + "mlp.fc2.bias"],
        )
        x = x + h * w[p + "ls2"]
        states.append(x)
    return states


def pixel_shuffle(x: torch.Tensor, scale_factor: float, ps_version: str) -> torch.Tensor:
    """InternVLChatModel.pixel_shuffle, v1 (grid left transposed) and v2."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


def extract_feature(state: dict[str, torch.Tensor], config: dict[str, Any], pixels: torch.Tensor) -> dict:
    """``extract_feature`` + intermediates: selected hidden state, pixel-shuffled tokens, vit_embeds."""
    states = vit_hidden_states(state, config["vision_config"], pixels)
    selected = states[config["select_layer"]]
    x = selected[:, 1:, :]
    side = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], side, side, -1)
    x = pixel_shuffle(x, config["downsample_ratio"], config["ps_version"])
    shuffled = x.reshape(x.shape[0], -1, x.shape[-1])
    w = {k: v.float() for k, v in state.items() if k.startswith("mlp1.")}
    y = F.layer_norm(shuffled, (shuffled.shape[-1],), w["mlp1.0.weight"], w["mlp1.0.bias"], 1e-5)
    y = F.linear(
        F.gelu(F.linear(y, w["mlp1.1.weight"], w["mlp1.1.bias"])), w["mlp1.3.weight"], w["mlp1.3.bias"]
    )
    return {"selected": selected, "pixel_shuffled": shuffled, "vit_embeds": y}


# ------------------------------------------------------------------------------------------------ LLM


class SuScaledRotary(nn.Module):
    """Phi3SuScaledRotaryEmbedding / Phi3YarnScaledRotaryEmbedding of the reference (``type`` su / yarn):
    short factors up to original_max_position_embeddings, long ones beyond; cos/sin scaled by the type's
    attention factor."""

    def __init__(self, llm: dict[str, Any]) -> None:
        super().__init__()
        self.dim = llm["hidden_size"] // llm["num_attention_heads"]
        self.base = llm["rope_theta"]
        self.short = llm["rope_scaling"]["short_factor"]
        self.long = llm["rope_scaling"]["long_factor"]
        self.original = llm["original_max_position_embeddings"]
        self.max_pos = llm["max_position_embeddings"]
        self.kind = llm["rope_scaling"]["type"]  # "su" or "yarn"

    @torch.no_grad()
    def forward(
        self, x: torch.Tensor, position_ids: torch.Tensor, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_len = torch.max(position_ids) + 1
        ext = torch.tensor(self.long if seq_len > self.original else self.short, dtype=torch.float32)
        inv_freq = 1.0 / (
            ext * self.base ** (torch.arange(0, self.dim, 2, dtype=torch.int64).float() / self.dim)
        )
        freqs = (
            inv_freq[None, :, None].expand(position_ids.shape[0], -1, 1) @ position_ids[:, None, :].float()
        )
        emb = torch.cat((freqs.transpose(1, 2), freqs.transpose(1, 2)), dim=-1)
        scale = self.max_pos / self.original
        if scale <= 1.0:
            factor = 1.0
        elif self.kind == "yarn":  # Phi3YarnScaledRotaryEmbedding
            factor = 0.1 * math.log(scale) + 1.0
        else:
            factor = math.sqrt(1 + math.log(scale) / math.log(self.original))
        return (emb.cos() * factor).to(x.dtype), (emb.sin() * factor).to(x.dtype)


class ReferenceLLM:
    """transformers' Phi3ForCausalLM / LlamaForCausalLM on the original weights, reference rope and masks."""

    def __init__(self, state: dict[str, torch.Tensor], llm: dict[str, Any]) -> None:
        keep = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "rms_norm_eps",
            "max_position_embeddings",
            "rope_theta",
            "hidden_act",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
        kwargs = {k: llm[k] for k in keep if k in llm}
        self.arch = llm["architectures"][0]
        self.sliding_window = llm.get("sliding_window") if self.arch == "Phi3ForCausalLM" else None
        if self.arch == "Phi3ForCausalLM":
            config = Phi3Config(
                **kwargs,
                sliding_window=None,
                tie_word_embeddings=False,
                original_max_position_embeddings=llm.get("original_max_position_embeddings"),
            )
            model = Phi3ForCausalLM(config)
        elif self.arch == "LlamaForCausalLM":
            model = LlamaForCausalLM(LlamaConfig(**kwargs, tie_word_embeddings=False))
        else:
            raise ValueError(f"no reference for {self.arch}")
        model.config._attn_implementation = "eager"
        weights = {
            re.sub(r"^language_model\.", "", k): v.float()
            for k, v in state.items()
            if k.startswith("language_model.")
        }
        missing, unexpected = model.load_state_dict(weights, strict=False)
        assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
        if self.arch == "Phi3ForCausalLM" and llm.get("rope_scaling"):
            assert llm["rope_scaling"]["type"] == "su"
            model.model.rotary_emb = SuScaledRotary(llm)
        self.model = model.float().eval()

    head_key = "language_model.lm_head.weight"

    @property
    def head(self) -> torch.Tensor:
        """The lm head weight (edited in place when engineering events)."""
        return self.model.lm_head.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def _mask(self, past: int, new: int) -> torch.Tensor:
        """_prepare_4d_causal_attention_mask (4.37): causal, plus the sliding window when configured."""
        q = torch.arange(past, past + new)[:, None]
        k = torch.arange(past + new)[None, :]
        allowed = k <= q
        if self.sliding_window is not None:
            allowed &= k > q - self.sliding_window
        mask = torch.zeros(new, past + new)
        mask[~allowed] = torch.finfo(torch.float32).min
        return mask[None, None]

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, stop_id: int, max_new_tokens: int) -> dict[str, Any]:
        """Greedy decoding with a KV cache as generate() does: ids up to and including the stop token."""
        base = self.model.model
        out = base(inputs_embeds=embeds[None], attention_mask=self._mask(0, embeds.shape[0]), use_cache=True)
        hidden, cache, length = out.last_hidden_state[0], kv_cache(out), embeds.shape[0]
        states = [hidden[-1]]
        ids, step_logits, margins = [], [], []
        for _ in range(max_new_tokens):
            logits = states[-1] @ self.head.T
            top2 = logits.topk(2).values
            token = int(logits.argmax())
            ids.append(token)
            step_logits.append(logits)
            margins.append(float(top2[0] - top2[1]))
            if token == stop_id or len(ids) == max_new_tokens:
                break
            out = base(
                inputs_embeds=self.embed(torch.tensor([[token]])),
                attention_mask=self._mask(length, 1),
                use_cache=True,
                **{cache_kwarg(base): cache},
            )
            states.append(out.last_hidden_state[0, -1])
            cache, length = kv_cache(out), length + 1
        return {
            "ids": ids,
            "prefill_logits": hidden @ self.head.T,
            "step_logits": torch.stack(step_logits),
            "margins": margins,
            "hidden": torch.stack(states),  # what the lm head saw at each step
        }

    @torch.no_grad()
    def last_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states of every position (what the lm head sees)."""
        return self.model.model(inputs_embeds=embeds[None], attention_mask=self._mask(0, embeds.shape[0]))[0][
            0
        ]


class InternLM2Reference:
    """InternLM2ForCausalLM (internvl/model/internlm2/modeling_internlm2.py, eager) in plain torch.

    ``wqkv`` rows are grouped per key/value head: ``rearrange(qkv, 'b q (h gs d) -> b q h gs d', gs=g + 2)``,
    queries ``[..., :g, :]`` (head ``h * g + j``), key ``[..., -2, :]``, value ``[..., -1, :]``; rotate-half
    RoPE (dynamic NTK is the identity below ``max_position_embeddings``); SwiGLU ``w2(silu(w1 x) * w3 x)``.
    """

    head_key = "language_model.output.weight"

    def __init__(self, state: dict[str, torch.Tensor], llm: dict[str, Any]) -> None:
        self.w = {
            k[len("language_model.") :]: v.float()
            for k, v in state.items()
            if k.startswith("language_model.")
        }
        self.heads, self.kv = llm["num_attention_heads"], llm["num_key_value_heads"]
        self.d = llm["hidden_size"] // self.heads
        self.layers, self.eps = llm["num_hidden_layers"], llm["rms_norm_eps"]
        self.theta, self.max_pos = llm["rope_theta"], llm["max_position_embeddings"]

    @property
    def head(self) -> torch.Tensor:
        return self.w["output.weight"]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.w["model.tok_embeddings.weight"])

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    @torch.no_grad()
    def last_hidden(self, embeds: torch.Tensor) -> torch.Tensor:
        n, g, d = embeds.shape[0], self.heads // self.kv, self.d
        assert n <= self.max_pos, "dynamic NTK scaling would be active"
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2).float() / d))
        freqs = torch.outer(torch.arange(n).float(), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()  # [n, d]
        causal = torch.full((n, n), float("-inf")).triu(1)
        x = embeds
        for i in range(self.layers):
            p = f"model.layers.{i}."
            h = _rms_norm(x, self.w[p + "attention_norm.weight"], self.eps)
            qkv = F.linear(h, self.w[p + "attention.wqkv.weight"], self.w.get(p + "attention.wqkv.bias"))
            qkv = qkv.view(n, self.kv, g + 2, d)
            q = qkv[:, :, :g].reshape(n, self.kv * g, d).transpose(0, 1)  # [heads, n, d]
            k = qkv[:, :, -2].transpose(0, 1)  # [kv, n, d]
            v = qkv[:, :, -1].transpose(0, 1)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            k, v = k.repeat_interleave(g, dim=0), v.repeat_interleave(g, dim=0)  # repeat_kv
            attn = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + causal).softmax(dim=-1)
            out = (attn @ v).transpose(0, 1).reshape(n, self.heads * d)
            x = x + F.linear(out, self.w[p + "attention.wo.weight"], self.w.get(p + "attention.wo.bias"))
            h = _rms_norm(x, self.w[p + "ffn_norm.weight"], self.eps)
            mlp = F.silu(F.linear(h, self.w[p + "feed_forward.w1.weight"])) * F.linear(
                h, self.w[p + "feed_forward.w3.weight"]
            )
            x = x + F.linear(mlp, self.w[p + "feed_forward.w2.weight"])
        return _rms_norm(x, self.w["model.norm.weight"], self.eps)

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, stop_id: int, max_new_tokens: int) -> dict[str, Any]:
        """Greedy decoding (full recompute per step; RoPE is static here): ids up to the stop token."""
        hidden = self.last_hidden(embeds)
        seq, states = embeds, [hidden[-1]]
        ids, step_logits, margins = [], [], []
        for _ in range(max_new_tokens):
            logits = states[-1] @ self.head.T
            top2 = logits.topk(2).values
            token = int(logits.argmax())
            ids.append(token)
            step_logits.append(logits)
            margins.append(float(top2[0] - top2[1]))
            if token == stop_id or len(ids) == max_new_tokens:
                break
            seq = torch.cat([seq, self.embed(torch.tensor([token]))])
            states.append(self.last_hidden(seq)[-1])
        return {
            "ids": ids,
            "prefill_logits": hidden @ self.head.T,
            "step_logits": torch.stack(step_logits),
            "margins": margins,
            "hidden": torch.stack(states),
        }


def merge_image_embeds(
    llm: ReferenceLLM | InternLM2Reference,
    ids: torch.Tensor,
    vit_embeds: torch.Tensor | None,
    img_context_id: int,
) -> torch.Tensor:
    """InternVLChatModel.generate: ``<IMG_CONTEXT>`` positions overwritten, in order, by the vision rows."""
    embeds = llm.embed(ids).clone()
    if vit_embeds is not None:
        selected = ids == img_context_id
        assert int(selected.sum()) == vit_embeds.shape[0] * vit_embeds.shape[1]
        embeds[selected] = vit_embeds.reshape(-1, embeds.shape[-1])
    return embeds


# ------------------------------------------------------------------------------------------------ prompts

PHI3_CHAT = {  # internvl/conversation.py, 'phi3-chat' (MPT separator style)
    "system_template": "<|system|>\n{system_message}",
    "system_message": (
        "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
        "英文名叫InternVL, 是一个有用无害的人工智能助手。"
    ),
    "roles": ("<|user|>\n", "<|assistant|>\n"),
    "sep": "<|end|>",
}
HERMES_2 = {
    **PHI3_CHAT,
    "system_template": "<|im_start|>system\n{system_message}",
    "roles": ("<|im_start|>user\n", "<|im_start|>assistant\n"),
    "sep": "<|im_end|>",
}


def reference_query(
    template: dict[str, Any],
    question: str,
    num_patches_list: list[int] | None,
    num_image_token: int,
    history: list[tuple[str, str]] | None = None,
) -> str:
    """InternVLChatModel.chat()'s query string (Conversation.get_prompt, MPT style, then image tokens)."""
    if history is None and num_patches_list and "<image>" not in question:
        question = "<image>\n" + question
    messages = [m for turn in history or [] for m in turn] + [question, None]
    ret = template["system_template"].format(system_message=template["system_message"]) + template["sep"]
    for i, message in enumerate(messages):
        role = template["roles"][i % 2]
        ret += role + message + template["sep"] if message else role
    for n in num_patches_list or []:
        ret = ret.replace("<image>", "<img>" + "<IMG_CONTEXT>" * num_image_token * n + "</img>", 1)
    return ret


# ------------------------------------------------------------------------------------------------ tokenizer


class SlowLlamaTokenizerReference:
    """transformers 4.37's slow ``LlamaTokenizer`` encode, rebuilt on sentencepiece.

    Splits on added tokens (an added token with ``rstrip`` eats the whitespace after it). ``legacy=False``:
    each text segment is encoded without sentencepiece's dummy prefix (``"▁"`` only at the very start of the
    text, dropped when a special-map token follows); ``legacy=True`` (InternLM2Tokenizer): every segment is
    encoded on its own, dummy prefix included. BOS is prepended when ``add_bos_token``.
    """

    def __init__(
        self,
        model_file: str,
        added: list[tuple[str, bool]],
        special_map: set[str],
        *,
        add_bos: bool,
        legacy: bool = False,
        first_added_id: int = 32000,
    ) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        with open(model_file, "rb") as f:
            proto.ParseFromString(f.read())
        self.sp_legacy = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        proto.normalizer_spec.add_dummy_prefix = False
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.legacy = legacy
        self.added = {t: (first_added_id + i, rstrip) for i, (t, rstrip) in enumerate(added)}
        self.all_special = special_map | {"<s>", "</s>", "<unk>"}
        self.add_bos = add_bos
        self.unk_len = len(self.sp.encode("<unk>", out_type=str))
        self.pattern = re.compile(
            "(" + "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True)) + ")"
        )

    def _tokenize(self, text: str) -> list[str]:
        if not text.startswith(("▁", " ")):
            return self.sp.encode(text, out_type=str)
        return self.sp.encode("<unk>" + text, out_type=str)[self.unk_len :]

    def encode(self, text: str) -> list[int]:
        if not self.legacy:
            text = "▁" + text.replace("▁", " ")
        parts = self.pattern.split(text)
        for i, part in enumerate(parts):
            if part in self.added and self.added[part][1] and i + 1 < len(parts) and parts[i + 1]:
                parts[i + 1] = parts[i + 1].lstrip()
        tokens: list[str] = []
        for part in parts:
            if part in self.added:
                tokens.append(part)
            elif part:
                tokens.extend(
                    self.sp_legacy.encode(part, out_type=str) if self.legacy else self._tokenize(part)
                )
        if len(tokens) > 1 and tokens[0] == "▁" and tokens[1] in self.all_special:
            tokens = tokens[1:]
        ids = [self.added[t][0] if t in self.added else self.sp.piece_to_id(t) for t in tokens]
        return [1, *ids] if self.add_bos else ids

    def decode(self, ids: list[int], *, spaces_between_special_tokens: bool = True) -> str:
        """4.37's slow ``decode(ids, skip_special_tokens=True)``: special-map ids skipped, other added tokens
        kept as text, segments joined with a space (``spaces_between_special_tokens`` defaults to True)."""
        by_id = {i: t for t, (i, _) in self.added.items()}
        special_ids = {i for t, (i, _) in self.added.items() if t in self.all_special} | {0, 1, 2}
        texts: list[str] = []
        current: list[str] = []

        def flush() -> None:
            if current:
                pieces = [current[0][1:] if current[0].startswith("▁") else current[0], *current[1:]]
                text = self.sp.decode_pieces(pieces)
                if text:
                    texts.append(text)
                current.clear()

        for i in ids:
            if i in special_ids:
                continue
            if i in by_id:
                flush()
                texts.append(by_id[i])
            else:
                current.append(self.sp.id_to_piece(i))
        flush()
        return (" " if spaces_between_special_tokens else "").join(texts)
