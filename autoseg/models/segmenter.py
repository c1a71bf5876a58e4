"""Open-vocabulary segmenters: given images and a list of names, a label map per image.

The vocabulary is always an argument. ``CLIPSegSegmenter`` is the first implementation; others (SAM 3,
Grounded-SAM) register a builder in ``SEGMENTERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

from autoseg.models.loading import load_pretrained

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


@dataclass
class SegmenterConfig:
    """Settings of the open-vocabulary segmenter.

    Attributes:
        name: registry key (see ``SEGMENTERS``).
        source: Hugging Face id or local directory of the weights.
        templates: prompt templates (``{}`` = the name); embeddings are averaged over them.
        threshold: a pixel whose best name scores below this probability is unlabelled (0). 0 gives every pixel
            a name, as the original AutoSeg does.
        image_size: square input side (CLIPSeg's decoder needs a square patch grid).
        class_chunk: names upsampled to full image size at a time (bounds memory on large images).
    """

    name: str = "clipseg"
    source: str = DEFAULT_CLIPSEG
    templates: tuple[str, ...] = DEFAULT_TEMPLATES
    threshold: float = 0.0
    image_size: int = 352
    class_chunk: int = 8


class Segmenter(nn.Module):
    """Interface: ``logits(pixel_values, names)`` and ``segment(images, vocabularies)``."""

    threshold: float = 0.0
    class_chunk: int = 8

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, pixel_values: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Per-name logits ``B x C x h x w`` at the model's output resolution."""
        raise NotImplementedError

    @torch.inference_mode()
    def segment(self, images: Sequence[Image.Image], vocabularies: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """Label maps at each image's original size: 0 = unlabelled, ``i`` = ``vocabularies[b][i - 1]``.

        Args:
            images: RGB images of any sizes.
            vocabularies: one list of names per image (may differ between images, may be empty).

        Returns:
            per image an ``H x W`` int32 label map.
        """
        if len(images) != len(vocabularies):
            raise ValueError(f"got {len(images)} images but {len(vocabularies)} vocabularies")
        pixel_values = self.preprocess(images)
        out = []
        for b, (image, names) in enumerate(zip(images, vocabularies, strict=True)):
            h, w = image.height, image.width
            if not names:
                out.append(np.zeros((h, w), np.int32))
                continue
            logits = self.logits(pixel_values[b : b + 1], list(names))[0].float()  # C x h' x w'
            out.append(self.labels_from_logits(logits, (h, w)))
        return out

    def labels_from_logits(self, logits: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """Upsample ``C x h x w`` logits to ``size`` (in chunks of names) and take the thresholded argmax."""
        best = torch.full(size, -torch.inf, device=logits.device)
        label = torch.zeros(size, dtype=torch.int32, device=logits.device)
        for start in range(0, logits.shape[0], self.class_chunk):
            chunk = F.interpolate(logits[None, start : start + self.class_chunk], size=size, mode="bilinear")[0]
            value, idx = chunk.max(0)
            better = value > best
            best = torch.where(better, value, best)
            label = torch.where(better, idx.int() + start + 1, label)
        if self.threshold > 0:
            label[torch.sigmoid(best) < self.threshold] = 0
        return label.cpu().numpy()


class CLIPSegSegmenter(Segmenter):
    """CLIPSeg with prompt-template ensembles; the image is encoded once and decoded for every name.

    The stock ``CLIPSegForImageSegmentation.forward`` encodes the image once per prompt and runs CLIP under
    ``no_grad``; this forward is built from the same submodules (``clip.vision_model``, ``clip.visual_projection``,
    ``clip.get_text_features``, ``decoder``), gives the same logits, and lets gradients reach any unfrozen part.

    Args:
        model: a ``CLIPSegForImageSegmentation``.
        processor: its ``CLIPSegProcessor``.
        templates: prompt templates with one ``{}``.
        threshold: unlabelled threshold on the best sigmoid probability (0 = off).
        image_size: square input side.
    """

    def __init__(
        self,
        model: CLIPSegForImageSegmentation,
        processor: CLIPSegProcessor,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        threshold: float = 0.0,
        image_size: int = 352,
        class_chunk: int = 8,
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
        self._text_memo: dict[str, torch.Tensor] = {}  # name -> embedding; only used with frozen, no-grad text

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_CLIPSEG, device: str | torch.device = "cpu", dtype=torch.float32, **kwargs
    ) -> CLIPSegSegmenter:
        model = load_pretrained(source, "CLIPSeg segmenter", CLIPSegForImageSegmentation.from_pretrained, "--segmenter")
        processor = load_pretrained(source, "CLIPSeg processor", CLIPSegProcessor.from_pretrained, "--segmenter")
        return cls(model.to(device=device, dtype=dtype), processor, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def train(self, mode: bool = True):
        self._text_memo.clear()
        return super().train(mode)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize to the square input size and normalise. Returns ``B x 3 x S x S``."""
        size = {"height": self.image_size, "width": self.image_size}
        out = self.processor.image_processor(list(images), size=size, do_resize=True, return_tensors="pt")
        return out["pixel_values"].to(device=self.device, dtype=next(self.model.parameters()).dtype)

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in tok.items() if k in ("input_ids", "attention_mask")}

    def text_embeddings(self, names: Sequence[str]) -> torch.Tensor:
        """Template-averaged text embeddings ``C x E`` (memoised per name when nothing trains the text side)."""
        text_frozen = not torch.is_grad_enabled() or not any(
            p.requires_grad for p in self.model.clip.text_model.parameters()
        )
        missing = [n for n in dict.fromkeys(names) if not (text_frozen and n in self._text_memo)]
        fresh: dict[str, torch.Tensor] = {}
        if missing:
            prompts = [t.format(n) for n in missing for t in self.templates]
            feats = self.model.clip.get_text_features(**self.tokenize(prompts)).pooler_output  # (C T) x E
            feats = feats.view(len(missing), len(self.templates), -1).mean(1)
            fresh = dict(zip(missing, feats, strict=True))
            if text_frozen:
                self._text_memo.update({n: f.detach() for n, f in fresh.items()})
        return torch.stack([fresh[n] if n in fresh else self._text_memo[n] for n in names])

    def vision_states(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Hidden states of every CLIP vision layer (embeddings first), each ``B x (1 + N) x D``."""
        vision = self.model.clip.vision_model(pixel_values, output_hidden_states=True, interpolate_pos_encoding=True)
        return vision.hidden_states

    def encode_image(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """CLIP vision activations at the decoder's extract layers, each ``B x (1 + N) x D``."""
        states = self.vision_states(pixel_values)
        return [states[i + 1] for i in self.model.extract_layers]

    def decode(self, activations: Sequence[torch.Tensor], conditional: torch.Tensor) -> torch.Tensor:
        """Decoder for every (image, name) pair. ``conditional``: ``C x E``. Returns ``B x C x H x W`` logits."""
        b, c = activations[0].shape[0], conditional.shape[0]
        acts = [a.repeat_interleave(c, 0) for a in activations]  # (B C) x L x D
        cond = conditional.repeat(b, 1)  # (B C) x E
        logits = self.model.decoder(acts, cond).logits  # (B C) x H x W
        return logits.view(b, c, *logits.shape[-2:])

    def logits(self, pixel_values: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        return self.decode(self.encode_image(pixel_values), self.text_embeddings(names))


SEGMENTERS: dict[str, Callable[..., Segmenter]] = {
    "clipseg": lambda config, device, dtype: CLIPSegSegmenter.from_pretrained(
        config.source,
        device=device,
        dtype=dtype,
        templates=config.templates,
        threshold=config.threshold,
        image_size=config.image_size,
        class_chunk=config.class_chunk,
    ),
}


def build_segmenter(config: SegmenterConfig, device: str | torch.device = "cpu", dtype=torch.float32) -> Segmenter:
    """Build the segmenter named by ``config.name``; an unknown name lists the options."""
    if config.name not in SEGMENTERS:
        raise ValueError(f"unknown segmenter {config.name!r}; available: {sorted(SEGMENTERS)}")
    return SEGMENTERS[config.name](config, device, dtype)
