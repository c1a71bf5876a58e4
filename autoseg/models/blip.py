"""BLIP as AutoSeg uses it: a multi-scale patch-token encoder and a per-cluster captioner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from transformers import BlipForConditionalGeneration, BlipProcessor

from autoseg.models.loading import load_pretrained

DEFAULT_BLIP = "Salesforce/blip-image-captioning-large"
CAPTION_MODES = ("concat", "global", "local", "cls")


@dataclass
class CaptionConfig:
    """How clusters are captioned (defaults follow REFERENCE.md: "concat" mode, 5 sampled passes, 4..25 tokens)."""

    mode: str = "concat"  # concat | global | local | cls
    n_passes: int = 5
    sample: bool = True  # False: deterministic decoding (greedy, or beam search with num_beams > 1), one pass
    top_p: float = 0.9
    temperature: float = 1.0
    num_beams: int = 1
    repetition_penalty: float = 1.0
    min_new_tokens: int = 4
    max_new_tokens: int = 25
    prompt: str = "a picture of"


@dataclass
class ScaleTokens:
    """Encoder output of a batch at one input scale.

    Attributes:
        size: input side length in pixels.
        grid: ``(h, w)`` patch grid.
        cls: ``B x D`` CLS token.
        patches: ``B x (h * w) x D`` patch tokens, row-major.
        embeddings: ``B x (1 + h * w) x D`` encoder inputs (patch + position embeddings), kept for local re-runs.
    """

    size: int
    grid: tuple[int, int]
    cls: torch.Tensor
    patches: torch.Tensor
    embeddings: torch.Tensor


class BlipCaptioner(nn.Module):
    """BLIP captioning model used as (1) a multi-scale patch-token encoder and (2) a captioner of token sets.

    The model is put in eval mode (no dropout while captioning) and inputs are mean/std normalised by the model's own
    image processor. Position embeddings are interpolated per call by transformers (``interpolate_pos_encoding``);
    the stored embeddings are never modified.

    Args:
        model: a ``BlipForConditionalGeneration``.
        processor: its ``BlipProcessor`` (image processor + tokenizer).
    """

    def __init__(self, model: BlipForConditionalGeneration, processor: BlipProcessor):
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.patch_size = model.config.vision_config.patch_size

    @classmethod
    def from_pretrained(
        cls, source: str = DEFAULT_BLIP, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> BlipCaptioner:
        """Load from a Hugging Face id or a local ``save_pretrained`` directory (see ``load_pretrained``)."""
        model = load_pretrained(
            source, "BLIP captioner", lambda s, **kw: BlipForConditionalGeneration.from_pretrained(s, **kw), "--blip"
        )
        processor = load_pretrained(source, "BLIP processor", BlipProcessor.from_pretrained, "--blip")
        return cls(model.to(device=device, dtype=dtype), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    # ---------------------------------------------------------------- encoder
    def preprocess(self, images: Sequence[Image.Image], size: int) -> torch.Tensor:
        """Resize to ``size x size`` and normalise with the model's mean/std. Returns ``B x 3 x size x size``."""
        if size % self.patch_size:
            raise ValueError(f"scale {size} is not a multiple of BLIP's patch size {self.patch_size}")
        out = self.processor.image_processor(
            list(images), size={"height": size, "width": size}, do_resize=True, return_tensors="pt"
        )
        return out["pixel_values"].to(device=self.device, dtype=self.dtype)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (interpolated to the input size). Returns ``B x (1 + N) x D``."""
        return self.model.vision_model.embeddings(pixel_values, interpolate_pos_encoding=True)

    def run_encoder(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Transformer layers and the final layer norm on ``B x L x D`` embeddings. Returns ``B x L x D``."""
        vision = self.model.vision_model
        return vision.post_layernorm(vision.encoder(inputs_embeds=embeddings).last_hidden_state)

    def encode(self, images: Sequence[Image.Image], scales: Sequence[int] = (384, 512)) -> list[ScaleTokens]:
        """Encode a batch of images at each scale; the CLS token (index 0) is split from all ``h * w`` patches."""
        out = []
        for size in scales:
            emb = self.embed(self.preprocess(images, size))
            hidden = self.run_encoder(emb)
            grid = (size // self.patch_size, size // self.patch_size)
            assert hidden.shape[1] == 1 + grid[0] * grid[1], (hidden.shape, grid)
            out.append(ScaleTokens(size, grid, hidden[:, 0], hidden[:, 1:], emb))
        return out

    # ---------------------------------------------------------------- captioning
    def cluster_states(
        self, tokens: ScaleTokens, index: int, cluster_map: torch.Tensor, mode: str = "concat", patches=None
    ) -> list[torch.Tensor]:
        """Encoder states that describe each cluster of one image, for the text decoder's cross-attention.

        Modes: ``global``: the full-image CLS and the cluster's patch tokens from the full-image pass; ``local``: the
        encoder re-run on CLS + the cluster's patch embeddings alone; ``concat``: local followed by the cluster's
        global patch tokens (the paper's default); ``cls``: the CLS token of the local re-run.

        Args:
            tokens: encoder output at the captioning scale.
            index: which image of the batch.
            cluster_map: ``h x w`` labels ``0..K-1`` on ``tokens.grid``.
            patches: optional ``(h * w) x D`` replacement for the global patch tokens (e.g. enhanced tokens).

        Returns:
            ``K`` tensors, each ``L_k x D``.
        """
        if mode not in CAPTION_MODES:
            raise ValueError(f"unknown caption mode {mode!r}; choose one of {CAPTION_MODES}")
        flat = cluster_map.flatten().to(self.device)
        glob = tokens.patches[index] if patches is None else patches
        states = []
        for k in range(int(flat.max()) + 1):
            idx = (flat == k).nonzero()[:, 0]  # patches of cluster k
            if mode == "global":
                states.append(torch.cat([tokens.cls[index][None], glob[idx]]))
                continue
            emb = tokens.embeddings[index]
            local = self.run_encoder(torch.cat([emb[:1], emb[1:][idx]])[None])[0]  # (1 + n_k) x D
            states.append({"local": local, "cls": local[:1], "concat": torch.cat([local, glob[idx]])}[mode])
        return states

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """Decoder prompt ``[DEC] <prompt>`` without the trailing ``[SEP]`` (as BLIP's own generate builds it)."""
        ids = self.processor.tokenizer(prompt, return_tensors="pt").input_ids[0, :-1].clone()
        ids[0] = self.model.config.text_config.bos_token_id
        return ids.to(self.device)

    def caption(
        self, states: Sequence[torch.Tensor], config: CaptionConfig | None = None, seed: int = 0
    ) -> list[list[str]]:
        """Caption each set of encoder states.

        Args:
            states: ``K`` tensors ``L_k x D`` (padded together; the cross-attention mask hides the padding).
            config: decoding settings; ``n_passes`` sampled captions per set (one when not sampling).
            seed: sampling seed; the same states and seed give the same captions.

        Returns:
            per set, its captions (prompt removed, lower-case, stripped).
        """
        cfg = config or CaptionConfig()
        if not states:
            return []
        n_pass = cfg.n_passes if cfg.sample else 1
        lengths = torch.tensor([s.shape[0] for s in states], device=self.device)
        padded = nn.utils.rnn.pad_sequence(list(states), batch_first=True)  # K x L x D
        mask = (torch.arange(padded.shape[1], device=self.device)[None] < lengths[:, None]).long()
        padded, mask = padded.repeat_interleave(n_pass, 0), mask.repeat_interleave(n_pass, 0)
        prompt = self.prompt_ids(cfg.prompt)
        input_ids = prompt[None].expand(padded.shape[0], -1)
        text_cfg = self.model.config.text_config
        kwargs = dict(
            do_sample=cfg.sample,
            num_beams=1 if cfg.sample else cfg.num_beams,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            repetition_penalty=cfg.repetition_penalty,
            eos_token_id=text_cfg.sep_token_id,
            pad_token_id=text_cfg.pad_token_id,
        )
        if cfg.sample:
            kwargs.update(top_p=cfg.top_p, temperature=cfg.temperature)
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = self.model.text_decoder.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                encoder_hidden_states=padded,
                encoder_attention_mask=mask,
                **kwargs,
            )
        texts = self.processor.tokenizer.batch_decode(out[:, prompt.numel() :], skip_special_tokens=True)
        texts = [t.strip().lower() for t in texts]
        return [texts[i * n_pass : (i + 1) * n_pass] for i in range(len(states))]
