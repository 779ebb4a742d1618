"""Conversation templates of InternVL-Chat, as data.

Each template is a frozen :class:`ConversationTemplate` with the exact strings of the reference
``internvl_chat/internvl/conversation.py`` (OpenGVLab/InternVL @ 2410d1db and later): system template,
default system message, roles, separator style and separator. A checkpoint's ``config.json`` names its
template in the ``template`` field; :func:`get_template` looks it up.

What chat() does with a template (and this module reproduces):

* rendering (``get_prompt``): ``system_template.format(system_message) + sep``, then per message
  ``role + message + sep`` -- or just ``role`` when the message is empty or None (MPT style). So an empty
  answer in the history renders without separator, and the prompt ends with the assistant role;
* stopping: generation stops only on the token ``sep.strip()`` (``<|im_end|>`` for Hermes-2 /
  internlm2-chat / internvl2_5, ``<|end|>`` for phi3-chat); ``stop_str`` is never used by chat();
* the decoded answer (special tokens skipped) is cut at ``sep.strip()`` and stripped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from enum import Enum
from types import MappingProxyType


class SeparatorStyle(str, Enum):  # noqa: UP042  (str() of members stays the reference's)
    """How messages and separators are joined (the subset of the reference styles InternVL uses)."""

    MPT = "mpt"  # system + sep, then role + message + sep (role alone when the message is empty)
    ADD_COLON_TWO = "add_colon_two"  # system + sep, then role + ": " + message + sep/sep2 alternating
    INTERNVL_ZH = "internvl_zh"  # system_message + sep2, then role + ": " + message + sep2/sep alternating


@dataclasses.dataclass(frozen=True)
class ConversationTemplate:
    """One conversation template (immutable; use :meth:`with_system_message` to override the system text)."""

    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]
    sep_style: SeparatorStyle
    sep: str
    sep2: str | None = None
    stop_str: str | None = None  # recorded for completeness; chat() never uses it

    @property
    def stop_token(self) -> str:
        """The token whose id chat() passes to generate as ``eos_token_id`` (``sep.strip()``)."""
        return self.sep.strip()

    def with_system_message(self, system_message: str) -> ConversationTemplate:
        """A copy with another system message."""
        return dataclasses.replace(self, system_message=system_message)

    def render(self, messages: Sequence[str | None], *, system_message: str | None = None) -> str:
        """The prompt for alternating user / assistant ``messages`` (reference ``get_prompt``).

        ``messages[0]`` is a user turn; ``None`` or ``""`` renders the bare role (generation prompt).
        """
        system = self.system_message if system_message is None else system_message
        system_prompt = self.system_template.format(system_message=system)
        turns = [(self.roles[i % 2], m) for i, m in enumerate(messages)]
        if self.sep_style is SeparatorStyle.MPT:
            ret = system_prompt + self.sep
            for role, message in turns:
                ret += role + message + self.sep if message else role
            return ret
        if self.sep_style is SeparatorStyle.ADD_COLON_TWO:
            seps = [self.sep, self.sep2 or ""]
            ret = system_prompt + seps[0]
            for i, (role, message) in enumerate(turns):
                ret += role + ": " + message + seps[i % 2] if message else role + ":"
            return ret
        if self.sep_style is SeparatorStyle.INTERNVL_ZH:
            seps = [self.sep2 or "", self.sep]
            ret = system + seps[0]
            for i, (role, message) in enumerate(turns):
                ret += role + ": " + message + seps[i % 2] if message else role + ":"
            return ret
        raise ValueError(f"unsupported separator style {self.sep_style!r}")

    def build_prompt(
        self,
        question: str,
        history: Sequence[Sequence[str | None]] | None = None,
        *,
        system_message: str | None = None,
    ) -> str:
        """History turns ``(question, answer)``, then ``question`` and the open assistant turn."""
        messages: list[str | None] = []
        for turn in history or ():
            if len(turn) != 2:
                raise ValueError(f"history turns must be (question, answer) pairs, got {turn!r}")
            messages.extend(turn)
        messages.extend([question, None])
        return self.render(messages, system_message=system_message)

    def postprocess(self, text: str) -> str:
        """Cut a decoded answer at the stop token and strip it (``split(sep.strip())[0].strip()``)."""
        return text.split(self.stop_token)[0].strip() if self.stop_token else text.strip()


_INTERNVL_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，"
    "英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
_INTERNVL2_5_SYSTEM = (
    "你是书生·万象，英文名是InternVL，"
    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")

_REGISTRY: dict[str, ConversationTemplate] = {}


def register_template(template: ConversationTemplate, *, override: bool = False) -> None:
    """Add a template to the registry (``override=True`` to replace one with the same name)."""
    if template.name in _REGISTRY and not override:
        raise ValueError(f"template {template.name!r} is already registered")
    _REGISTRY[template.name] = template


def available_templates() -> list[str]:
    """Names of all registered templates, sorted."""
    return sorted(_REGISTRY)


def get_template(name: str) -> ConversationTemplate:
    """The template called ``name`` (a checkpoint's ``config.json`` ``template`` field)."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown conversation template {name!r}; known templates: {', '.join(available_templates())}"
        ) from None


#: read-only view of the registry
TEMPLATES: Mapping[str, ConversationTemplate] = MappingProxyType(_REGISTRY)

# Hermes-2 and internlm2-chat render identically at inference; they differ only in training (<s> prefix).
register_template(ConversationTemplate(
    name="Hermes-2",
    system_template="<|im_start|>system\n{system_message}",
    system_message=_INTERNVL_SYSTEM,
    roles=_CHATML_ROLES,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
    stop_str="<|endoftext|>",
))
register_template(ConversationTemplate(
    name="internlm2-chat",
    system_template="<|im_start|>system\n{system_message}",
    system_message=_INTERNVL_SYSTEM,
    roles=_CHATML_ROLES,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>",
))
register_template(ConversationTemplate(
    name="phi3-chat",
    system_template="<|system|>\n{system_message}",
    system_message=_INTERNVL_SYSTEM,
    roles=("<|user|>\n", "<|assistant|>\n"),
    sep_style=SeparatorStyle.MPT,
    sep="<|end|>",
))
register_template(ConversationTemplate(
    name="internvl2_5",
    system_template="<|im_start|>system\n{system_message}",
    system_message=_INTERNVL2_5_SYSTEM,
    roles=_CHATML_ROLES,
    sep_style=SeparatorStyle.MPT,
    sep="<|im_end|>\n",  # newline after every <|im_end|>; the stop token is still <|im_end|>
))
# InternVL-Chat-V1-1 (rendering of the newest reference definition: sep "</s>", sep2 " ").
register_template(ConversationTemplate(
    name="internvl_zh",
    system_template="",
    system_message="",
    roles=("<human>", "<bot>"),
    sep_style=SeparatorStyle.INTERNVL_ZH,
    sep="</s>",
    sep2=" ",
))
register_template(ConversationTemplate(
    name="vicuna_v1.1",
    system_template="{system_message}",
    system_message="A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    roles=("USER", "ASSISTANT"),
    sep_style=SeparatorStyle.ADD_COLON_TWO,
    sep=" ",
    sep2="</s>",
))


def template_for_config(config: Mapping[str, object]) -> ConversationTemplate:
    """The template named by an original-format ``config.json`` (its top-level ``template`` field)."""
    name = config.get("template")
    if not isinstance(name, str) or not name:
        raise ValueError(
            "config.json has no 'template' field naming the conversation template; "
            f"known templates: {', '.join(available_templates())}"
        )
    return get_template(name)
