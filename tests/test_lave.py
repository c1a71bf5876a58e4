"""LAVE mapper: exact matching, answer parser, prompts, cache, HTTP transport (stub server), builders, tiny LM."""

import argparse
import json

import pytest
from lave_helpers import StubChatServer, free_port

from autoseg.lave import (
    ExactMatcher,
    MappingCache,
    MappingError,
    add_mapper_args,
    build_mapper,
    build_prompt,
    mapper_from_args,
    parse_answer,
)
from autoseg.lave.backends.llm import LLMBackend, LLMConnectionError, OpenAIChatClient, chat_completions_url
from autoseg.lave.matching import singular_forms
from autoseg.lave.prompts import parse_decision

VOC = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "dining table", "dog",
       "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor"]  # fmt: skip
ADE_SOME = ["wall", "table", "coffee table", "pool table", "glass", "screen", "crt screen", "stairs", "stairway"]
I = {c: i for i, c in enumerate(VOC)}  # noqa: E741


# ------------------------------------------------------------------------------------------------ exact matching


def test_singular_forms_by_hand():
    assert singular_forms("buses") == {"buse", "bus"}
    assert singular_forms("ponies") == {"pony", "poni", "ponie"}
    assert "leaf" in singular_forms("leaves")
    assert singular_forms("glass") == set()
    assert singular_forms("bus") == set()


@pytest.mark.parametrize(
    "name,expected",
    [
        ("dog", "dog"),
        ("Dogs", "dog"),
        ("tvmonitor", "tv monitor"),
        ("TV-Monitors", "tv monitor"),
        ("potted_plant", "potted plant"),
        ("pottedplants", "potted plant"),
        ("diningtable", "dining table"),
        ("buses", "bus"),
        ("sheep", "sheep"),
        ("puppy", None),
        ("plant", None),  # a part of a class name is no exact match
        ("", None),
    ],
)
def test_exact_matcher_voc(name, expected):
    m = ExactMatcher(VOC)
    got = m.match(name)
    assert (VOC[got] if got is not None else None) == expected


def test_exact_matcher_prefers_whole_name_and_reports_ambiguity():
    m = ExactMatcher(ADE_SOME)
    assert ADE_SOME[m.match("tables")] == "table"
    assert ADE_SOME[m.match("coffee tables")] == "coffee table"
    assert ADE_SOME[m.match("glass")] == "glass"
    # "glasses" singularises to "glass" only -> the glass class
    assert ADE_SOME[m.match("glasses")] == "glass"
    # two classes with the same key are ambiguous -> no exact match
    assert ExactMatcher(["mouse", "Mouse"]).match("mouse") is None


def test_exact_matcher_synonyms_and_lemmas():
    m = ExactMatcher(["earth", "sidewalk"], synonyms=[["ground"], ["pavement"]])
    assert m.match("grounds") == 0 and m.match("pavement") == 1
    lemmas = {"people": "person", "children": "child"}
    m = ExactMatcher(["person", "child"], lemmatizer=lambda xs: [lemmas.get(x, x) for x in xs])
    assert m.match("people") == 0 and m.match("children") == 1


def test_exact_matcher_search_longest_first():
    m = ExactMatcher(ADE_SOME)
    assert m.search("it is a coffee table, not a wall") == {ADE_SOME.index("coffee table"), 0}
    assert m.search("the crt screens") == {ADE_SOME.index("crt screen")}
    assert m.search("nothing here") == set()


# ------------------------------------------------------------------------------------------------------- parser


