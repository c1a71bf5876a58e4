"""LAVE backends: sentence-embedding similarity and LLM (OpenAI-compatible HTTP or local transformers)."""

from autoseg.lave.backends.base import Backend
from autoseg.lave.backends.embedding import EmbeddingBackend
from autoseg.lave.backends.llm import LLMBackend, OpenAIChatClient, TransformersChatModel

__all__ = ["Backend", "EmbeddingBackend", "LLMBackend", "OpenAIChatClient", "TransformersChatModel"]
