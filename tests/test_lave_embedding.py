"""Embedding LAVE backend with the real offline all-MiniLM-L6-v2: synonyms -> their class, non-classes -> background.

The lists were written before any tuning and split in two: the development halves (``*_DEV``) chose the backend's
defaults (templates, anchors, threshold 0.4, margin 0.05, anchor dedupe 0.65); the held-out halves (``*_HELD``) were
scored once, with those defaults frozen. Figures (this machine, MiniLM, defaults):

    VOC synonyms      dev 39/42 (92.9%)   held-out 26/31 (83.9%)   all 65/73 (89.0%)
    VOC non-classes   dev 38/38 (100%)    held-out 27/28 (96.4%)   -> background
    ADE-150 synonyms  dev 26/35 (74.3%)   held-out 13/23 (56.5%)   (150 close classes: much harder for MiniLM)
    plain nearest-neighbour cosine, best single threshold: no threshold reaches 90% on both VOC dev lists.
"""

import pytest

from autoseg.data.classes import class_names
from autoseg.lave import build_mapper
from autoseg.lave.backends.embedding import EmbeddingBackend


def pairs(text: str) -> list[tuple[str, str]]:
    return [tuple(p.split(":")) for p in text.split(",")]


VOC_SYN_DEV = pairs(
    "puppy:dog,automobile:car,couch:sofa,tv:tv monitor,motorcycle:motorbike,airplane:aeroplane,plane:aeroplane,"
    "kitten:cat,lamb:sheep,ship:boat,man:person,woman:person,child:person,bike:bicycle,television:tv monitor,"
    "jet:aeroplane,pony:horse,calf:cow,cattle:cow,parrot:bird,pigeon:bird,yacht:boat,canoe:boat,locomotive:train,"
    "scooter:motorbike,armchair:chair,stool:chair,houseplant:potted plant,sedan:car,taxi:car,boy:person,girl:person,"
    "hound:dog,kitty:cat,ewe:sheep,bull:cow,duck:bird,minibus:bus,settee:sofa,monitor:tv monitor,"
    "flowerpot:potted plant,aircraft:aeroplane"
)
VOC_SYN_HELD = pairs(
    "terrier:dog,poodle:dog,stallion:horse,foal:horse,ox:cow,eagle:bird,sparrow:bird,seagull:bird,sailboat:boat,"
    "kayak:boat,ferry:boat,moped:motorbike,loveseat:sofa,screen:tv monitor,pedestrian:person,kid:person,lady:person,"
    "gentleman:person,jeep:car,coach:bus,airliner:aeroplane,jetliner:aeroplane,owl:bird,hen:bird,tomcat:cat,"
    "recliner:chair,limousine:car,hatchback:car,trolleybus:bus,plant:potted plant,table:dining table"
)
VOC_NON_DEV = (
    "sky road wall grass tree building floor ceiling water cloud mountain sand snow street fence window door ground "
    "field rock cup hat shoe ball kite knife bag toy fork spoon pen glove garden park smoke fire rain dust"
).split()
VOC_NON_HELD = (
    "beach forest river lake ocean sidewalk pavement lawn hill bridge roof house carpet curtain lamp shelf book clock "
    "umbrella pole sign light sun shadow bush leaf brick dirt"
).split()
ADE_SYN_DEV = pairs(
    "picture:painting,carpet:rug,fridge:refrigerator,cupboard:cabinet,closet:wardrobe,drape:curtain,"
    "pavement:sidewalk,ocean:sea,boulder:rock,bookshelf:bookcase,tv:television receiver,dustbin:ashcan,toy:plaything,"
    "lamppost:streetlight,jet:airplane,lorry:truck,clothes:apparel,soil:earth,lawn:grass,highway:road,shrub:plant,"
    "cooker:stove,statue:sculpture,duvet:blanket,noticeboard:bulletin board,sign:signboard,dresser:chest of drawers,"
    "heater:radiator,automobile:car,couch:sofa,laptop:computer,window:windowpane,pillar:column,creek:river,basin:sink"
)
ADE_SYN_HELD = pairs(
    "mat:rug,icebox:refrigerator,street:road,stone:rock,television:television receiver,bin:ashcan,doll:plaything,"
    "airliner:airplane,pickup:truck,dress:apparel,shirt:apparel,dirt:earth,bush:plant,quilt:blanket,walkway:path,"
    "divan:sofa,tub:bathtub,lavatory:toilet,motorcycle:minibike,bike:bicycle,meal:food,ground:earth,aeroplane:airplane"
)


def test_lists_are_disjoint_and_large_enough():
    voc = class_names("voc20")
    syn = VOC_SYN_DEV + VOC_SYN_HELD
    assert len(syn) >= 40 and len({n for n, _ in syn}) == len(syn)
    assert all(t in voc and n not in voc for n, t in syn)
    assert not set(VOC_NON_DEV) & set(VOC_NON_HELD) and not (set(VOC_NON_DEV) | set(VOC_NON_HELD)) & set(voc)
    ade = class_names("ade150")
    assert all(t in ade and n not in ade for n, t in ADE_SYN_DEV + ADE_SYN_HELD)


@pytest.fixture(scope="module")
def mapper():
    # lemmatize=False: the names must reach the embedding backend, not be rescued by the exact stage
    return build_mapper("embedding", lemmatize=False, progress=False)