@pytest.mark.parametrize(
    "answer,expected",
    [
        ("'dog'", "dog"),  # the paper's form
        ("The answer is 'dog'.", "dog"),
        ("'Dogs'", "dog"),
        ('"sofa"', "sofa"),  # double quotes
        ("‘tv monitor’", "tv monitor"),  # typographic quotes
        ("'tvmonitor'", "tv monitor"),
        ("dog", "dog"),  # no quotes
        ("It's most similar to the class dog.", "dog"),  # apostrophe is no quote
        ("'puppy' is most similar to 'dog'", "dog"),  # quoted non-class + quoted class
        ("'puppy' is most similar to dog", "dog"),  # quoted non-class + unquoted class
        ("'dog' or 'cat'", None),  # multi-match -> void
        ("dog and cat", None),
        ("'void'", None),
        ("'void' (it is not a dog)", None),  # a quoted void wins over an unquoted class
        ("I don't know.", None),  # junk
        ("", None),
        ("'potted plant'", "potted plant"),
        ("The class that is most similar to the class in question is 'puppy", None),  # SmolLM-style junk
    ],
)
def test_parse_answer(answer, expected):
    got = parse_answer(answer, ExactMatcher(VOC))
    assert (VOC[got] if got is not None else None) == expected


@pytest.mark.parametrize(
    "answer,decided",
    [("'dog'", True), ("dog and cat", True), ("'void'", True), ("Void.", True), ("None", True), ("'sky'", False),
     ("I don't know.", False), ("", False), ("  ", False), ("The class is 'puppy", False)],
)  # fmt: skip
def test_parse_decision_tells_junk_from_void(answer, decided):
    assert parse_decision(answer, ExactMatcher(VOC))[0] is decided


def test_parse_answer_longest_class_in_text():
    m = ExactMatcher(ADE_SOME)
    assert ADE_SOME[parse_answer("'coffee table'", m)] == "coffee table"
    assert ADE_SOME[parse_answer("it is a coffee table", m)] == "coffee table"


def test_prompt_forms():
    p = build_prompt("puppy", VOC, "voc20")
    assert p.startswith("To which class in ['aeroplane', 'bicycle'") and "'tv monitor']" in p
    assert "is 'puppy' exclusively most similar to?" in p and "answer with 'void'" in p
    big = [f"class{i}" for i in range(847)]
    p = build_prompt("puppy", big, "ade847")
    assert "ADE20K (847 classes) dataset" in p and "class0" not in p
    p = build_prompt("puppy", big[:300], "ade847", max_listed_classes=300)
    assert "'class299'" in p


# -------------------------------------------------------------------------------------------------------- cache


