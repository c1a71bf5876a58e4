"""LAVE: map open-ended names to a benchmark's classes (exact match -> persistent cache -> backend).

Entry points: :func:`build_mapper` (registry of mapper kinds), :func:`add_mapper_args` / :func:`mapper_from_args`
(the command-line options of ``eval.py``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from tqdm.auto import tqdm

from autoseg.lave.backends.base import Backend, NoDecision
from autoseg.lave.cache import MappingCache, clip_raw
from autoseg.lave.matching import ExactMatcher, spacy_lemmatizer, unique_in_order

log = logging.getLogger(__name__)


class MappingError(RuntimeError):
    """A backend failed on a name (or ran out of time); the mappings made before it are in the cache file."""


def dataset_synonyms(dataset: str, classes: Sequence[str]) -> list[list[str]] | None:
    """Synonyms of a known benchmark's classes (``autoseg.data.classes``) when ``classes`` is its display list."""
    try:
        from autoseg.data.classes import class_names, class_synonyms

        if list(classes) == class_names(dataset):
            return [s[1:] for s in class_synonyms(dataset)]
    except (ImportError, KeyError):
        pass
    return None


class LaveMapper:
    """Maps names to class indices: exact match, then the cache, then the backend (if any).

    Args:
        backend: decides names that are neither exact matches nor cached; None: exact matching only.
        cache: persistent mappings of earlier runs (default: in memory).
        lemmatize: also match spaCy lemmas in the exact stage (``"children"`` -> ``"child"``).
        save_every: write the cache after this many new backend mappings (and always at the end or on failure).
        progress: show a progress bar over backend calls.

    Attributes:
        records: per name, its latest mapping: ``{"class": name or None, "source": "exact"|"cache"|"backend",
            "raw": backend answer (clipped), "dataset": ...}``; a name the backend could not decide (junk answers)
            has ``"source": "undecided"``, class None, and a ``"reason"``: void for this run, not cached.
    """

    def __init__(
        self,
        backend: Backend | None = None,
        cache: MappingCache | None = None,
        lemmatize: bool = True,
        save_every: int = 20,
        progress: bool = True,
    ):
        self.backend, self.cache = backend, cache if cache is not None else MappingCache()
        self.save_every, self.progress = max(1, int(save_every)), progress
        self._lemmatizer: Callable | None = None
        self._lemmatize = lemmatize
        self.records: dict[str, dict[str, Any]] = {}
        self.n_backend_calls = 0

    @property
    def kind(self) -> str:
        return self.backend.kind if self.backend is not None else "exact"

    def _lemma_fn(self) -> Callable | None:
        if self._lemmatize and self._lemmatizer is None:
            try:
                self._lemmatizer = spacy_lemmatizer()
            except OSError as e:
                log.warning("exact matching without lemmas: %s", e)
                self._lemmatize = False
        return self._lemmatizer

    def map_names(
        self,
        names: Sequence[str],
        classes: Sequence[str],
        dataset: str,
        synonyms: Sequence[Sequence[str]] | None = None,
    ) -> dict[str, int | None]:
        """Class index into ``classes`` (None = background/void) of each unique name.

        Args:
            names: generated names (repeats allowed).
            classes: the dataset's class display names, index = class id.
            dataset: dataset key (e.g. ``"voc20"``); part of the cache key and of the LLM prompt.
            synonyms: extra exact-match names per class; default: those of ``autoseg.data.classes`` for a known
                benchmark whose display list equals ``classes``.

        Raises:
            MappingError: the backend failed or ran out of time; the message names the name and the backend, and
                says how many mappings this run made, all of them saved to the cache file.
        """
        if synonyms is None:
            synonyms = dataset_synonyms(dataset, classes)
        unique = unique_in_order(names)
        matcher = ExactMatcher(classes, synonyms, self._lemma_fn())
        out: dict[str, int | None] = {}
        pending: list[str] = []
        for name, idx in zip(unique, matcher.match_many(unique), strict=True):
            if idx is not None or self.backend is None:
                out[name] = idx
                raw = f"exact: {classes[idx]}" if idx is not None else "no exact match"
                self._record(name, dataset, classes, idx, "exact", raw)
                continue
            hit = self.cache.get(dataset, self.backend.kind, self.backend.cache_id, name)
            if hit is not None and (hit["class"] is None or hit["class"] in classes):
                idx = list(classes).index(hit["class"]) if hit["class"] is not None else None
                out[name] = idx
                self._record(name, dataset, classes, idx, "cache", hit["raw"])
            else:
                pending.append(name)
        if pending:
            self._run_backend(pending, classes, dataset, out)
        return {n: out[n] for n in unique}

    def _run_backend(self, pending: list[str], classes: Sequence[str], dataset: str, out: dict) -> None:
        backend = self.backend
        assert backend is not None
        done, made, undecided = 0, 0, []
        bar = tqdm(total=len(pending), desc=f"LAVE {backend.kind}", unit="name", disable=not self.progress)
        try:
            for name, idx, raw in backend.map(pending, classes, dataset):
                self.n_backend_calls += 1
                out[name] = idx
                done += 1
                bar.update(1)
                if isinstance(raw, NoDecision):  # void for this run only: never cached, asked again next run
                    undecided.append(name)
                    self._record(name, dataset, classes, None, "undecided", raw.raw, reason=raw.reason)
                    continue
                cls = classes[idx] if idx is not None else None
                self.cache.put(dataset, backend.kind, backend.cache_id, name, cls, raw)
                self._record(name, dataset, classes, idx, "backend", raw)
                made += 1
                if made % self.save_every == 0:
                    self.cache.save()
        except Exception as e:
            failed = pending[done] if done < len(pending) else "?"
            raise MappingError(
                f"LAVE {backend.kind} backend ({backend.cache_id}) failed on name {failed!r} "
                f"({type(e).__name__}: {e}); {self._saved_note(made)}"
            ) from e
        finally:
            bar.close()
        self.cache.save()
        if undecided:
            log.warning(
                "LAVE %s: %d name(s) got no usable answer and map to void for this run only (not cached, asked again "
                "next run), e.g. %r: %s", backend.kind, len(undecided), undecided[0],
                self.records[undecided[0]]["reason"],
            )  # fmt: skip

    def _saved_note(self, made: int) -> str:
        """Save the cache after a failure; say how many mappings of this run it holds."""
        if made == 0:
            return "this run made no mapping before it (nothing new to save)"
        what = f"the {made} mapping{'s' if made > 1 else ''} made by this run {'is' if made == 1 else 'are'}"
        if self.cache.path is None:
            return f"{what} kept in memory only (no cache path)"
        try:
            self.cache.save()
        except (OSError, ValueError) as e:
            return f"{what} NOT saved to {self.cache.path} ({e})"
        return f"{what} saved to {self.cache.path}; a rerun resumes from them"

    def _record(
        self,
        name: str,
        dataset: str,
        classes: Sequence[str],
        idx: int | None,
        source: str,
        raw: Any,
        reason: str | None = None,
    ) -> None:
        self.records[name] = {
            "class": classes[idx] if idx is not None else None,
            "source": source,
            "raw": clip_raw(raw),
            "dataset": dataset,
        }
        if reason is not None:
            self.records[name]["reason"] = reason


