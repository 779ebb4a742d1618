"""InternVL-Chat on transformers' native classes: loading original checkpoints, chat, grounded answers."""

from chat.loader import load_chat_model
from chat.model import ChatModel

__all__ = ["ChatModel", "load_chat_model"]
