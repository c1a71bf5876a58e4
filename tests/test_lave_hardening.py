"""LAVE hardening (issue 9): bounded LLM queries, capped answers, junk answers not cached, honest failure counts,
a cache shared by several processes, malformed cache entries, and ``--no-progress``.

Hostile servers run on 127.0.0.1 inside each test (``lave_helpers.RawServer``) and stop by themselves after a few
seconds at most; client deadlines are 1-2 s, so a regression fails instead of hanging.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from lave_helpers import RawServer, StubChatServer, completion, prompt_name, read_request

import autoseg
from autoseg.lave import MappingCache, MappingError, add_mapper_args, build_mapper, mapper_from_args
from autoseg.lave.backends.llm import LLMAnswerError, LLMBackend, LLMConnectionError, OpenAIChatClient
from autoseg.lave.cache import MAX_RAW_CHARS

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
       "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]  # fmt: skip
HI = [{"role": "user", "content": "hi"}]


def llm(url: str, **options):
    """An LLM mapper on ``url`` without lemmas or progress bar (fast, quiet)."""
    return build_mapper("llm", endpoint=url, model="m", lemmatize=False, progress=False, **options)


def headers(length: int | None = None) -> bytes:
    size = f"Content-Length: {length}\r\n" if length is not None else "Connection: close\r\n"
    return f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{size}\r\n".encode()


def json_reply(conn, srv, obj) -> None:
    body = json.dumps(obj).encode()
    srv.send(conn, headers(len(body)) + body)


def dribble(conn, srv) -> None:
    """Headers, then one body byte every 0.5 s (at most 16, then it closes the connection)."""
    read_request(conn)
    srv.send(conn, headers(1000))
    for _ in range(16):
        if srv.stop.wait(0.5):
            return
        srv.send(conn, b" ")


def silent(conn, srv) -> None:
    """Reads the request and never answers (until the test ends, at most 10 s)."""
    read_request(conn)
    srv.stop.wait(10)


def huge(announce: bool):
    """A handler streaming a valid 50 MB completion ("'dog' " + padding) in 64 KiB pieces, with or without a
    Content-Length header."""
    head, tail = b'{"choices": [{"index": 0, "message": {"role": "assistant", "content": "\'dog\' ', b'"}}]}'
    pad = b"x" * (1 << 16)
    n_pad = 50_000_000 // len(pad)

    def handle(conn, srv) -> None:
        read_request(conn)
        srv.send(conn, headers(len(head) + n_pad * len(pad) + len(tail) if announce else None) + head)
        for _ in range(n_pad):
            if srv.stop.is_set():
                return
            srv.send(conn, pad)
        srv.send(conn, tail)

    return handle


# ----------------------------------------------------------------------------------------- bounded requests


def test_dribbling_server_is_abandoned_at_the_deadline():
    with RawServer(dribble) as srv:
        client = OpenAIChatClient(srv.url, model="m", timeout=1.5, backoff=0.01)
        with pytest.raises(LLMConnectionError, match=r"deadline reached, --llm-timeout") as err:
            client.complete(HI)
        assert "TimeoutError" in str(err.value) or isinstance(err.value.__cause__, TimeoutError)
        assert srv.sent < len(headers(1000)) + 16  # the client stopped reading before the server gave up
    assert client.n_requests == 1  # the deadline covers the retries too


def test_silent_server_is_abandoned_at_the_deadline_without_retries():
    with RawServer(silent) as srv:
        client = OpenAIChatClient(srv.url, model="m", timeout=1.0, retries=2, backoff=0.01)
        with pytest.raises(LLMConnectionError, match=r"after 1 attempts \(deadline reached"):
            client.complete(HI)
        assert client.n_requests == 1 and srv.n_connections == 1


def test_mapper_stops_on_a_hanging_server_and_counts_what_it_saved(tmp_path):
    def handle(conn, srv):
        _, body = read_request(conn)
        if prompt_name(body) == "puppy":
            json_reply(conn, srv, completion("'dog'"))
        else:
            srv.stop.wait(10)

    cache = tmp_path / "lave.json"
    with RawServer(handle) as srv:
        m = llm(srv.url, cache_path=cache, timeout=1.0)
        with pytest.raises(MappingError, match="failed on name 'boom'") as err:
            m.map_names(["puppy", "boom", "kitten"], VOC, "voc20")
    assert "the 1 mapping made by this run is saved to" in str(err.value) and "deadline" in str(err.value)
    assert [e["name"] for e in json.loads(cache.read_text())["entries"]] == ["puppy"]


def test_run_timeout_stops_the_run_and_saves_what_was_mapped(tmp_path):
    def slow(name):
        time.sleep(0.4)
        return "'dog'"

    names = [f"thing{i}" for i in range(12)]
    cache = tmp_path / "lave.json"
    with StubChatServer(slow) as srv:
        m = llm(srv.url, cache_path=cache, run_timeout=1.0, timeout=30)
        with pytest.raises(MappingError, match=r"--llm-run-timeout") as err:
            m.map_names(names, VOC, "voc20")
        assert len(srv.requests) < len(names)
    saved = json.loads(cache.read_text())["entries"] if cache.exists() else []
    n = len(saved)
    assert n < len(names) and {e["name"] for e in saved} == set(names[:n])
    assert ("made no mapping" in str(err.value)) if n == 0 else (f"the {n} mapping" in str(err.value))


def test_failure_message_counts_only_this_runs_mappings(tmp_path):
    cache = tmp_path / "lave.json"
    c = MappingCache(cache)
    for i in range(5):
        c.put("voc20", "llm", "other-model", f"old{i}", None, "'void'")
    c.save()
    with StubChatServer(lambda n: 500) as srv:
        m = llm(srv.url, cache_path=cache, retries=0)
        with pytest.raises(MappingError, match="failed on name 'puppy'") as err:
            m.map_names(["puppy"], VOC, "voc20")
    assert "this run made no mapping" in str(err.value) and "5 mappings" not in str(err.value)
    assert len(MappingCache(cache)) == 5


# --------------------------------------------------------------------------------------------- answer size


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "no-length"])
def test_huge_answer_is_not_read_whole(announce):
    with RawServer(huge(announce)) as srv:
        client = OpenAIChatClient(srv.url, model="m", timeout=20, max_response_bytes=1 << 20)
        with pytest.raises(LLMAnswerError, match=r"over the cap of 1048576 bytes"):
            client.complete(HI)
    assert srv.sent < 20_000_000  # the server could not push its 50 MB: the client stopped reading


def test_huge_answer_maps_to_void_for_this_run_only(tmp_path):
    cache = tmp_path / "lave.json"
    with RawServer(huge(False)) as srv:
        m = llm(srv.url, cache_path=cache, timeout=20, answer_retries=1)
        assert m.map_names(["puppy"], VOC, "voc20") == {"puppy": None}
    rec = m.records["puppy"]
    assert rec["source"] == "undecided" and "cap" in rec["reason"] and "2 attempts" in rec["reason"]
    assert len(rec["raw"]) < MAX_RAW_CHARS + 100
    assert not cache.exists() or not json.loads(cache.read_text())["entries"]


def test_long_raw_answers_are_clipped_in_cache_and_records(tmp_path):
    cache = tmp_path / "lave.json"
    with StubChatServer(lambda n: "'dog' " + "blah " * 20_000) as srv:
        m = llm(srv.url, cache_path=cache)
        assert m.map_names(["puppy"], VOC, "voc20") == {"puppy": VOC.index("dog")}
    (entry,) = json.loads(cache.read_text())["entries"]
    for raw in (entry["raw"], m.records["puppy"]["raw"]):
        assert raw.startswith("'dog' blah") and len(raw) < MAX_RAW_CHARS + 100
        assert raw.endswith("[... truncated: 100006 characters in all]")


# ---------------------------------------------------------------------------------------------- junk answers

JUNK = ["", completion(None), b"<html>busy</html>", {"error": "overloaded"}, "I cannot say.", "'puppy'"]


@pytest.mark.parametrize("junk", JUNK, ids=["empty", "null", "not-json", "no-choices", "no-class", "quoted-name"])
def test_junk_answer_is_retried_then_good_answer_cached(tmp_path, junk):
    asked = []

    def reply(name):
        asked.append(name)
        return junk if len(asked) <= 2 else "'dog'"

    with StubChatServer(reply) as srv:
        m = llm(srv.url, cache_path=tmp_path / "lave.json")
        assert m.map_names(["puppy"], VOC, "voc20") == {"puppy": VOC.index("dog")}
        assert srv.requests == ["puppy"] * 3
    assert m.records["puppy"]["source"] == "backend"
    (entry,) = json.loads((tmp_path / "lave.json").read_text())["entries"]
    assert entry["class"] == "dog" and entry["raw"] == "'dog'"


def test_persistent_junk_is_void_for_this_run_only(tmp_path):
    cache = tmp_path / "lave.json"
    with StubChatServer(lambda n: {"puppy": completion(None), "sky": "'void'"}[n]) as srv:
        m = llm(srv.url, cache_path=cache)
        assert m.map_names(["puppy", "sky"], VOC, "voc20") == {"puppy": None, "sky": None}
        assert srv.requests == ["puppy"] * 3 + ["sky"]  # junk re-asked twice; a clear void is final at once
        rec = m.records["puppy"]
        assert rec["source"] == "undecided" and "not text" in rec["reason"] and "3 attempts" in rec["reason"]
        assert m.records["sky"]["source"] == "backend"
        assert [e["name"] for e in json.loads(cache.read_text())["entries"]] == ["sky"]
        # a later run against a working server asks again and caches the real answer; sky comes from the cache
        srv.reply = lambda n: "'dog'"
        m2 = llm(srv.url, cache_path=cache)
        assert m2.map_names(["puppy", "sky"], VOC, "voc20") == {"puppy": VOC.index("dog"), "sky": None}
        assert srv.requests[4:] == ["puppy"] and m2.records["sky"]["source"] == "cache"
    assert {e["name"]: e["class"] for e in json.loads(cache.read_text())["entries"]} == {"puppy": "dog", "sky": None}


def test_junk_retries_share_the_query_deadline():
    calls = []

    class SlowJunk:
        model_id = "slow-junk"

        def complete(self, messages, deadline=None):
            calls.append(deadline)
            time.sleep(0.6)
            return "hmm"

    backend = LLMBackend(SlowJunk(), answer_retries=10, query_timeout=1.0)
    ((name, idx, raw),) = list(backend.map(["puppy"], VOC, "voc20"))
    assert idx is None and "attempts" in raw.reason and len(calls) < 11 and len(set(calls)) == 1


# -------------------------------------------------------------------------------------------- shared cache


def test_two_cache_objects_keep_each_others_entries(tmp_path):
    path = tmp_path / "lave.json"
    a, b = MappingCache(path), MappingCache(path)
    a.put("voc20", "llm", "m", "puppy", "dog", "'dog'")
    b.put("voc20", "llm", "m", "kitten", "cat", "'cat'")
    a.save()
    b.save()
    a.put("voc20", "llm", "m", "sky", None, "'void'")
    a.save()
    assert {e["name"] for e in json.loads(path.read_text())["entries"]} == {"puppy", "kitten", "sky"}
    assert b.get("voc20", "llm", "m", "puppy")["class"] == "dog"  # b loaded a's entries when it saved
    assert (tmp_path / "lave.json.lock").exists()


WRITER = """
import sys, time
from pathlib import Path
from autoseg.lave.cache import MappingCache
path, tag = Path(sys.argv[1]), sys.argv[2]
cache = MappingCache(path)  # one long-lived cache object per process, as in a long eval.py run
(path.parent / f"ready-{tag}").touch()
for _ in range(600):  # start together (at most 60 s)
    if (path.parent / "go").exists():
        break
    time.sleep(0.1)
