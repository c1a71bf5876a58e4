"""EmbeddingEnhancer: identity at init, safetensors round trip with clear errors, and its effect on the pipeline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from autoseg.models.enhancer import EmbeddingEnhancer, EnhancerConfig, load_enhancer, save_enhancer


def perturbed(config: EnhancerConfig, seed: int = 0) -> EmbeddingEnhancer:
    """A head whose every parameter (the zero output projection included) is randomly perturbed."""
    head = EmbeddingEnhancer(config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return head


@pytest.mark.parametrize("block", ["attn", "mlp"])
def test_untrained_head_is_exactly_the_identity(block):
    head = EmbeddingEnhancer(EnhancerConfig(dim=24, width=16, depth=2, block=block, num_heads=2, pos_dim=8)).eval()
    tokens = torch.randn(3, 6 * 5, 24)
    assert torch.equal(head(tokens, (6, 5)), tokens)


def test_trained_head_changes_tokens_and_uses_the_grid():
    head = perturbed(EnhancerConfig(dim=24, width=16, depth=1, num_heads=2, pos_dim=8)).eval()
    tokens = torch.randn(2, 12, 24)
    out = head(tokens, (3, 4))
    assert out.shape == tokens.shape
    assert (out - tokens).abs().mean() > 1e-2
    # the same tokens laid out on another grid get another position code
    assert not torch.allclose(out, head(tokens, (4, 3)))


def test_wrong_token_width_names_the_mismatch():
    head = EmbeddingEnhancer(EnhancerConfig(dim=24, width=16, num_heads=2))
    with pytest.raises(ValueError, match="24-d tokens but got 32-d"):
        head(torch.randn(1, 4, 32), (2, 2))
    with pytest.raises(ValueError, match="for a 3x3 grid"):
        head(torch.randn(1, 4, 24), (3, 3))


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="block 'conv' unknown"):
        EnhancerConfig(dim=8, block="conv")
    with pytest.raises(ValueError, match="multiple of num_heads"):
        EnhancerConfig(dim=8, width=10, num_heads=4)


def test_safetensors_round_trip_keeps_weights_and_hyperparameters(tmp_path):
    config = EnhancerConfig(dim=24, width=16, depth=2, block="mlp", mlp_ratio=1.5, pos_dim=12)
    head = perturbed(config).eval()
    path = save_enhancer(head, tmp_path / "head.safetensors")
    loaded = load_enhancer(path)
    assert loaded.config == config and not loaded.training
    tokens = torch.randn(2, 20, 24)
    torch.testing.assert_close(loaded(tokens, (4, 5)), head(tokens, (4, 5)), rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == ["head.safetensors"]  # atomic write leaves no temp file


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors: enhancer weights not found"):
        load_enhancer(tmp_path / "nope.safetensors")

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_enhancer(tmp_path / "junk.safetensors")

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an AutoSeg enhancer"):
        load_enhancer(tmp_path / "other.safetensors")

    head = EmbeddingEnhancer(EnhancerConfig(dim=8, width=8, depth=1, num_heads=2))
    sd = dict(head.state_dict())
    sd["extra.weight"] = sd.pop("proj_out.weight")
    sd["proj_in.bias"] = torch.zeros(5)
    save_enhancer(head, tmp_path / "edited.safetensors", state_dict=sd)
    with pytest.raises(ValueError) as err:
        load_enhancer(tmp_path / "edited.safetensors")
    msg = str(err.value)
    assert "missing keys ['proj_out.weight']" in msg
    assert "unexpected keys ['extra.weight']" in msg
    assert "proj_in.bias: file (5,) vs model (8,)" in msg


def test_metadata_holds_the_config_as_json(tmp_path):
    from safetensors import safe_open

    head = EmbeddingEnhancer(EnhancerConfig(dim=8, width=8, depth=1, num_heads=2, pos_dim=4))
    save_enhancer(head, tmp_path / "h.safetensors")
    with safe_open(str(tmp_path / "h.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "autoseg.embedding_enhancer"
    assert json.loads(meta["config"]) == {
        "dim": 8,
        "width": 8,
        "depth": 1,
        "block": "attn",
        "num_heads": 2,
        "mlp_ratio": 4.0,
        "pos_dim": 4,
    }


def test_exported_head_loads_into_the_pipeline_and_changes_its_clusters(tmp_path, tiny_clipseg_dir):
    """Identity head == no head; a perturbed head (exported and loaded back) changes the cluster maps."""
    from autoseg.api import build_pipeline
    from autoseg.config import load_config
    from autoseg.models import scratch
    from autoseg.models.blip import load_blip as build_blip

    blip = build_blip("scratch:tiny")  # varied random tokens (see sources._reinit_vision)
    blip_dir = scratch.save(blip.model, blip.processor, tmp_path / "blip")
    config = load_config(
        "configs/debug/pipeline.yaml", {"blip": str(blip_dir), "segmenter": {"source": str(tiny_clipseg_dir)}}
    )
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)) for _ in range(2)]

    def clusters(enhancer):
        """The pipeline's grouping step (``vocabulary()`` up to BBoost, without the slow captioning)."""
        pipeline = build_pipeline(config, enhancer=enhancer)
        tokens = pipeline.captioner.encode(images, pipeline.scales)
        patches = [t.patches if enhancer is None else pipeline.enhancer(t.patches, t.grid) for t in tokens]
        return [pipeline.bboost([p[i] for p in patches], [t.grid for t in tokens]).numpy() for i in range(len(images))]

    dim = blip.hidden_size
    identity = save_enhancer(
        EmbeddingEnhancer(EnhancerConfig(dim=dim, width=16, num_heads=2)), tmp_path / "id.safetensors"
    )
    trained = save_enhancer(
        perturbed(EnhancerConfig(dim=dim, width=16, num_heads=2), seed=1), tmp_path / "t.safetensors"
    )
    plain = clusters(None)
    for a, b in zip(plain, clusters(load_enhancer(identity)), strict=True):
        np.testing.assert_array_equal(a, b)
    changed = clusters(load_enhancer(trained))
    assert any(a.shape != b.shape or (a != b).any() for a, b in zip(plain, changed, strict=True))


