"""CLIPSeg backend: per-name logits from CLIP features and a light FiLM-conditioned decoder.

The masks come from the decoder's grid of 22 x 22 patch tokens (352 px / 16), upsampled by transposed convolutions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from autoseg.models.loading import load_pretrained
from autoseg.models.scratch import make_clipseg
from autoseg.models.segmenters.base import TEXT_CACHE_SIZE, LRUCache, PerNameSegmenter
from autoseg.models.segmenters.clip_text import template_text_features
from autoseg.models.segmenters.spec import (
    Backend,
    SegmenterConfig,
    nearest_multiples,
    segmenter_source,
    vision_setting,
)
from autoseg.utils.settings import at_least, config_error, rule

DEFAULT_CLIPSEG = "CIDAS/clipseg-rd64-refined"
# A short version of the CLIP/CLIPSeg prompt ensemble; each name's text embedding is the mean over these.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "there is a {} in the scene.",
    "this is a {}.",
)


class CLIPSegSegmenter(PerNameSegmenter):
    """CLIPSeg with prompt-template ensembles; each image is encoded once and decoded for every name.

    The stock ``CLIPSegForImageSegmentation.forward`` encodes the image once per prompt and runs CLIP under
    ``no_grad``; this forward is built from the same submodules (``clip.vision_model``, ``clip.visual_projection``,
    ``clip.get_text_features``, ``decoder``), gives the same logits, and lets gradients reach any unfrozen part.

    Args:
        model: a ``CLIPSegForImageSegmentation``.
        processor: its ``CLIPSegProcessor``.
        templates: prompt templates with one ``{}``.
        threshold: unlabelled threshold on the best sigmoid probability (0 = off).
        image_size: square input side.
        class_chunk: names upsampled to full image size at a time.
        pair_chunk: (image, name) pairs decoded together.
        text_cache_size: names whose text embedding is kept while the text side is frozen.
    """

    def __init__(
        self,
        model: CLIPSegForImageSegmentation,
        processor: CLIPSegProcessor,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        threshold: float = 0.0,
        image_size: int = 352,
        class_chunk: int = 8,
        pair_chunk: int = 8,
        text_cache_size: int = TEXT_CACHE_SIZE,
    ):
        super().__init__()
        if not templates or any("{}" not in t for t in templates):
            raise ValueError(f"every prompt template needs one '{{}}' for the name, got {list(templates)}")
        self.model = model.eval()
        self.processor = processor
        self.templates = tuple(templates)
        self.threshold = threshold
        self.image_size = image_size
        self.class_chunk = class_chunk
        self.pair_chunk = pair_chunk
        self._text_cache = LRUCache(text_cache_size)  # name -> embedding; only used with a frozen, no-grad text side

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_CLIPSEG, device: str | torch.device = "cpu", dtype=torch.float32, **kwargs
    ) -> CLIPSegSegmenter:
        model, processor = load(source)
        return cls(model.to(device=device, dtype=dtype), processor, **kwargs)

    def backbone(self) -> list[nn.Module]:
        return [self.model.clip]

    def head(self) -> list[nn.Module]:
        return [self.model.decoder]

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to the square input size and normalise. Returns ``B x 3 x S x S``."""
        size = {"height": self.image_size, "width": self.image_size}
        out = self.processor.image_processor(list(images), size=size, do_resize=True, return_tensors="pt")
        return out["pixel_values"].to(device=self.device, dtype=next(self.model.parameters()).dtype)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """Template-averaged text embeddings ``C x E`` (cached per name when nothing trains the text side)."""
        text_frozen = not torch.is_grad_enabled() or not any(
            p.requires_grad for p in self.model.clip.text_model.parameters()
        )
        unique = list(dict.fromkeys(names))
        known = {n: self._text_cache.get(n) for n in unique} if text_frozen else {}
        missing = [n for n in unique if known.get(n) is None]
        if missing:
            clip, tokenizer = self.model.clip, self.processor.tokenizer
            feats = template_text_features(clip.text_model, clip.text_projection, tokenizer, self.templates, missing)
            feats = feats.mean(1)  # C x E
            known.update(zip(missing, feats, strict=True))
            if text_frozen:
                for n, f in zip(missing, feats, strict=True):
                    self._text_cache.put(n, f.detach())
        return torch.stack([known[n] for n in names])

    def vision_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states of every CLIP vision layer (embeddings first), each ``B x (1 + N) x D``."""
        vision = self.model.clip.vision_model(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
        return vision.hidden_states

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """CLIP vision activations at the decoder's extract layers, each ``B x (1 + N) x D``."""
        states = self.vision_states(pixel_values)
        return [states[i + 1] for i in self.model.extract_layers]

    def num_images(self, features: list[torch.Tensor]) -> int:
        return features[0].shape[0]

    def num_names(self, text: torch.Tensor) -> int:
        return text.shape[0]

    def decode_pairs(
        self, features: list[torch.Tensor], text: torch.Tensor, image_index: torch.Tensor, name_index: torch.Tensor
    ) -> torch.Tensor:
        """Decoder logits ``P x H x W`` of (image, name) pairs; ``text``: ``C x E`` conditional embeddings."""
        acts = [a[image_index.to(a.device)] for a in features]  # P x L x D each
        logits = self.model.decoder(acts, text[name_index.to(text.device)]).logits
        return logits.view(len(image_index), *logits.shape[-2:])  # a single pair loses its batch axis