for i in range(40):
    cache.put("voc20", "llm", "m", f"{tag}{i}", None, "'void'")
    cache.save()
"""


def test_two_processes_writing_one_cache_lose_nothing(tmp_path):
    path = tmp_path / "lave.json"
    env = {**os.environ, "PYTHONPATH": str(Path(autoseg.__file__).parents[1])}  # the autoseg under test
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag], cwd=tmp_path, env=env) for tag in "ab"]
    for _ in range(600):  # both have read the (missing) cache file
        if all((tmp_path / f"ready-{t}").exists() for t in "ab") or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    (tmp_path / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    names = {e["name"] for e in json.loads(path.read_text())["entries"]}
    assert names == {f"{t}{i}" for t in "ab" for i in range(40)}
    assert not list(tmp_path.glob("*.tmp*"))


def test_malformed_cache_entries_are_skipped_and_asked_again(tmp_path, caplog):
    path = tmp_path / "lave.json"
    good = {"dataset": "voc20", "backend": "llm", "model": "http:m|lave-v1|list<=200", "name": "sky", "class": None,
            "raw": "'void'"}  # fmt: skip
    bad = [{**good, "name": "puppy", "class": 3}, {"dataset": "voc20", "name": "kitten"}, "junk", None]
    path.write_text(json.dumps({"format": "autoseg-lave-cache", "version": 1, "entries": [good, *bad]}))
    with caplog.at_level(logging.WARNING, logger="autoseg.lave.cache"):
        c = MappingCache(path)
    assert len(c) == 1 and c.get("voc20", "llm", good["model"], "sky")["raw"] == "'void'"
    assert "lave.json: LAVE cache entry 1 skipped" in caplog.text and "'class' a string or null" in caplog.text
    assert "entry 2 skipped (missing or non-string ['backend', 'model'];" in caplog.text
    with StubChatServer(lambda n: "'dog'") as srv:
        m = llm(srv.url, cache_path=path)
        assert m.map_names(["sky", "puppy"], VOC, "voc20") == {"sky": None, "puppy": VOC.index("dog")}
        assert srv.requests == ["puppy"]
    assert {e["name"] for e in json.loads(path.read_text())["entries"]} == {"sky", "puppy"}
    path.write_text(json.dumps({"format": "autoseg-lave-cache", "version": 1, "entries": {"a": 1}}))
    with pytest.raises(ValueError, match=r"lave.json: 'entries' is a dict, expected a list"):
        MappingCache(path)


# ----------------------------------------------------------------------------------------------- progress


@pytest.mark.parametrize("hide", [False, True])
def test_no_progress_hides_the_lave_bar(capsys, hide):
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-progress", action="store_true")  # as eval.py defines it
    add_mapper_args(parser)
    with StubChatServer(lambda n: "'dog'") as srv:
        argv = ["--mapper", "llm", "--llm-endpoint", srv.url, "--llm-model", "m", "--llm-timeout", "5"]
        m = mapper_from_args(parser.parse_args(argv + ["--no-progress"] * hide))
        m._lemmatize = False  # no spaCy needed here
        capsys.readouterr()
        assert m.map_names(["puppy"], VOC, "voc20") == {"puppy": VOC.index("dog")}
    assert ("LAVE llm" in capsys.readouterr().err) is not hide
    assert m.backend.query_timeout == 5.0 and m.backend.chat.timeout == 5.0


def test_run_timeout_flag_reaches_the_backend():
    p = add_mapper_args(argparse.ArgumentParser())
    args = p.parse_args(["--mapper", "llm", "--llm-endpoint", "http://127.0.0.1:1/v1", "--llm-run-timeout", "90"])
    m = mapper_from_args(args)
    assert m.backend.run_timeout == 90.0 and m.backend.query_timeout == 60.0 and m.progress


# ----------------------------------------------------------------------------------------------- flag values


BAD_FLAG_VALUES = [
    ("--llm-timeout", "inf"),
    ("--llm-timeout", "nan"),
    ("--llm-timeout", "0"),
    ("--llm-run-timeout", "inf"),
    ("--llm-run-timeout", "nan"),
    ("--llm-run-timeout", "-5"),
    ("--embedding-threshold", "nan"),
    ("--embedding-threshold", "inf"),
    ("--embedding-threshold", "1.5"),
    ("--embedding-margin", "nan"),
    ("--embedding-margin", "-inf"),
    ("--llm-retries", "-1"),
    ("--llm-max-listed-classes", "0"),
]


@pytest.mark.parametrize(("flag", "value"), BAD_FLAG_VALUES)
def test_bad_mapper_flag_values_are_one_line_usage_errors_naming_the_flag(capsys, flag, value):
    parser = add_mapper_args(argparse.ArgumentParser(prog="eval.py"))
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--mapper", "llm" if flag.startswith("--llm") else "embedding", f"{flag}={value}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"eval.py: error: argument {flag}: ") and repr(value) in err[-1], err


def test_good_mapper_flag_values_still_parse():
    parser = add_mapper_args(argparse.ArgumentParser())
    args = parser.parse_args(["--llm-timeout", "2.5", "--llm-run-timeout", "1e3", "--embedding-threshold", "-0.2"])
    args = parser.parse_args(["--embedding-margin", "0", "--llm-retries", "0", "--llm-max-listed-classes", "1"])
    assert (args.embedding_margin, args.llm_retries, args.llm_max_listed_classes) == (0.0, 0, 1)
    assert parser.parse_args(["--llm-timeout", "2.5"]).llm_timeout == 2.5


@pytest.mark.parametrize("bad", [float("inf"), float("nan"), 0.0])
def test_llm_backends_refuse_non_finite_timeouts(bad):
    with pytest.raises(ValueError, match="timeout must be a positive, finite number of seconds"):
        OpenAIChatClient("http://127.0.0.1:1/v1", timeout=bad)
    for key in ("query_timeout", "run_timeout"):
        with pytest.raises(ValueError, match=f"LLM {key} must be a positive, finite number of seconds"):
            LLMBackend(OpenAIChatClient("http://127.0.0.1:1/v1"), **{key: bad})


@pytest.mark.parametrize("option", ["threshold", "margin"])
def test_embedding_backend_refuses_a_nan_threshold_or_margin(option):
    from autoseg.lave.backends.embedding import EmbeddingBackend

    with pytest.raises(ValueError, match=f"embedding {option} must be a finite number"):
        EmbeddingBackend(**{option: float("nan")})
