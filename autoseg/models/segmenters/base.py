"""What every segmenter backend shares: the interface, logits -> label map, the instance merge, a bounded text cache.

A segmenter turns images and one vocabulary per image into label maps (0 = unlabelled, ``i`` = the ``i``-th name).
Backends with per-name logits (CLIPSeg, SAM 3's semantic head) subclass :class:`PerNameSegmenter`, which encodes every
image of a batch once, every name once, and decodes all (image, name) pairs in chunked batches. Instance backends (SAM 3
instances, Grounding DINO + SAM) give scored masks that :func:`merge_instances` turns into one label map.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.checkpoint import checkpoint

TEXT_CACHE_SIZE = 4096  # names whose text embedding is kept (least recently used dropped first)


class LRUCache:
    """A dict with at most ``maxsize`` entries; reading or writing a key makes it the most recent."""

    def __init__(self, maxsize: int = TEXT_CACHE_SIZE):
        if maxsize < 0:
            raise ValueError(f"cache size must be >= 0, got {maxsize}")
        self.maxsize = maxsize
        self._data: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any | None:
        if key not in self._data:
            return None
        self._data.move_to_end(key)
        return self._data[key]

    def put(self, key: Hashable, value: Any) -> None:
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.maxsize:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


def check_batch(images: Sequence[Image.Image], vocabularies: Sequence[Sequence[str]]) -> None:
    if len(images) != len(vocabularies):
        raise ValueError(f"got {len(images)} images but {len(vocabularies)} vocabularies")


def unique_names(vocabularies: Sequence[Sequence[str]]) -> list[str]:
    """Every name of the batch once, in order of first appearance."""
    return list(dict.fromkeys(n for names in vocabularies for n in names))


def pair_chunks(
    vocabularies: Sequence[Sequence[str]], images: Sequence[int], names: Sequence[str], chunk: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """All (image, name) pairs, image-major, in chunks of at most ``chunk`` pairs.

    Args:
        vocabularies: per image its names.
        images: the images to pair up (indices into ``vocabularies``); pairs index their position in this list.
        names: the batch's unique names; pairs index their position in this list.

    Yields:
        ``(image_index, name_index, label)``: three ``P`` long tensors; ``label`` is the name's 1-based position in
        its image's vocabulary (its value in the label map).
    """
    where = {n: i for i, n in enumerate(names)}
    pairs = [(k, where[n], i + 1) for k, b in enumerate(images) for i, n in enumerate(vocabularies[b])]
    for start in range(0, len(pairs), chunk):
        part = torch.tensor(pairs[start : start + chunk], dtype=torch.long)  # P x 3
        yield part[:, 0], part[:, 1], part[:, 2]


def labels_from_logits(
    logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0, class_chunk: int = 8
) -> np.ndarray:
    """Thresholded argmax of per-name logits upsampled to ``size``.

    Args:
        logits: ``C x h x w`` per-name logits.
        size: output ``(H, W)``; names are upsampled (bilinear) ``class_chunk`` at a time to bound memory.
        threshold: a pixel whose best sigmoid probability is below this is unlabelled (0 = off).

    Returns:
        ``H x W`` int32: 0 = unlabelled, ``i`` = the ``i``-th name.
    """
    best = torch.full(size, -torch.inf, device=logits.device)
    label = torch.zeros(size, dtype=torch.int32, device=logits.device)
    for start in range(0, logits.shape[0], class_chunk):
        chunk = F.interpolate(logits[None, start : start + class_chunk].float(), size=size, mode="bilinear")[0]
        value, idx = chunk.max(0)
        better = value > best
        best = torch.where(better, value, best)
        label = torch.where(better, idx.int() + start + 1, label)
    if threshold > 0:
        label[torch.sigmoid(best) < threshold] = 0
    return label.cpu().numpy()


def merge_instances(
    mask_logits: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    size: tuple[int, int],
    chunk: int = 8,
    resize: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> np.ndarray:
    """One label map from scored instance masks: each pixel takes the label of the best-scoring mask covering it.

    A mask covers a pixel where its logit, upsampled (bilinear) to ``size``, is above 0 (probability above 0.5).
    Pixels no mask covers stay 0; of equal scores the earlier instance wins. Filter by score before calling.

    Args:
        mask_logits: ``N x h x w`` mask logits.
        scores: ``N`` instance scores.
        labels: ``N`` labels (``i`` = the ``i``-th name, >= 1).
        size: output ``(H, W)``; masks are upsampled ``chunk`` at a time to bound memory.
        resize: ``n x h x w -> n x H x W`` logits (default: bilinear to ``size``; SAM crops its padding first).

    Returns:
        ``H x W`` int32 label map.
    """
    best = torch.full(size, -torch.inf, device=mask_logits.device)
    label = torch.zeros(size, dtype=torch.int32, device=mask_logits.device)
    for start in range(0, mask_logits.shape[0], chunk):
        masks = mask_logits[start : start + chunk].float()  # n x h x w
        if resize is not None:
            masks = resize(masks)
        elif tuple(masks.shape[-2:]) != tuple(size):
            masks = F.interpolate(masks[None], size=size, mode="bilinear")[0]
        score = scores[start : start + chunk].float().to(masks.device)[:, None, None]
        value, idx = torch.where(masks > 0, score, -torch.inf).max(0)  # the first of equal maxima
        better = value > best
        best = torch.where(better, value, best)
        label = torch.where(better, labels[start : start + chunk].int().to(masks.device)[idx], label)
    return label.cpu().numpy()


Instances = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # mask logits N x h x w, scores N, labels N


def merge_best(parts: Sequence[Instances], size: tuple[int, int], max_instances: int, chunk: int = 8) -> np.ndarray:
    """:func:`merge_instances` of the ``max_instances`` best-scoring instances of ``parts`` (all at one mask size)."""
    if not parts:
        return np.zeros(size, np.int32)
    masks, scores, labels = (torch.cat(column) for column in zip(*parts, strict=True))
    top = torch.argsort(scores, descending=True, stable=True)[:max_instances]
    return merge_instances(masks[top], scores[top], labels[top], size, chunk)


def empty_map(image: Image.Image) -> np.ndarray:
    return np.zeros((image.height, image.width), np.int32)


class Segmenter(nn.Module):
    """Interface of every backend: ``segment(images, vocabularies)`` -> one label map per image."""

    def segment(
        self,
        images: Sequence[Image.Image],
        vocabularies: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[np.ndarray]:
        """Label maps at each image's original size: 0 = unlabelled, ``i`` = ``vocabularies[b][i - 1]``.

        Args:
            images: RGB images of any sizes.
            vocabularies: one list of names per image (may differ between images, may be empty).
            threshold: semantic modes: this call's unlabelled threshold instead of the segmenter's own (None).

        Returns:
            per image an ``H x W`` int32 label map.
        """
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the models and processors into ``folder`` (what the backend's ``load`` reads back)."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        return folder


class PerNameSegmenter(Segmenter):
    """A backend with per-name logits; trainable by :class:`autoseg.lit.SegmenterModule`.

    Subclasses hold ``model``, ``processor`` and a ``_text_cache`` (:class:`LRUCache`) and implement ``preprocess``,
    ``encode_image`` (batch-first features), ``text_embeddings`` (name-first) and ``decode_pairs``; this class batches
    them. ``input_size`` is the square side the model needs (None: any).
    """

    threshold: float = 0.0
    class_chunk: int = 8
    pair_chunk: int = 8
    input_size: int | None = None

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Model input ``B x 3 x S x S``."""
        raise NotImplementedError

    def encode_image(self, pixel_values: torch.Tensor) -> Any:
        """Image features of ``B x 3 x S x S`` pixels (one vision forward)."""
        raise NotImplementedError

    def text_embeddings(self, names: Sequence[str]) -> Any:
        """Per-name text features, name-first."""
        raise NotImplementedError

    def decode_pairs(
        self, features: Any, text: Any, image_index: torch.Tensor, name_index: torch.Tensor
    ) -> torch.Tensor:
        """Logits ``P x h x w`` of the pairs (``features[image_index[p]]``, ``text[name_index[p]]``)."""
        raise NotImplementedError

    def num_images(self, features: Any) -> int:
        raise NotImplementedError

    def num_names(self, text: Any) -> int:
        raise NotImplementedError

    def backbone(self) -> list[nn.Module]:
        """The parts frozen by default when fine-tuning (image and text encoders)."""
        raise NotImplementedError

    def head(self) -> list[nn.Module]:
        """The parts fine-tuned by default (what turns encoded image and text into per-name logits)."""
        raise NotImplementedError

    @property
    def image_processor(self) -> Any:
        """The Hugging Face image processor (``image_mean`` / ``image_std``) of ``self.processor``."""
        return self.processor.image_processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def clear_cache(self) -> None:
        """Forget the cached text embeddings (e.g. between timed benchmark runs); outputs are unchanged."""
        self._text_cache.clear()

    def train(self, mode: bool = True):
        """Also forgets the cached text embeddings (``self._text_cache``): they change when the text side trains."""
        self.clear_cache()
        return super().train(mode)

    def decode(self, features: Any, text: Any) -> torch.Tensor:
        """Every (image, name) pair: ``B x C x h x w`` logits (see :meth:`decode_listed`)."""
        b, c = self.num_images(features), self.num_names(text)
        logits = self.decode_listed(features, text, torch.arange(b).repeat_interleave(c), torch.arange(c).repeat(b))
        return logits.view(b, c, *logits.shape[-2:])

    def decode_listed(
        self, features: Any, text: Any, image_index: torch.Tensor, name_index: torch.Tensor
    ) -> torch.Tensor:
        """The listed (image, name) pairs, ``pair_chunk`` pairs per decoder call: ``P x h x w`` logits.

        While autograd records (training) and there is more than one chunk, each chunk runs under activation
        checkpointing: its activations are freed after its forward and recomputed (again one chunk at a time) in the
        backward, so memory holds one chunk's activations plus the pairs' logits, not every pair's activations.
        """
        chunk = max(1, self.pair_chunk)
        recompute = torch.is_grad_enabled() and len(image_index) > chunk
        parts = []
        for start in range(0, len(image_index), chunk):
            pairs = (features, text, image_index[start : start + chunk], name_index[start : start + chunk])
            if recompute:
                parts.append(checkpoint(self.decode_pairs, *pairs, use_reentrant=False))
            else:
                parts.append(self.decode_pairs(*pairs))
        return torch.cat(parts)

    def logits(self, pixel_values: torch.Tensor, names: Sequence[str]) -> torch.Tensor:
        """Per-name logits ``B x C x h x w`` (the same names for every image)."""
        return self.decode(self.encode_image(pixel_values), self.text_embeddings(names))

    def encode_batch(
        self, images: Sequence[Image.Image], vocabularies: Sequence[Sequence[str]]
    ) -> tuple[list[int], list[str], Any, Any]:
        """The images that have names, the batch's unique names, those images' features (one vision forward) and
        the names' text features (one text forward for the names not cached)."""
        check_batch(images, vocabularies)
        todo = [b for b, names in enumerate(vocabularies) if names]
        if not todo:
            return [], [], None, None
        names = unique_names(vocabularies)
        return todo, names, self.encode_image(self.preprocess([images[b] for b in todo])), self.text_embeddings(names)

    @torch.inference_mode()
    def segment(
        self,
        images: Sequence[Image.Image],
        vocabularies: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[np.ndarray]:
        threshold = self.threshold if threshold is None else threshold
        out = [empty_map(im) for im in images]
        todo, names, features, text = self.encode_batch(images, vocabularies)
        if not todo:
            return out
        chunks = pair_chunks(vocabularies, todo, names, self.pair_chunk)
        logits = torch.cat([self.decode_pairs(features, text, i, n) for i, n, _ in chunks])  # P x h x w, image-major
        start = 0
        for b in todo:
            c = len(vocabularies[b])
            size = (images[b].height, images[b].width)
            out[b] = labels_from_logits(logits[start : start + c], size, threshold, self.class_chunk)
            start += c
        return out
