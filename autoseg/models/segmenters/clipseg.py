"""CLIPSeg backend: per-name logits from CLIP features and a light FiLM-conditioned decoder.

The masks come from the decoder's grid of 22 x 22 patch tokens (352 px / 16), upsampled by transposed convolutions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import nn
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from autoseg.models.loading import load_pretrained
from autoseg.models.segmenters.base import TEXT_CACHE_SIZE, LRUCache, PerNameSegmenter
from autoseg.models.segmenters.clip_text import template_text_features

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
        model = load_pretrained(source, "CLIPSeg segmenter", CLIPSegForImageSegmentation.from_pretrained, "--segmenter")
        processor = load_pretrained(source, "CLIPSeg processor", CLIPSegProcessor.from_pretrained, "--segmenter")
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