def test_cache_roundtrip_version_and_errors(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    c = MappingCache(path)
    c.put("voc20", "llm", "m", "puppy", "dog", "'dog'")
    c.put("voc20", "llm", "m", "sky", None, "'void'")
    c.save()
    data = json.loads(path.read_text())
    assert data["format"] == "autoseg-lave-cache" and data["version"] == 1 and len(data["entries"]) == 2
    assert not list(path.parent.glob("*.tmp*"))  # atomic write left no temporary file
    c2 = MappingCache(path)
    assert c2.get("voc20", "llm", "m", "puppy") == {
        "dataset": "voc20", "backend": "llm", "model": "m", "name": "puppy", "class": "dog", "raw": "'dog'"
    }  # fmt: skip
    assert c2.get("voc20", "llm", "other-model", "puppy") is None
    assert c2.get("ade150", "llm", "m", "puppy") is None
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="version 99"):
        MappingCache(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cache.json"):
        MappingCache(path)


# --------------------------------------------------------------------------------------- builders and arguments


def test_build_mapper_unknown_kind_and_option():
    with pytest.raises(ValueError, match=r"available: \['embedding', 'exact', 'llm'\]"):
        build_mapper("wordnet")
    with pytest.raises(TypeError, match="threshold"):
        build_mapper("llm", threshold=0.3)
    with pytest.raises(ValueError, match="http"):
        build_mapper("llm", transport="http")


def test_exact_mapper_records():
    m = build_mapper("exact", lemmatize=False, progress=False)
    out = m.map_names(["Dogs", "puppy", "tvmonitor", "Dogs"], VOC, "voc20")
    assert out == {"Dogs": I["dog"], "puppy": None, "tvmonitor": I["tv monitor"]}
    assert m.records["Dogs"]["class"] == "dog" and m.records["Dogs"]["source"] == "exact"
    assert m.records["puppy"] == {"class": None, "source": "exact", "raw": "no exact match", "dataset": "voc20"}


def test_exact_mapper_uses_dataset_synonyms():
    from autoseg.data.classes import class_names, class_synonyms

    ade = class_names("ade847")
    i = next(k for k, s in enumerate(class_synonyms("ade847")) if "pavement" in s[1:])
    m = build_mapper("exact", lemmatize=False, progress=False)
    assert m.map_names(["pavement"], ade, "ade847") == {"pavement": i}


def test_mapper_from_args(tmp_path):
    p = add_mapper_args(argparse.ArgumentParser())
    args = p.parse_args(["--mapper", "llm", "--llm-endpoint", "http://127.0.0.1:1/v1", "--llm-retries", "0",
                         "--mapper-cache", str(tmp_path / "c.json"), "--llm-model", "x"])  # fmt: skip
    m = mapper_from_args(args)
    assert m.kind == "llm" and m.backend.chat.retries == 0 and m.backend.chat.model == "x"
    assert m.cache.path == tmp_path / "c.json"
    m = mapper_from_args(p.parse_args(["--mapper", "embedding", "--embedding-threshold", "0.3"]))
    assert m.kind == "embedding" and m.backend.threshold == 0.3
    assert mapper_from_args(p.parse_args(["--mapper", "exact"])).kind == "exact"


# ------------------------------------------------------------------------------------ HTTP transport (stub server)

ANSWERS = {"puppy": "'dog'", "automobile": "The answer is 'car'.", "sky": "'void'", "kitten": '"cat"',
           "blob": "'dog' or 'cat'", "thing": "no idea"}  # fmt: skip


def test_chat_completions_url():
    assert chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions") == "http://h:1/v1/chat/completions"


def test_llm_http_mapping_cache_reuse(tmp_path):
    cache = tmp_path / "lave.json"
    names = ["puppy", "dog", "automobile", "sky", "kitten", "blob", "thing", "puppy"]
    with StubChatServer(lambda n: ANSWERS[n]) as srv:
        m = build_mapper("llm", endpoint=srv.url, cache_path=cache, lemmatize=False, progress=False)
        out = m.map_names(names, VOC, "voc20")
        assert out == {"puppy": I["dog"], "dog": I["dog"], "automobile": I["car"], "sky": None, "kitten": I["cat"],
                       "blob": None, "thing": None}  # fmt: skip
        # one models listing (no --llm-model) + one query per unique non-exact name, in order; the junk answer
        # to "thing" is asked twice more, then "thing" is void for this run only
        assert srv.requests == ["/v1/models", "puppy", "automobile", "sky", "kitten", "blob", *["thing"] * 3]
        assert srv.last_body["temperature"] == 0 and srv.last_body["model"] == "stub-model"
        assert "'tv monitor']" in srv.last_body["messages"][0]["content"]
        assert m.records["dog"]["source"] == "exact" and m.records["thing"]["source"] == "undecided"
        assert m.records["automobile"] == {"class": "car", "source": "backend", "raw": "The answer is 'car'.",
                                           "dataset": "voc20"}  # fmt: skip
        saved = {e["name"]: e for e in json.loads(cache.read_text())["entries"]}
        assert saved["sky"]["class"] is None and saved["sky"]["raw"] == "'void'" and saved["puppy"]["class"] == "dog"
        assert "thing" not in saved and saved["blob"]["class"] is None  # junk is not cached, a multi-match is
        n_before = len(srv.requests)
        # a second run (new mapper, same cache file) asks only the undecided name again
        m2 = build_mapper("llm", endpoint=srv.url, cache_path=cache, lemmatize=False, progress=False)
        assert m2.map_names(names, VOC, "voc20") == out
        assert srv.requests[n_before:] == ["/v1/models", *["thing"] * 3] and m2.n_backend_calls == 1
        assert (
            m2.records["automobile"]["source"] == "cache" and m2.records["automobile"]["raw"] == "The answer is 'car'."
        )
        # another dataset is another key: asked again
        m2.map_names(["puppy"], ["dog", "cat"], "pets")
        assert srv.requests[-1] == "puppy"


def test_llm_http_failure_keeps_cache(tmp_path):
    cache = tmp_path / "lave.json"

    def reply(n):
        return 500 if n == "boom" else ANSWERS[n]

    with StubChatServer(reply) as srv:
        m = build_mapper("llm", endpoint=srv.url, model="stub", cache_path=cache, retries=1, backoff=0.01,
                         save_every=100, lemmatize=False, progress=False)  # fmt: skip
        with pytest.raises(MappingError, match=r"llm backend .*failed on name 'boom'") as err:
            m.map_names(["puppy", "automobile", "boom", "kitten"], VOC, "voc20")
        assert isinstance(err.value.__cause__, LLMConnectionError)
        assert srv.requests == ["puppy", "automobile", "boom", "boom"]  # one retry, then give up
        saved = {e["name"] for e in json.loads(cache.read_text())["entries"]}
        assert saved == {"puppy", "automobile"}
        # the rerun resumes: only the failed and the remaining names are asked
        srv.reply = lambda n: ANSWERS.get(n, "'void'")
        m2 = build_mapper("llm", endpoint=srv.url, model="stub", cache_path=cache, lemmatize=False, progress=False)
        assert m2.map_names(["puppy", "automobile", "boom", "kitten"], VOC, "voc20")["kitten"] == I["cat"]
        assert srv.requests[4:] == ["boom", "kitten"]


def test_llm_http_unreachable_is_clear(tmp_path):
    port = free_port()  # nothing listens there
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", model="m", retries=1, backoff=0.01, timeout=2)
    with pytest.raises(LLMConnectionError, match=rf"127.0.0.1:{port}.*after 2 attempts.*llama_cpp.server"):
        client.complete([{"role": "user", "content": "hi"}])
    assert client.n_requests == 2
    with pytest.raises(ValueError, match="http"):
        OpenAIChatClient("127.0.0.1:8000")


def test_llm_http_client_error_is_not_retried():
    with StubChatServer(lambda n: 404) as srv:
        client = OpenAIChatClient(srv.url, model="nope", retries=3, backoff=0.01)
        with pytest.raises(LLMConnectionError, match="HTTP 404"):
            LLMBackend(client).map(["puppy"], VOC, "voc20").__next__()
        assert srv.requests == ["puppy"]


# ----------------------------------------------------------------------------- local transformers LM (tiny, random)


@pytest.fixture(scope="module")
def tiny_chat_lm(tmp_path_factory):
    """A tiny random Llama with a word-level tokenizer and a chat template, saved with save_pretrained."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "'", "void", *sorted({w for c in VOC for w in c.split()}), "user", "assistant"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tok.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}assistant"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=1, eos_token_id=2)  # fmt: skip
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_llm_transformers_tiny_model_runs_and_is_deterministic(tiny_chat_lm, tmp_path):
    names = ["puppy", "automobile", "kitten", "sky"]
    m = build_mapper("llm", model=str(tiny_chat_lm), max_tokens=6, cache_path=tmp_path / "c.json",
                     lemmatize=False, progress=False)  # fmt: skip
    out = m.map_names(names, VOC, "voc20")
    assert set(out) == set(names)
    assert all(v is None or 0 <= v < len(VOC) for v in out.values())
    assert m.backend.chat.n_calls == len(names)
    assert all(isinstance(m.records[n]["raw"], str) for n in names)
    # greedy decoding: a fresh model gives the same raw answers (here with time limits, passed as max_time)
    m2 = build_mapper("llm", model=str(tiny_chat_lm), max_tokens=6, timeout=60, run_timeout=600, lemmatize=False,
                      progress=False)  # fmt: skip
    m2.map_names(names, VOC, "voc20")
    assert [m2.records[n]["raw"] for n in names] == [m.records[n]["raw"] for n in names]


def test_llm_transformers_missing_model_is_clear(tmp_path):
    m = build_mapper("llm", model=str(tmp_path / "nothing-here"), lemmatize=False, progress=False)
    with pytest.raises(MappingError, match="nothing-here"):
        m.map_names(["puppy"], VOC, "voc20")
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        build_mapper("llm", model=str(tmp_path / "missing.gguf"))
