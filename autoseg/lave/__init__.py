"""LAVE: map open-ended generated names to a benchmark's classes (exact match -> cache -> LLM or embedding)."""

from autoseg.lave.cache import MappingCache
from autoseg.lave.mapper import (
    MAPPER_KINDS,
    LaveMapper,
    MappingError,
    add_mapper_args,
    build_mapper,
    mapper_from_args,
)
from autoseg.lave.matching import ExactMatcher
from autoseg.lave.prompts import build_prompt, parse_answer, parse_decision

__all__ = [
    "MAPPER_KINDS",
    "ExactMatcher",
    "LaveMapper",
    "MappingCache",
    "MappingError",
    "add_mapper_args",
    "build_mapper",
    "build_prompt",
    "mapper_from_args",
    "parse_answer",
    "parse_decision",
]
