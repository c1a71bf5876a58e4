"""SAM 3 backend: promptable concept segmentation, one noun phrase (vocabulary name) per prompt.

Each image is encoded once (``vision_embeds``: the ViT and its FPN neck) and reused for every name; each name is
encoded once (CLIP text encoder, padded to 32 tokens as ``Sam3Processor`` does). Per (image, name) pair the DETR
encoder fuses image and text, then either

- ``semantic``: the mask decoder's per-name ``semantic_seg`` logits (``4 x`` the ViT grid: 288 x 288 at 1008 px),
  argmax over names as with CLIPSeg. Computed from the submodules without the DETR decoder (which it does not use);
  equal to the stock forward's ``semantic_seg``. This head is what :class:`autoseg.lit.SegmenterModule` fine-tunes.
- ``instances``: the stock forward; instance masks scored ``sigmoid(pred_logits) * sigmoid(presence_logits)``, kept
  above ``score_threshold`` and merged by :func:`merge_instances` (the higher score wins; uncovered pixels stay 0).

Loads ``Sam3Model`` weights and ``Sam3LiteTextModel`` weights (the lighter text encoder) alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, Sam3LiteTextModel, Sam3Model, Sam3Processor
from transformers.modeling_outputs import BaseModelOutputWithPooling

from autoseg.models.loading import load_pretrained
from autoseg.models.scratch import make_sam3
from autoseg.models.segmenters.base import (
    TEXT_CACHE_SIZE,
    Instances,
    LRUCache,
    PerNameSegmenter,
    empty_map,
    merge_best,
    pair_chunks,
)
from autoseg.models.segmenters.spec import Backend, SegmenterConfig, segmenter_mode
from autoseg.utils.settings import between

DEFAULT_SAM3 = "facebook/sam3"
SAM3_MODES = ("semantic", "instances")
TEXT_LENGTH = 32  # Sam3Processor pads every prompt to 32 tokens
MODEL_CLASSES = {"sam3": Sam3Model, "sam3_video": Sam3Model, "sam3_lite_text": Sam3LiteTextModel}

TextPrompts = tuple[torch.Tensor, torch.Tensor]  # features C x L x D, attention mask C x L


def load_sam3_model(path: str, **kwargs) -> Sam3Model | Sam3LiteTextModel:
    """``Sam3Model`` or ``Sam3LiteTextModel`` by the ``model_type`` in ``config.json``."""
    model_type = AutoConfig.from_pretrained(path, **kwargs).model_type
    if model_type not in MODEL_CLASSES:
        raise ValueError(f"{path} holds a {model_type!r} model; expected one of {sorted(MODEL_CLASSES)} (SAM 3)")
    return MODEL_CLASSES[model_type].from_pretrained(path, **kwargs)


class Sam3Segmenter(PerNameSegmenter):
    """SAM 3 over images x names.

    Args:
        model: a ``Sam3Model`` or ``Sam3LiteTextModel``.
        processor: its ``Sam3Processor`` (square resize to the model's input size, tokenizer).
        mode: "semantic" or "instances".
        threshold: semantic mode: a pixel whose best sigmoid probability is below this is unlabelled (0 = off).
        score_threshold: instances mode: instances scoring at or below this are dropped.
        max_instances: instances mode: at most this many best-scoring instances per image.
        class_chunk: names (or masks) upsampled to full image size at a time.
        pair_chunk: (image, name) pairs decoded together.
        text_cache_size: names whose text features are kept while the text side is frozen.
    """

    def __init__(
        self,
        model: Sam3Model | Sam3LiteTextModel,
        processor: Sam3Processor,
        mode: str = "semantic",
        threshold: float = 0.0,
        score_threshold: float = 0.5,
        max_instances: int = 100,
        class_chunk: int = 8,
        pair_chunk: int = 8,
        text_cache_size: int = TEXT_CACHE_SIZE,
    ):
        super().__init__()
        if mode not in SAM3_MODES:
            raise ValueError(f"SAM 3 mode {mode!r} unknown; choose one of {list(SAM3_MODES)}")
        self.model = model.eval()
        self.processor = processor
        self.mode = mode
        self.threshold = threshold
        self.score_threshold = score_threshold
        self.max_instances = max_instances
        self.class_chunk = class_chunk
        self.pair_chunk = pair_chunk
        self.input_size = model.config.vision_config.backbone_config.image_size
        self._text_cache = LRUCache(text_cache_size)

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_SAM3, device: str | torch.device = "cpu", dtype=torch.float32, **kwargs
    ) -> Sam3Segmenter:
        model, processor = load(source)
        return cls(model.to(device=device, dtype=dtype), processor, **kwargs)

    def backbone(self) -> list[nn.Module]:
        return [self.model.vision_encoder, self.model.text_encoder, self.model.text_projection]

    def head(self) -> list[nn.Module]:
        """The DETR encoder (image-text fusion) and the mask decoder: what turns encoded image and text into
        ``semantic_seg``."""
        return [self.model.detr_encoder, self.model.mask_decoder]

    # ------------------------------------------------------------------ encoders
    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Resize (square, as ``Sam3Processor``) and normalise. Returns ``B x 3 x S x S``."""
        out = self.processor.image_processor(list(images), return_tensors="pt")
        return out["pixel_values"].to(device=self.device, dtype=next(self.model.parameters()).dtype)

    def encode_image(self, pixel_values: torch.Tensor) -> Any:
        """``vision_embeds`` of ``B x 3 x S x S`` pixels (one ViT + FPN forward for the batch)."""
        return self.model.get_vision_features(pixel_values=pixel_values)

    def text_embeddings(self, names: Sequence[str]) -> TextPrompts:
        """Projected text features ``C x L x D`` and their mask ``C x L`` (cached per name while the text is frozen)."""
        text_frozen = not torch.is_grad_enabled() or not any(
            p.requires_grad for m in (self.model.text_encoder, self.model.text_projection) for p in m.parameters()
        )
        unique = list(dict.fromkeys(names))
        known = {n: self._text_cache.get(n) for n in unique} if text_frozen else {}
        missing = [n for n in unique if known.get(n) is None]
        if missing:
            tok = self.processor.tokenizer(
                missing, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="pt"
            )
            ids, mask = tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device)
            feats = self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output  # C x L x D
            for n, f, m in zip(missing, feats, mask, strict=True):
                known[n] = (f, m)
                if text_frozen:
                    self._text_cache.put(n, (f.detach(), m))
        return torch.stack([known[n][0] for n in names]), torch.stack([known[n][1] for n in names])

    def num_images(self, features: Any) -> int:
        return features.fpn_hidden_states[0].shape[0]

    def num_names(self, text: TextPrompts) -> int:
        return text[0].shape[0]

    @staticmethod
    def select_images(features: Any, index: torch.Tensor) -> Any:
        """``vision_embeds`` of the images ``index`` (repeats allowed): the FPN levels the decoders read."""
        pick = [t[index.to(t.device)] for t in features.fpn_hidden_states]
        pos = [t[index.to(t.device)] for t in features.fpn_position_encoding]
        return type(features)(fpn_hidden_states=tuple(pick), fpn_position_encoding=tuple(pos))

    # ------------------------------------------------------------------ decoders
    def decode_pairs(
        self, features: Any, text: TextPrompts, image_index: torch.Tensor, name_index: torch.Tensor
    ) -> torch.Tensor:
        """Per-name ``semantic_seg`` logits ``P x h x w`` of (image, name) pairs, without the DETR decoder.

        The same steps as ``Sam3Model.forward`` up to the mask decoder, which gets no object queries: its semantic
        output depends only on the fused pixel features, not on the queries.
        """
        vision = self.select_images(features, image_index)
        feats, mask = text[0][name_index.to(text[0].device)], text[1][name_index.to(text[1].device)]
        fpn, pos = vision.fpn_hidden_states[:-1], vision.fpn_position_encoding[:-1]
        encoded = self.model.detr_encoder(
            vision_features=[fpn[-1]], text_features=feats, vision_pos_embeds=[pos[-1]], text_mask=mask.bool()
        )
        no_queries = feats.new_zeros(feats.shape[0], 0, feats.shape[-1])
        out = self.model.mask_decoder(
            decoder_queries=no_queries,
            backbone_features=list(fpn),
            encoder_hidden_states=encoded.last_hidden_state,
            prompt_features=feats,
            prompt_mask=mask.bool(),
        )
        return out.semantic_seg[:, 0]  # P x h x w

    def instances(
        self, features: Any, text: TextPrompts, image_index: torch.Tensor, name_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stock forward on (image, name) pairs: mask logits ``P x Q x h x w`` and scores ``P x Q``."""
        out = self.model(
            vision_embeds=self.select_images(features, image_index),
            # the forward reads ``text_embeds.pooler_output`` (what ``get_text_features`` returns)
            text_embeds=BaseModelOutputWithPooling(pooler_output=text[0][name_index.to(text[0].device)]),
            attention_mask=text[1][name_index.to(text[1].device)],
        )
        scores = torch.sigmoid(out.pred_logits) * torch.sigmoid(out.presence_logits)  # P x Q
        return out.pred_masks, scores

    @torch.inference_mode()
    def segment(
        self,
        images: Sequence[Image.Image],
        vocabularies: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[np.ndarray]:
        if self.mode == "semantic":
            return super().segment(images, vocabularies, threshold)
        out = [empty_map(im) for im in images]
        todo, names, features, text = self.encode_batch(images, vocabularies)
        found: list[list[Instances]] = [[] for _ in todo]
        for image_index, name_index, label in pair_chunks(vocabularies, todo, names, self.pair_chunk):
            masks, scores = self.instances(features, text, image_index, name_index)  # P x Q x h x w, P x Q
            for p, k in enumerate(image_index.tolist()):
                keep = scores[p] > self.score_threshold
                labels = label[p].int().expand(int(keep.sum()))
                found[k].append((masks[p][keep], scores[p][keep], labels))
        for k, b in enumerate(todo):
            out[b] = merge_best(found[k], (images[b].height, images[b].width), self.max_instances, self.class_chunk)
        return out


# ---------------------------------------------------------------------------------------------------------------------
# The backend's entry in the registry
@dataclass
class Sam3Options:
    """SAM 3's own settings.

    Attributes:
        score_threshold: instances mode: keep instances with ``sigmoid(pred_logits) * sigmoid(presence_logits)``
            above this.
    """

    score_threshold: float = 0.5


def load(
    source: str, config: SegmenterConfig | None = None, flag: str = "--segmenter"
) -> tuple[Sam3Model | Sam3LiteTextModel, Sam3Processor]:
    """The model (``Sam3Model`` or ``Sam3LiteTextModel``) and processor of a hub id or a local directory."""
    model = load_pretrained(source, "SAM 3 segmenter", load_sam3_model, flag)
    processor = load_pretrained(source, "SAM 3 processor", Sam3Processor.from_pretrained, flag)
    return model, processor


def assemble(parts: tuple, config: SegmenterConfig) -> Sam3Segmenter:
    model, processor = parts
    return Sam3Segmenter(
        model,
        processor,
        mode=segmenter_mode(config),
        threshold=config.threshold,
        score_threshold=config.options.score_threshold,
        max_instances=config.max_instances,
        class_chunk=config.class_chunk,
        pair_chunk=config.pair_chunk,
    )


BACKEND = Backend(
    name="sam3",
    summary="SAM 3: the strongest; semantic (per-name logits) or instances mode; needs a GPU",
    default_source=DEFAULT_SAM3,
    modes=SAM3_MODES,
    model_types=tuple(MODEL_CLASSES),
    load=load,
    make=make_sam3,
    assemble=assemble,
    scratch_sizes={
        "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=37, patch_size=8, image_size=64),
        "small": dict(hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, patch_size=8, image_size=128),
    },
    options=Sam3Options,
    rules={"score_threshold": between(0, 1)},
    threshold_modes=("semantic",),
    trainable=True,
)