def accuracy(mapper, syn, classes, dataset):
    out = mapper.map_names([n for n, _ in syn], classes, dataset)
    wrong = [(n, t, classes[out[n]] if out[n] is not None else None) for n, t in syn if out[n] != classes.index(t)]
    return 1 - len(wrong) / len(syn), wrong


def background_rate(mapper, names, classes, dataset):
    out = mapper.map_names(names, classes, dataset)
    wrong = [(n, classes[out[n]]) for n in names if out[n] is not None]
    return 1 - len(wrong) / len(names), wrong


def test_voc_synonyms(mapper):
    voc = class_names("voc20")
    acc_dev, wrong_dev = accuracy(mapper, VOC_SYN_DEV, voc, "voc20")
    acc_held, wrong_held = accuracy(mapper, VOC_SYN_HELD, voc, "voc20")
    print(f"VOC synonyms: dev {acc_dev:.3f} wrong {wrong_dev}; held-out {acc_held:.3f} wrong {wrong_held}")
    assert acc_dev >= 0.90, wrong_dev
    assert acc_held >= 0.80, wrong_held
    assert all(mapper.records[n]["source"] == "backend" for n, _ in VOC_SYN_DEV)


def test_voc_non_classes_go_to_background(mapper):
    voc = class_names("voc20")
    rate_dev, wrong_dev = background_rate(mapper, VOC_NON_DEV, voc, "voc20")
    rate_held, wrong_held = background_rate(mapper, VOC_NON_HELD, voc, "voc20")
    print(f"VOC non-classes to background: dev {rate_dev:.3f} {wrong_dev}; held-out {rate_held:.3f} {wrong_held}")
    assert rate_dev == 1.0, wrong_dev
    assert rate_held >= 0.90, wrong_held
    raw = mapper.records["sky"]["raw"]
    assert raw["score"] <= raw["anchor_score"] + 0.05 or raw["score"] < 0.4  # the decision the raw scores record


def test_ade150_synonyms_lower_bound(mapper):
    """ADE-150 has many close classes (lamp/light/streetlight, cabinet/wardrobe/chest of drawers): figures above."""
    ade = class_names("ade150")
    acc_dev, wrong_dev = accuracy(mapper, ADE_SYN_DEV, ade, "ade150")
    acc_held, wrong_held = accuracy(mapper, ADE_SYN_HELD, ade, "ade150")
    print(f"ADE-150 synonyms: dev {acc_dev:.3f} {wrong_dev}; held-out {acc_held:.3f} {wrong_held}")
    assert acc_dev >= 0.70 and acc_held >= 0.50
    # anchors that are ADE classes are not used as anchors for ADE
    assert not set(mapper.backend.kept_anchors(ade)) & set(ade)


def test_plain_nearest_neighbour_threshold_cannot_separate(mapper):
    """Why the anchors: with one template and no anchors, no single threshold gets 90% on both VOC dev lists."""
    voc = class_names("voc20")
    plain = EmbeddingBackend(anchors="none", templates=("{}",), head_aliases=False)
    plain._encoder = mapper.backend.encoder  # same MiniLM weights, no second load
    syn = {n: (idx, raw["score"]) for n, idx, raw in plain.map([n for n, _ in VOC_SYN_DEV], voc, "voc20")}
    non = [raw["score"] for _, _, raw in plain.map(VOC_NON_DEV, voc, "voc20")]
    best = 0.0
    for t in sorted({s for _, s in syn.values()} | set(non)):
        ok_syn = sum(syn[n][0] == voc.index(c) and syn[n][1] >= t for n, c in VOC_SYN_DEV)
        ok_non = sum(s < t for s in non)
        best = max(best, min(ok_syn / len(VOC_SYN_DEV), ok_non / len(VOC_NON_DEV)))
    print(f"plain nearest neighbour, best single threshold: min(syn acc, non-class rate) = {best:.3f}")
    assert best < 0.90


def test_embedding_cache_reuse(tmp_path, mapper):
    voc = class_names("voc20")
    cache = tmp_path / "emb.json"
    m1 = build_mapper("embedding", cache_path=cache, lemmatize=False, progress=False)
    m1.backend = mapper.backend  # same settings: reuse the loaded model and class embeddings
    first = m1.map_names(["puppy", "sky", "couch"], voc, "voc20")
    assert m1.n_backend_calls == 3 and first == {"puppy": voc.index("dog"), "sky": None, "couch": voc.index("sofa")}
    m2 = build_mapper("embedding", cache_path=cache, lemmatize=False, progress=False)
    assert m2.map_names(["puppy", "sky", "couch"], voc, "voc20") == first
    assert m2.n_backend_calls == 0 and m2.backend._encoder is None  # the model was not even loaded
    assert m2.backend.cache_id == mapper.backend.cache_id
    assert m2.records["puppy"]["source"] == "cache" and m2.records["puppy"]["raw"]["best_class"] == "dog"
    # other settings are another cache key
    m3 = build_mapper("embedding", cache_path=cache, threshold=0.5, lemmatize=False, progress=False)
    m3.backend._encoder = mapper.backend.encoder
    m3.backend._class_state = mapper.backend._class_state  # class/anchor embeddings do not depend on the threshold
    m3.map_names(["puppy"], voc, "voc20")
    assert m3.n_backend_calls == 1
