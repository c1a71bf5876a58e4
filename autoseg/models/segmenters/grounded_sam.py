"""Grounded SAM backend: Grounding DINO finds boxes for the vocabulary names, SAM turns each box into a mask.

Per image the names are joined into Grounding DINO's text prompt (``"cat. dog. red car."``; split over several prompts
when they exceed its ``max_text_len`` tokens). Each query box is given the name whose tokens have the highest mean
probability; the box's score is that name's best token probability. The box is kept when the name's mean exceeds
``text_threshold`` and its score exceeds ``box_threshold`` (name, threshold test and score all come from the same
name's tokens). SAM encodes each image once and decodes a mask per kept box (single-mask output, at 256 x 256 over
SAM's 1024 px padded input); the masks are merged by score as for SAM 3 instances.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel, SamProcessor

from autoseg.models.loading import is_scratch, load_pretrained
from autoseg.models.scratch import make_grounding_dino, make_sam
from autoseg.models.segmenters.base import Segmenter, check_batch, empty_map, merge_instances
from autoseg.models.segmenters.spec import Backend, SegmenterConfig, segmenter_source
from autoseg.utils.settings import NON_EMPTY, between, config_error

DEFAULT_GROUNDING_DINO = "IDEA-Research/grounding-dino-tiny"
DEFAULT_SAM = "facebook/sam-vit-base"
DETECTOR_DIR, SAM_DIR = "detector", "sam"  # a combined folder: DIR/detector (Grounding DINO) and DIR/sam (SAM)


def grounded_sources(source: str, sam_source: str | None = None) -> tuple[str, str]:
    """The (Grounding DINO, SAM) sources of ``--segmenter SOURCE``.

    ``SOURCE`` is a folder holding ``detector/`` and ``sam/`` (see :func:`autoseg.models.scratch.save_grounded_sam`),
    or a Grounding DINO id/directory whose SAM is ``sam_source`` (default :data:`DEFAULT_SAM`).
    """
    path = Path(source).expanduser()
    if (path / DETECTOR_DIR).is_dir():
        sam = sam_source or (str(path / SAM_DIR) if (path / SAM_DIR).is_dir() else DEFAULT_SAM)
        return str(path / DETECTOR_DIR), sam
    return source, sam_source or DEFAULT_SAM


def prompt_groups(tokenizer: Any, names: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Positions of ``names`` split into groups whose prompt ``"a. b. c."`` fits ``max_tokens`` (with CLS and SEP)."""
    lengths = [len(ids) + 1 for ids in tokenizer(list(names), add_special_tokens=False)["input_ids"]]  # + "."
    groups: list[list[int]] = [[]]
    used = 2
    for i, n in enumerate(lengths):
        if groups[-1] and used + n > max_tokens:
            groups.append([])
            used = 2
        groups[-1].append(i)
        used += n
    return groups


def phrase(name: str) -> str:
    """A name as Grounding DINO reads it: lower case, no ``.`` (the separator between names)."""
    return " ".join(name.replace(".", " ").lower().split())