# ----------------------------------------------------------------------------------------------- builders

_COMMON = ("cache_path", "lemmatize", "save_every", "progress")
_EMBEDDING = ("model", "threshold", "margin", "anchors", "anchor_dedupe", "templates", "head_aliases", "device",
              "batch_size")  # fmt: skip
_LLM = ("transport", "endpoint", "model", "api_key", "timeout", "run_timeout", "retries", "backoff", "max_tokens",
        "seed", "max_response_bytes", "answer_retries", "gguf_file", "device", "dtype",
        "max_listed_classes")  # fmt: skip


def _check(kind: str, options: dict, allowed: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(allowed) - set(_COMMON))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown} for mapper kind {kind!r}; accepted: {sorted({*allowed, *_COMMON})}"
        )


def _mapper(backend: Backend | None, options: dict) -> LaveMapper:
    return LaveMapper(
        backend,
        MappingCache(options.get("cache_path")),
        lemmatize=options.get("lemmatize", True),
        save_every=options.get("save_every", 20),
        progress=options.get("progress", True),
    )


def _build_exact(**options: Any) -> LaveMapper:
    _check("exact", options, ())
    return _mapper(None, options)


def _build_embedding(**options: Any) -> LaveMapper:
    from autoseg.lave.backends.embedding import EmbeddingBackend

    _check("embedding", options, _EMBEDDING)
    kwargs = {k: options[k] for k in _EMBEDDING if options.get(k) is not None}
    return _mapper(EmbeddingBackend(**kwargs), options)