# ---------------------------------------------------------------------------------------------------------------------
# The backend's entry in the registry
@dataclass
class CLIPSegOptions:
    """CLIPSeg's own settings.

    Attributes:
        templates: prompt templates (``{}`` = the name); a name's text embedding is the mean over them.
        image_size: square input side (CLIPSeg's decoder needs a square patch grid).
    """

    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    image_size: int = 352


def _template_ok(template: str) -> bool:
    try:
        template.format("x")
    except (IndexError, KeyError, ValueError):
        return False
    return "{}" in template


def load(
    source: str, config: SegmenterConfig | None = None, flag: str = "--segmenter"
) -> tuple[CLIPSegForImageSegmentation, CLIPSegProcessor]:
    """The model and processor of a hub id or a local directory (``flag``: the setting named in errors)."""
    model = load_pretrained(source, "CLIPSeg segmenter", CLIPSegForImageSegmentation.from_pretrained, flag)
    processor = load_pretrained(source, "CLIPSeg processor", CLIPSegProcessor.from_pretrained, flag)
    return model, processor


def assemble(parts: tuple, config: SegmenterConfig) -> CLIPSegSegmenter:
    model, processor = parts
    options: CLIPSegOptions = config.options
    return CLIPSegSegmenter(
        model,
        processor,
        templates=options.templates,
        threshold=config.threshold,
        image_size=options.image_size,
        class_chunk=config.class_chunk,
        pair_chunk=config.pair_chunk,
    )


def check(config: SegmenterConfig, read_model_config: Callable[[str], Any], where: str) -> None:
    """The input side must be a multiple of the vision tower's patch size (others crop the right and bottom edge)."""
    model = read_model_config(segmenter_source(config))
    patch = vision_setting(model, "patch_size") if model is not None else None
    size = config.options.image_size
    if patch is not None and size % patch:
        raise config_error(
            "segmenter.image_size",
            f"expected a multiple of the segmenter's patch size {patch} (vision_config.patch_size of "
            f"{segmenter_source(config)}; other sizes crop the image's right and bottom edge), got {size}; "
            f"e.g. {nearest_multiples(size, patch)}",
            where,
        )


BACKEND = Backend(
    name="clipseg",
    summary="CLIPSeg: light, a CPU is fine, every pixel named, coarse masks (22 x 22 grid)",
    default_source=DEFAULT_CLIPSEG,
    modes=("semantic",),
    model_types=("clipseg",),
    load=load,
    make=make_clipseg,
    assemble=assemble,
    scratch_sizes={
        "tiny": dict(hidden_size=32, num_layers=3, num_heads=4, intermediate_size=37, patch_size=8, image_size=64),
        "small": dict(
            hidden_size=96,
            num_layers=4,
            num_heads=4,
            intermediate_size=192,
            patch_size=8,
            image_size=128,
            projection_dim=64,
            reduce_dim=32,
            extract_layers=(1, 2, 3),
        ),
    },
    options=CLIPSegOptions,
    rules={
        "templates": rule(
            lambda v: len(v) > 0 and all(_template_ok(t) for t in v),
            "a non-empty list of strings, each with one '{}' for the name and no other braces",
            True,
        ),
        "image_size": at_least(1),
    },
    check=check,
    threshold_modes=("semantic",),
    trainable=True,
)