class GroundedSamSegmenter(Segmenter):
    """Grounding DINO boxes -> SAM masks -> one label map per image.

    Args:
        detector: a ``GroundingDinoForObjectDetection`` (or the MM variant).
        detector_processor: its processor (image resizing and the BERT tokenizer).
        sam: a ``SamModel``.
        sam_processor: its ``SamProcessor``.
        box_threshold: keep a box whose name's best token probability (its score) exceeds this.
        text_threshold: ... and whose name's mean token probability exceeds this (the name: the highest mean).
        max_instances: at most this many best-scoring boxes per image go to SAM.
        class_chunk: masks upsampled to full image size at a time.
        pair_chunk: (image, prompt) rows per Grounding DINO call and boxes per SAM call.
    """

    def __init__(
        self,
        detector: Any,
        detector_processor: Any,
        sam: SamModel,
        sam_processor: SamProcessor,
        box_threshold: float = 0.35,
        text_threshold: float = 0.25,
        max_instances: int = 100,
        class_chunk: int = 8,
        pair_chunk: int = 8,
    ):
        super().__init__()
        self.detector = detector.eval()
        self.detector_processor = detector_processor
        self.sam = sam.eval()
        self.sam_processor = sam_processor
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold
        self.max_instances = max_instances
        self.class_chunk = class_chunk
        self.pair_chunk = pair_chunk

    @classmethod
    def from_pretrained(
        cls,
        source: str = DEFAULT_GROUNDING_DINO,
        sam_source: str | None = None,
        device: str | torch.device = "cpu",
        dtype=torch.float32,
        **kwargs,
    ) -> GroundedSamSegmenter:
        detector, detector_processor, sam_model, sam_processor = load_parts(source, sam_source)
        models = [m.to(device=device, dtype=dtype) for m in (detector, sam_model)]
        return cls(models[0], detector_processor, models[1], sam_processor, **kwargs)

    def save_pretrained(self, folder: str | Path) -> Path:
        """``folder/detector`` (Grounding DINO) and ``folder/sam`` (SAM): the combined folder ``load`` reads."""
        folder = Path(folder)
        for sub, model, processor in (
            (DETECTOR_DIR, self.detector, self.detector_processor),
            (SAM_DIR, self.sam, self.sam_processor),
        ):
            model.save_pretrained(folder / sub)
            processor.save_pretrained(folder / sub)
        return folder

    @property
    def device(self) -> torch.device:
        return next(self.sam.parameters()).device

    # ------------------------------------------------------------------ Grounding DINO
    def detect(
        self, images: Sequence[Image.Image], vocabularies: Sequence[Sequence[str]]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Kept boxes per image: ``N x 4`` (x0, y0, x1, y1 in pixels), scores ``N``, labels ``N`` (1-based)."""
        tok = self.detector_processor.tokenizer
        max_tokens = self.detector.config.max_text_len
        rows = []  # (image, its names in this prompt, their labels)
        for b, names in enumerate(vocabularies):
            for group in prompt_groups(tok, [phrase(n) for n in names], max_tokens):
                rows.append((b, [names[i] for i in group], [i + 1 for i in group]))
        # each image resized on its own, never padded: padding a batch to its largest image changes the Swin features
        # (its windows have no padding mask), so only images of the same processed size share a call
        pixels = [self.detector_processor.image_processor([im], return_tensors="pt")["pixel_values"] for im in images]
        by_shape: dict[tuple[int, ...], list[tuple]] = {}
        for row in rows:
            by_shape.setdefault(tuple(pixels[row[0]].shape), []).append(row)
        found: list[list[tuple[torch.Tensor, ...]]] = [[] for _ in images]
        for same in by_shape.values():
            for start in range(0, len(same), self.pair_chunk):
                for b, kept in self._detect_rows(same[start : start + self.pair_chunk], pixels, images):
                    found[b].append(kept)
        return [tuple(torch.cat(col) for col in zip(*parts, strict=True)) for parts in found]

    def _detect_rows(self, rows: list[tuple], pixels: list[torch.Tensor], images: Sequence[Image.Image]) -> list:
        """One Grounding DINO call on (image, names) rows of images of one size: per row its kept boxes."""
        tok = self.detector_processor.tokenizer
        prompts = [". ".join(phrase(n) for n in names) + "." for _, names, _ in rows]
        max_length = self.detector.config.max_text_len
        text = tok(prompts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        text = text.to(self.device)
        dtype = next(self.detector.parameters()).dtype
        pixel_values = torch.cat([pixels[b] for b, _, _ in rows]).to(self.device, dtype)
        out = self.detector(
            pixel_values=pixel_values,  # R x 3 x H x W
            pixel_mask=torch.ones_like(pixel_values[:, 0], dtype=torch.long),
            input_ids=text["input_ids"],
            attention_mask=text["attention_mask"],
            token_type_ids=text.get("token_type_ids"),
        )
        probs = torch.sigmoid(out.logits.float())  # R x Q x max_text_len
        kept = []
        for r, (b, names, labels) in enumerate(rows):
            spans = name_tokens(text.char_to_token, r, prompts[r], [phrase(n) for n in names])
            kept.append((b, self.keep_boxes(probs[r], out.pred_boxes[r].float(), spans, labels, images[b])))
        return kept

    def keep_boxes(
        self,
        probs: torch.Tensor,
        boxes: torch.Tensor,
        spans: Sequence[list[int]],
        labels: Sequence[int],
        image: Image.Image,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Boxes of one prompt above the thresholds, their score and name.

        A box's name is the one with the highest mean token probability (must exceed ``text_threshold``); its score
        is that name's best token probability (must exceed ``box_threshold``).

        Args:
            probs: ``Q x T`` token probabilities of the queries.
            boxes: ``Q x 4`` (cx, cy, w, h) relative to the image.
            spans: per name its token positions in the prompt.
            labels: per name its label.
        """
        none = probs.new_full(probs.shape[:1], -1.0)  # a name truncated away is never chosen
        mean = torch.stack([probs[:, s].mean(-1) if s else none for s in spans], 1)  # Q x C
        best = torch.stack([probs[:, s].max(-1).values if s else none for s in spans], 1)  # Q x C
        name_score, name = mean.max(1)
        score = best.gather(1, name[:, None])[:, 0]  # Q: the chosen name's own best token
        keep = (score > self.box_threshold) & (name_score > self.text_threshold)
        cx, cy, w, h = boxes[keep].unbind(-1)
        size = torch.tensor([image.width, image.height] * 2, dtype=torch.float32, device=boxes.device)
        xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * size  # N x 4 pixels
        label = torch.tensor(labels, dtype=torch.int32, device=boxes.device)[name[keep]]
        return xyxy.cpu(), score[keep].cpu(), label.cpu()

    # ------------------------------------------------------------------ SAM
    def sam_masks(self, embedding: torch.Tensor, boxes: torch.Tensor, scale: tuple[float, float]) -> torch.Tensor:
        """Low-resolution mask logits ``N x 256 x 256`` of boxes (pixels) on one image embedding ``1 x C x h x w``."""
        sx, sy = scale
        boxes = boxes * torch.tensor([sx, sy, sx, sy])  # to SAM's resized input
        masks = []
        for start in range(0, len(boxes), self.pair_chunk):
            part = boxes[start : start + self.pair_chunk][None].to(self.device, embedding.dtype)  # 1 x n x 4
            out = self.sam(image_embeddings=embedding, input_boxes=part, multimask_output=False)
            masks.append(out.pred_masks[0, :, 0].float())  # n x h x w
        return torch.cat(masks)

    @torch.inference_mode()
    def segment(
        self,
        images: Sequence[Image.Image],
        vocabularies: Sequence[Sequence[str]],
        threshold: float | None = None,
    ) -> list[np.ndarray]:
        if threshold is not None:
            raise ValueError("grounded_sam labels the pixels of its boxes; it takes no unlabelled threshold")
        check_batch(images, vocabularies)
        out = [empty_map(im) for im in images]
        todo = [b for b, names in enumerate(vocabularies) if names]
        if not todo:
            return out
        detections = self.detect([images[b] for b in todo], [vocabularies[b] for b in todo])
        todo = [(k, b) for k, b in enumerate(todo) if len(detections[k][0])]
        if not todo:
            return out
        sam_in = self.sam_processor.image_processor([images[b] for _, b in todo], return_tensors="pt")
        dtype = next(self.sam.parameters()).dtype
        embeddings = self.sam.get_image_embeddings(sam_in["pixel_values"].to(self.device, dtype))  # one per image
        pad = self.sam_processor.image_processor.pad_size
        for j, (k, b) in enumerate(todo):
            boxes, scores, labels = detections[k]
            top = torch.argsort(scores, descending=True, stable=True)[: self.max_instances]
            rh, rw = (int(v) for v in sam_in["reshaped_input_sizes"][j])
            scale = (rw / images[b].width, rh / images[b].height)
            masks = self.sam_masks(embeddings[j : j + 1], boxes[top], scale)
            size = (images[b].height, images[b].width)
            unpad = sam_unpadder((pad["height"], pad["width"]), (rh, rw), size)
            out[b] = merge_instances(masks, scores[top], labels[top], size, self.class_chunk, resize=unpad)
        return out


def name_tokens(char_to_token: Callable, row: int, prompt: str, names: Sequence[str]) -> list[list[int]]:
    """Token positions of each name in ``prompt`` (names joined by ``". "``); a name cut off by truncation keeps
    what is left of it (maybe nothing)."""
    spans, start = [], 0
    for name in names:
        tokens = [char_to_token(row, c) for c in range(start, start + len(name))]
        kept = sorted({t for t in tokens if t is not None})
        spans.append(kept)
        start += len(name) + 2
    return spans


def sam_unpadder(pad: tuple[int, int], reshaped: tuple[int, int], size: tuple[int, int]) -> Callable:
    """``SamImageProcessor.post_process_masks`` without binarising: ``n x h x w`` logits -> ``n x H x W``."""

    def resize(masks: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(masks[None], pad, mode="bilinear", align_corners=False)[..., : reshaped[0], : reshaped[1]]
        return F.interpolate(up, size, mode="bilinear", align_corners=False)[0]

    return resize


# ---------------------------------------------------------------------------------------------------------------------
# The backend's entry in the registry
@dataclass
class GroundedSamOptions:
    """Grounded SAM's own settings.

    Attributes:
        box_threshold: keep a box whose name's best token probability (the box's score) is above this.
        text_threshold: ... and whose name's mean token probability is above this (a box's name: the one with the
            highest mean).
        sam_source: the SAM model (null: the ``sam/`` of a combined ``source`` folder, else ``DEFAULT_SAM``).
    """

    box_threshold: float = 0.35
    text_threshold: float = 0.25
    sam_source: str | None = None


def load_parts(source: str, sam_source: str | None = None, flag: str = "--segmenter") -> tuple:
    """Grounding DINO, its processor, SAM and its processor (see :func:`grounded_sources`)."""
    det, sam = grounded_sources(source, sam_source)
    sam_flag = "segmenter.sam_source"
    detector = load_pretrained(det, "Grounding DINO", AutoModelForZeroShotObjectDetection.from_pretrained, flag)
    detector_processor = load_pretrained(det, "Grounding DINO processor", AutoProcessor.from_pretrained, flag)
    sam_model = load_pretrained(sam, "SAM", SamModel.from_pretrained, sam_flag)
    sam_processor = load_pretrained(sam, "SAM processor", SamProcessor.from_pretrained, sam_flag)
    return detector, detector_processor, sam_model, sam_processor


def make(words: Sequence[str] = (), detector: dict | None = None, sam: dict | None = None) -> tuple:
    """A random Grounding DINO (BERT's tokenizer: ``words`` need no care) and a random SAM."""
    return (*make_grounding_dino(**(detector or {})), *make_sam(**(sam or {})))


def assemble(parts: tuple, config: SegmenterConfig) -> GroundedSamSegmenter:
    options: GroundedSamOptions = config.options
    return GroundedSamSegmenter(
        *parts,
        box_threshold=options.box_threshold,
        text_threshold=options.text_threshold,
        max_instances=config.max_instances,
        class_chunk=config.class_chunk,
        pair_chunk=config.pair_chunk,
    )


def model_sources(config: SegmenterConfig) -> dict[str, str]:
    if is_scratch(segmenter_source(config)):  # both models are made at random
        return {"segmenter.source": segmenter_source(config)}
    det, sam = grounded_sources(segmenter_source(config), config.options.sam_source)
    return {"segmenter.source": det, "segmenter.sam_source": sam}


def check(config: SegmenterConfig, read_model_config: Callable[[str], Any], where: str) -> None:
    """Its SAM must be a SAM."""
    sam_where = model_sources(config)["segmenter.sam_source"]
    sam = read_model_config(sam_where)
    if sam is not None and sam.model_type != "sam":
        raise config_error(
            "segmenter.sam_source",
            f"{sam_where} holds a {sam.model_type!r} model; grounded_sam needs a SAM ('sam', e.g. {DEFAULT_SAM})",
            where,
        )


BACKEND = Backend(
    name="grounded_sam",
    summary="Grounding DINO boxes + SAM masks: sharp edges, only boxed things labelled; a GPU recommended",
    default_source=DEFAULT_GROUNDING_DINO,
    modes=("instances",),
    model_types=("grounding-dino", "mm-grounding-dino"),
    load=lambda source, config, flag="--segmenter": load_parts(source, config.options.sam_source, flag),
    make=make,
    assemble=assemble,
    scratch_sizes={"tiny": {}},
    options=GroundedSamOptions,
    rules={"box_threshold": between(0, 1), "text_threshold": between(0, 1), "sam_source": NON_EMPTY},
    model_sources=model_sources,
    check=check,
    path_options=("sam_source",),
)