def _build_llm(**options: Any) -> LaveMapper:
    from autoseg.lave.backends.llm import LLMBackend, OpenAIChatClient, TransformersChatModel

    _check("llm", options, _LLM)
    transport = options.get("transport") or ("http" if options.get("endpoint") else "transformers")
    pick = lambda *keys: {k: options[k] for k in keys if options.get(k) is not None}  # noqa: E731
    if transport == "http":
        if not options.get("endpoint"):
            raise ValueError("the http LLM transport needs an endpoint URL (--llm-endpoint http://HOST:PORT/v1)")
        chat = OpenAIChatClient(
            options["endpoint"],
            **pick("model", "api_key", "timeout", "retries", "backoff", "max_tokens", "seed", "max_response_bytes"),
        )
        query_timeout, answer_retries = chat.timeout, 2
    elif transport == "transformers":
        tkw = pick("model", "gguf_file", "device", "dtype")
        if options.get("max_tokens") is not None:
            tkw["max_new_tokens"] = options["max_tokens"]
        chat = TransformersChatModel(**tkw)
        query_timeout, answer_retries = options.get("timeout"), 0  # greedy decoding would repeat the same answer
    else:
        raise ValueError(f"unknown LLM transport {transport!r}; available: ['http', 'transformers']")
    backend = LLMBackend(
        chat,
        answer_retries=options["answer_retries"] if options.get("answer_retries") is not None else answer_retries,
        query_timeout=query_timeout,
        run_timeout=options.get("run_timeout"),
        **pick("max_listed_classes"),
    )
    return _mapper(backend, options)


MAPPER_KINDS: dict[str, Callable[..., LaveMapper]] = {
    "exact": _build_exact,
    "embedding": _build_embedding,
    "llm": _build_llm,
}


def build_mapper(kind: str, **options: Any) -> LaveMapper:
    """A LAVE mapper of the given kind.

    Args:
        kind: "exact" (exact matching only), "embedding" (sentence-embedding backend) or "llm".
        **options: ``cache_path`` (JSON file), ``lemmatize``, ``save_every``, ``progress``, and per kind:
            embedding: ``model``, ``threshold``, ``margin``, ``anchors``, ``anchor_dedupe``, ``templates``,
            ``head_aliases``, ``device``, ``batch_size``; llm: ``transport`` ("http" | "transformers"; default http
            when ``endpoint`` is given), ``endpoint``, ``model`` (served model name, or HF id / directory / .gguf),
            ``api_key``, ``timeout`` (total seconds per name, retries included; http default 60, local: none),
            ``run_timeout`` (total seconds for all the LLM queries of one ``map_names`` call; default none),
            ``retries``, ``backoff``, ``max_tokens``, ``seed``, ``max_response_bytes`` (http answer cap, 1 MiB),
            ``answer_retries`` (re-asks of an answer that decides nothing; http 2, local 0), ``gguf_file``,
            ``device``, ``dtype``, ``max_listed_classes``. None values mean the default.

    Raises:
        ValueError: unknown kind (the message lists the kinds).
        TypeError: an option the kind does not accept (the message lists the accepted ones).
    """
    if kind not in MAPPER_KINDS:
        raise ValueError(f"unknown LAVE mapper kind {kind!r}; available: {sorted(MAPPER_KINDS)}")
    return MAPPER_KINDS[kind](**options)


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text!r}")
    return value