def test_infer_enhancer_flag_reports_a_missing_or_mismatched_head(tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys):
    from autoseg.cli.infer import main

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    args = [str(tmp_path / "red.png"), "-o", str(tmp_path / "out"), "--config", "configs/debug/pipeline.yaml"]
    args += ["--blip", str(tiny_blip_dir), "--segmenter", str(tiny_clipseg_dir)]
    assert main([*args, "--enhancer", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err  # caught by the up-front config check, before any model loads
    assert "missing.safetensors" in err and "enhancer" in err and len(err.strip().splitlines()) == 1

    wrong = save_enhancer(EmbeddingEnhancer(EnhancerConfig(dim=24, width=8, num_heads=2)), tmp_path / "w.safetensors")
    assert main([*args, "--enhancer", str(wrong)]) == 2
    assert "trained on 24-d BLIP tokens but BLIP" in capsys.readouterr().err


def with_config(path, **changes):
    """Rewrite an enhancer file's metadata config with ``changes`` (the tensors stay those of the real head)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    config = {**json.loads(metadata["config"]), **changes}
    save_file(tensors, str(path), metadata={**metadata, "config": json.dumps(config)})
    return path


@pytest.mark.parametrize(
    "changes",
    [
        {"dim": 10**9},
        {"width": 10**9},
        {"depth": 10**7},
        {"mlp_ratio": 1e9},
        {"pos_dim": 4 * 10**8},
        {"num_heads": 0},
        {"mlp_ratio": float("nan")},
        {"depth": 1.5},
        {"dim": True},
    ],
    ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()),
)
def test_metadata_that_disagrees_with_the_tensors_is_refused_before_building_the_head(tmp_path, changes):
    import time

    head = EmbeddingEnhancer(EnhancerConfig(dim=8, width=8, depth=1, num_heads=2, pos_dim=4))
    path = with_config(save_enhancer(head, tmp_path / "h.safetensors"), **changes)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        load_enhancer(path)
    msg = str(err.value)
    assert str(path) in msg and f"{next(iter(changes))}=" in msg and "\n" not in msg, msg
    assert time.perf_counter() - start < 5  # nothing of the declared size was allocated


def test_a_huge_declared_head_is_a_one_line_infer_error(tmp_path, tiny_blip_dir, tiny_clipseg_dir, capsys):
    from autoseg.cli.infer import main

    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "red.png")
    head = EmbeddingEnhancer(EnhancerConfig(dim=32, width=8, depth=1, num_heads=2, pos_dim=4))  # BLIP's width
    path = with_config(save_enhancer(head, tmp_path / "h.safetensors"), width=10**9)
    args = [str(tmp_path / "red.png"), "-o", str(tmp_path / "out"), "--config", "configs/debug/pipeline.yaml"]
    args += ["--blip", str(tiny_blip_dir), "--segmenter", str(tiny_clipseg_dir), "--enhancer", str(path)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("infer.py: error: ") and "h.safetensors" in err[-1] and "width" in err[-1]