def _finite(low: float = -math.inf, high: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number in ``[low, high]``."""

    def parse(text: str) -> float:
        value = _float(text)
        if not (math.isfinite(value) and low <= value <= high):
            where = "" if (low, high) == (-math.inf, math.inf) else f" in [{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"expected a finite number{where}, got {text!r}")
        return value

    return parse


def _at_least(low: int) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}")
        return value

    return parse


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def add_mapper_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the LAVE options (``--mapper``, ``--mapper-cache``, ``--embedding-*``, ``--llm-*``) to a parser."""
    g = parser.add_argument_group("LAVE name mapping")
    g.add_argument("--mapper", choices=sorted(MAPPER_KINDS), default="embedding", help="name -> class mapper")
    g.add_argument("--mapper-cache", type=str, default=None, help="JSON cache of mappings, reused across runs")
    g.add_argument("--embedding-model", default=None, help="sentence-transformers id/dir (default: all-MiniLM-L6-v2)")
    g.add_argument("--embedding-threshold", type=_finite(-1, 1), help="min cosine to a class (default 0.4)")
    g.add_argument("--embedding-margin", type=_finite(), help="class must beat anchors by (default 0.05)")
    g.add_argument("--embedding-anchors", choices=["coco-stuff", "none"], default=None, help="non-class anchors")
    g.add_argument("--llm-endpoint", default=None, help="OpenAI-compatible URL, e.g. http://127.0.0.1:8000/v1")
    g.add_argument(
        "--llm-model", default=None, help="served model name (http) or HF id / dir / .gguf (local; default SmolLM2)"
    )
    g.add_argument("--llm-api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token for the endpoint")
    g.add_argument(
        "--llm-timeout", type=_seconds, default=None,
        help="total seconds per name: connect, send, the whole answer and retries (default 60 over http)",
    )  # fmt: skip
    g.add_argument(
        "--llm-run-timeout", type=_seconds, default=None,
        help="total seconds for all LLM queries of a run; then it stops, saving what was mapped (default: no limit)",
    )  # fmt: skip
    g.add_argument("--llm-retries", type=_at_least(0), help="HTTP retries with backoff (default 2)")
    g.add_argument("--llm-max-listed-classes", type=_at_least(1), help="list classes up to this many (200)")
    g.add_argument("--llm-device", default=None, help="torch device of the local LLM (default cpu)")
    return parser


def mapper_from_args(args: argparse.Namespace) -> LaveMapper:
    """Build the mapper chosen by the options of :func:`add_mapper_args`; ``--no-progress`` (if any) hides its bar."""
    options: dict[str, Any] = {"cache_path": args.mapper_cache, "progress": not getattr(args, "no_progress", False)}
    if args.mapper == "embedding":
        options |= {
            "model": args.embedding_model,
            "threshold": args.embedding_threshold,
            "margin": args.embedding_margin,
            "anchors": args.embedding_anchors,
        }
    elif args.mapper == "llm":
        options |= {
            "endpoint": args.llm_endpoint,
            "model": args.llm_model,
            "api_key": args.llm_api_key,
            "timeout": args.llm_timeout,
            "run_timeout": args.llm_run_timeout,
            "retries": args.llm_retries,
            "max_listed_classes": args.llm_max_listed_classes,
            "device": args.llm_device,
        }
    return build_mapper(args.mapper, **options)
