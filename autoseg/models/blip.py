"""BLIP as AutoSeg uses it: a multi-scale patch-token encoder and a per-cluster captioner."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from transformers import (
    BlipForConditionalGeneration,
    BlipProcessor,
    LogitsProcessorList,
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
)

from autoseg.models.blip_decoding import (
    HF_DEFAULT_TOP_K,
    GumbelSampler,
    SharedCrossCache,
    decode,
    install_shared_cross_attention,
    row_seed,
)
from autoseg.models.loading import build_scratch, check_no_scratch_options, is_scratch, load_pretrained

DEFAULT_BLIP = "Salesforce/blip-image-captioning-large"
# ``scratch:NAME`` BLIP sources: seeded random models of these sizes (autoseg.models.scratch.make_blip arguments)
SCRATCH_SIZES: dict[str, dict] = {
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, patch_size=8, image_size=64),
    "small": dict(hidden_size=96, num_layers=4, num_heads=4, intermediate_size=192, patch_size=8, image_size=128),
}
CAPTION_MODES = ("concat", "global", "local", "cls")
# BLAS kernels for products of 1-3 rows differ in the last bit from those for more rows (measured with MKL), so a
# generate call of fewer rows gets dummy rows: a caption is then computed alike in a call of any size.
MIN_GENERATE_ROWS = 4
ATTENTION_BUCKET = 32  # local re-runs: attention pads each sequence to its length rounded up to a multiple of this


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
    # False: the decoder also attends the padding of shorter sets, as transformers v5's BLIP did before AutoSeg passed
    # its mask on (kept for models trained that way, e.g. the demo preset's)
    mask_padding: bool = True


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
    the stored embeddings are never modified. Every method takes a whole batch and batches inside.

    Args:
        model: a ``BlipForConditionalGeneration``.
        processor: its ``BlipProcessor`` (image processor + tokenizer).
        compile: run the full-image vision encoder passes through ``torch.compile`` (dynamic shapes).
        autocast: on CUDA with float32 weights, run the encoder and the decoder under autocast (bfloat16 where
            supported, else float16); never on CPU.
    """

    def __init__(
        self,
        model: BlipForConditionalGeneration,
        processor: BlipProcessor,
        compile: bool = False,
        autocast: bool = True,
    ):
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.patch_size = model.config.vision_config.patch_size
        self.autocast = autocast
        install_shared_cross_attention(model.text_decoder)  # hands on the padding mask; shared keys/values
        # full-image passes only: the packed local re-runs have data-dependent shapes (graph breaks, recompiles)
        self.compiled_dense = torch.compile(self.dense_layers, dynamic=True) if compile else None

    @classmethod
    def from_pretrained(
        cls,
        source: str = DEFAULT_BLIP,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool = False,
    ) -> BlipCaptioner:
        """From a Hugging Face id, a local ``save_pretrained`` directory or ``scratch:NAME`` (see :func:`load_blip`)."""
        return load_blip(source, device=device, dtype=dtype, compile=compile)

    def save_pretrained(self, folder: str | Path) -> Path:
        """Write the model and its processor into ``folder`` (what :meth:`from_pretrained` reads back)."""
        folder = Path(folder)
        self.model.save_pretrained(folder)
        self.processor.save_pretrained(folder)
        return folder

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.vision_config.hidden_size

    def autocast_context(self) -> contextlib.AbstractContextManager:
        """Autocast for CUDA with float32 weights (half weights need none; CPU never autocasts)."""
        if torch.is_autocast_enabled("cuda"):  # e.g. Lightning's mixed precision: keep the caller's choice
            return contextlib.nullcontext()
        if not (self.autocast and self.device.type == "cuda" and self.dtype == torch.float32):
            return contextlib.nullcontext()
        half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=half)

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

    def encoder_layers(self, hidden: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """BLIP's vision transformer layers and final layer norm, optionally on sequences padded at the end.

        transformers' ``BlipAttention`` (v5) materialises every ``L x L`` score matrix and takes no mask, so the
        layers are called here with the same weights and operations, attention through
        ``scaled_dot_product_attention`` (fused; 3-4x faster than the scores-then-softmax products on a CPU at
        ``L`` = 577-1025, the same result within float rounding). With ``lengths``, the per-token parts (layer
        norms, projections, MLP) run on the real tokens only, packed together; attention runs on groups of sequences
        padded to their length rounded up to :data:`ATTENTION_BUCKET`, with the padded keys masked. A sequence's
        padding therefore depends on its own length only, so its result is the same in any batch.

        Args:
            hidden: ``B x L x D`` embeddings.
            lengths: ``B`` real lengths (None: no padding).

        Returns:
            ``B x L x D``; rows at padded positions are zero.
        """
        vision = self.model.vision_model
        if lengths is None:
            return (self.compiled_dense or self.dense_layers)(hidden)
        length = hidden.shape[1]
        buckets = (lengths + ATTENTION_BUCKET - 1) // ATTENTION_BUCKET * ATTENTION_BUCKET  # B
        hidden = nn.functional.pad(hidden, (0, 0, 0, max(int(buckets.max()) - length, 0)))  # room for every bucket
        b, n, d = hidden.shape
        real = (torch.arange(n, device=hidden.device)[None] < lengths[:, None]).flatten().nonzero()[:, 0]
        groups = [(int(size), (buckets == size).nonzero()[:, 0]) for size in torch.unique(buckets).tolist()]
        tokens = hidden.reshape(b * n, d)[real]  # T x D packed real tokens
        for layer in vision.encoder.layers:
            att = layer.self_attn
            qkv = att.qkv(layer.layer_norm1(tokens))  # T x 3D
            qkv = qkv.new_zeros(b * n, 3 * d).index_copy_(0, real, qkv)
            qkv = qkv.view(b, n, 3, att.num_heads, d // att.num_heads).permute(2, 0, 3, 1, 4)  # 3 x B x H x L x d
            context = hidden.new_zeros(b, n, d)
            for size, rows in groups:
                keep = torch.arange(size, device=hidden.device)[None] < lengths[rows, None]  # G x P
                out = self._attend(att, *qkv[:, rows, :, :size].unbind(0), keep[:, None, None, :])  # G x H x P x d
                context[rows, :size] = out.permute(0, 2, 1, 3).reshape(len(rows), size, d)
            tokens = att.projection(context.view(b * n, d)[real]) + tokens
            tokens = layer.mlp(layer.layer_norm2(tokens)) + tokens
        out = vision.post_layernorm(tokens)
        return out.new_zeros(b * n, d).index_copy_(0, real, out).view(b, n, d)[:, :length]

    def dense_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        """The encoder layers and the final layer norm on unpadded ``B x L x D`` (see :meth:`encoder_layers`)."""
        vision = self.model.vision_model
        b, n, d = hidden.shape
        for layer in vision.encoder.layers:
            att = layer.self_attn
            qkv = att.qkv(layer.layer_norm1(hidden)).view(b, n, 3, att.num_heads, d // att.num_heads)
            context = self._attend(att, *qkv.permute(2, 0, 3, 1, 4).unbind(0))  # B x H x L x d
            hidden = att.projection(context.transpose(1, 2).reshape(b, n, d)) + hidden
            hidden = layer.mlp(layer.layer_norm2(hidden)) + hidden
        return vision.post_layernorm(hidden)

    def _attend(self, att: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep=None) -> torch.Tensor:
        """``BlipAttention``'s softmax attention (its scale and dropout) fused; ``keep``: keys to attend to."""
        drop = att.dropout.p if att.training else 0.0
        return nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=drop, scale=att.scale)

    def run_encoder(self, embeddings: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Transformer layers and the final layer norm on ``B x L x D`` embeddings (``lengths``: ``B`` real lengths
        of sequences padded at the end; see :meth:`encoder_layers`). Returns ``B x L x D``."""
        with self.autocast_context():
            return self.encoder_layers(embeddings, lengths)

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
    def batch_cluster_states(
        self,
        tokens: ScaleTokens,
        cluster_maps: Sequence[torch.Tensor],
        mode: str = "concat",
        images: Sequence[int] | None = None,
        patches: Sequence[torch.Tensor] | None = None,
    ) -> list[list[torch.Tensor]]:
        """Encoder states that describe each cluster of several images, for the text decoder's cross-attention.

        Modes: ``global``: the full-image CLS and the cluster's patch tokens from the full-image pass; ``local``: the
        encoder re-run on CLS + the cluster's patch embeddings alone; ``concat``: local followed by the cluster's
        global patch tokens (the paper's default); ``cls``: the CLS token of the local re-run. The local re-runs of
        every cluster of every image run as one padded encoder call with a key padding mask.

        Args:
            tokens: encoder output of the batch at the captioning scale.
            cluster_maps: per image, ``h x w`` labels ``0..K-1`` on ``tokens.grid``.
            images: the batch index of each map (default ``0..len(cluster_maps) - 1``).
            patches: optional per map ``(h * w) x D`` replacement for the global patch tokens (e.g. enhanced tokens).

        Returns:
            per map, ``K`` tensors, each ``L_k x D``.
        """
        if mode not in CAPTION_MODES:
            raise ValueError(f"unknown caption mode {mode!r}; choose one of {CAPTION_MODES}")
        if not cluster_maps:
            return []
        dev = self.device
        img = torch.as_tensor(list(range(len(cluster_maps)) if images is None else images), device=dev)  # M
        labels = torch.stack([m.flatten().to(dev) for m in cluster_maps])  # M x N
        m, n = labels.shape
        n_clusters = labels.amax(1) + 1  # M
        base = torch.cumsum(n_clusters, 0) - n_clusters  # first sequence id of each map
        seq = (labels + base[:, None]).flatten()  # sequence (= cluster of a map) of each patch
        order = torch.argsort(seq, stable=True)  # patches grouped by sequence, row-major inside
        counts = torch.bincount(seq, minlength=int(n_clusters.sum()))  # S patches per sequence
        patch = torch.arange(n, device=dev).repeat(m)[order]  # patch index of each sorted slot
        owner = img.repeat_interleave(n)[order]  # batch index of each sorted slot
        per_seq_img = img.repeat_interleave(n_clusters)  # S
        if patches is None:  # global tokens: the full-image pass of the slot's image
            source, row = tokens.patches, owner
        else:  # the given tokens of the slot's map
            source, row = (
                torch.stack([p.to(dev) for p in patches]),
                torch.arange(m, device=dev).repeat_interleave(n)[order],
            )
        glob_parts = torch.split(source[row, patch], counts.tolist())  # per sequence n_k x D
        cls = tokens.cls[per_seq_img]  # S x D
        if mode == "global":
            states = [torch.cat([c[None], g]) for c, g in zip(cls, glob_parts, strict=True)]
        else:
            local = self._local_states(tokens.embeddings, per_seq_img, owner, patch, counts, order.numel())
            parts = [loc[:size] for loc, size in zip(local, (counts + 1).tolist(), strict=True)]  # (1 + n_k) x D
            if mode == "cls":
                states = [loc[:1] for loc in parts]
            elif mode == "local":
                states = parts
            else:
                states = [torch.cat([loc, g]) for loc, g in zip(parts, glob_parts, strict=True)]
        out, pos = [], 0
        for k in n_clusters.tolist():
            out.append(states[pos : pos + k])
            pos += k
        return out

    def _local_states(
        self,
        embeddings: torch.Tensor,
        seq_img: torch.Tensor,
        owner: torch.Tensor,
        patch: torch.Tensor,
        counts: torch.Tensor,
        total: int,
    ) -> torch.Tensor:
        """One padded encoder call on ``CLS + the cluster's patch embeddings`` for every cluster.

        Returns:
            ``S x (1 + max n_k) x D``; row ``s`` is valid up to ``1 + counts[s]``.
        """
        dev = embeddings.device
        width = embeddings.shape[1]  # 1 + N
        s = counts.numel()
        length = 1 + int(counts.max()) if s else 1
        starts = torch.cumsum(counts, 0) - counts
        seq_sorted = torch.arange(s, device=dev).repeat_interleave(counts)  # sequence of each sorted slot
        pos = torch.arange(total, device=dev) - starts.repeat_interleave(counts)  # slot within its sequence
        index = torch.zeros(s, length, dtype=torch.long, device=dev)
        index[:, 0] = seq_img * width  # CLS embedding of the cluster's image
        index[seq_sorted, 1 + pos] = owner * width + 1 + patch
        padded = embeddings.reshape(-1, embeddings.shape[-1])[index]  # S x L x D
        return self.run_encoder(padded, 1 + counts)

    def cluster_states(
        self, tokens: ScaleTokens, index: int, cluster_map: torch.Tensor, mode: str = "concat", patches=None
    ) -> list[torch.Tensor]:
        """Encoder states of each cluster of one image of the batch (see :meth:`batch_cluster_states`).

        Args:
            tokens: encoder output at the captioning scale.
            index: which image of the batch.
            cluster_map: ``h x w`` labels ``0..K-1`` on ``tokens.grid``.
            patches: optional ``(h * w) x D`` replacement for the global patch tokens (e.g. enhanced tokens).

        Returns:
            ``K`` tensors, each ``L_k x D``.
        """
        return self.batch_cluster_states(
            tokens, [cluster_map], mode, images=[index], patches=None if patches is None else [patches]
        )[0]

    def prompt_ids(self, prompt: str) -> torch.Tensor:
        """Decoder prompt ``[DEC] <prompt>`` without the trailing ``[SEP]`` (as BLIP's own generate builds it)."""
        ids = self.processor.tokenizer(prompt, return_tensors="pt").input_ids[0, :-1].clone()
        ids[0] = self.model.config.text_config.bos_token_id
        return ids.to(self.device)

    def caption(
        self,
        states: Sequence[torch.Tensor],
        config: CaptionConfig | None = None,
        seed: int = 0,
        keys: Sequence[int] | None = None,
    ) -> list[list[str]]:
        """Caption each set of encoder states, all sets and passes in one ``generate`` call.

        Sampling is Gumbel-max over the temperature/top-k/top-p warped scores with one generator per caption, seeded
        by ``(seed, key of the set, pass)``, so a caption does not depend on the other sets of the call. Cross-attention
        keys/values are computed once per set and shared by its passes (except for beam search). Greedy or beam
        decoding (``sample: false``) gives one caption per set.

        Args:
            states: ``K`` tensors ``L_k x D`` (padded together; the cross-attention mask hides the padding).
            config: decoding settings; ``n_passes`` sampled captions per set (one when not sampling).
            seed: sampling seed; the same states, key and seed give the same captions.
            keys: per set, its sampling key (default its index); e.g. the cluster's index within its image.

        Returns:
            per set, its captions (prompt removed, lower-case, stripped).
        """
        cfg = config or CaptionConfig()
        if not states:
            return []
        keys = list(range(len(states))) if keys is None else list(keys)
        if len(keys) != len(states):
            raise ValueError(f"need one key per state set, got {len(keys)} keys for {len(states)} sets")
        n_pass = cfg.n_passes if cfg.sample else 1
        num_beams = 1 if cfg.sample else cfg.num_beams
        n_sets = len(states)
        spare = max(0, -(-MIN_GENERATE_ROWS // n_pass) - n_sets)  # dummy sets so that tiny calls use big-call kernels
        states, keys = [*states, *[states[-1]] * spare], keys + [0] * spare
        lengths = torch.tensor([st.shape[0] for st in states], device=self.device)
        length = int(lengths.max())
        rows = len(states) * n_pass
        mask = (torch.arange(length, device=self.device)[None] < lengths[:, None]).long()  # K x L
        if not cfg.mask_padding:
            mask = torch.ones_like(mask)
        prompt = self.prompt_ids(cfg.prompt)
        text_cfg = self.model.config.text_config
        eos = text_cfg.sep_token_id
        kwargs = dict(
            do_sample=False,  # sampling is Gumbel-max below, with one generator per row
            num_beams=num_beams,
            max_new_tokens=cfg.max_new_tokens,
            min_new_tokens=cfg.min_new_tokens,
            repetition_penalty=cfg.repetition_penalty,
            eos_token_id=eos,
            pad_token_id=text_cfg.pad_token_id,
        )
        if cfg.sample:
            gens = [
                torch.Generator(device=self.device).manual_seed(row_seed(seed, key, p))
                for key in keys
                for p in range(n_pass)
            ]
            # what HF's own sampling applies, in its order: temperature, top-k (its default 50), top-p
            top_k = self.model.text_decoder.generation_config.top_k
            top_k = HF_DEFAULT_TOP_K if top_k is None else top_k
            warpers = [TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else []
            kwargs["logits_processor"] = LogitsProcessorList([*warpers, GumbelSampler(gens, top_k, cfg.top_p)])
        with self.autocast_context():
            if num_beams == 1:  # greedy or sampled: the shared cross-attention and finished rows dropped
                processors = []
                if cfg.repetition_penalty != 1.0:
                    processors.append(RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty))
                if cfg.min_new_tokens > 0:
                    processors.append(
                        MinNewTokensLengthLogitsProcessor(prompt.numel(), cfg.min_new_tokens, eos, device=self.device)
                    )
                sampler = None
                if cfg.sample:
                    processors += warpers
                    sampler = GumbelSampler(gens, top_k, cfg.top_p)
                live = torch.arange(rows, device=self.device) < n_sets * n_pass  # the spare sets are dummies
                out = decode(
                    self.model.text_decoder,
                    prompt,
                    SharedCrossCache(self.model.text_decoder, states, n_pass, cfg.mask_padding),
                    states[0],
                    processors,
                    sampler,
                    eos,
                    text_cfg.pad_token_id,
                    cfg.max_new_tokens,
                    live,
                    MIN_GENERATE_ROWS,
                )
            else:  # beam search reorders the cache rows itself: transformers computes keys/values
                encoder_states = states[0].new_zeros(len(states), length, states[0].shape[-1])
                for k, st in enumerate(states):
                    encoder_states[k, : st.shape[0]] = st
                out = self.model.text_decoder.generate(
                    input_ids=prompt[None].expand(rows, -1),
                    attention_mask=torch.ones(rows, prompt.numel(), dtype=torch.long, device=self.device),
                    encoder_hidden_states=encoder_states,
                    encoder_attention_mask=mask.repeat_interleave(n_pass, 0),
                    **kwargs,
                )
        texts = self.processor.tokenizer.batch_decode(out[:, prompt.numel() :], skip_special_tokens=True)
        texts = [t.strip().lower() for t in texts]
        return [texts[i * n_pass : (i + 1) * n_pass] for i in range(n_sets)]


def load_blip(
    source: str = DEFAULT_BLIP,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    flag: str = "--blip",
    scratch: Mapping[str, Any] | None = None,
) -> BlipCaptioner:
    """BLIP captioner from a hub id, a local directory or ``scratch:tiny`` / ``scratch:small`` (random, seeded).

    Args:
        source: where the weights come from.
        flag: the setting that names ``source``, quoted in errors (e.g. ``--model.init_args.blip`` in training).
        scratch: ``scratch:`` sources: ``make_blip`` arguments that override the registered size (e.g.
            ``{"hidden_size": 96, "patch_size": 16}``); an error for other sources.

    Raises:
        autoseg.models.loading.ModelLoadError: the weights cannot be loaded (the message says how to provide them).
        ValueError: an unknown scratch size, or ``scratch`` with another source.
    """
    check_no_scratch_options(source, scratch, "BLIP")
    if is_scratch(source):
        from autoseg.models.scratch import make_blip

        model, processor = build_scratch(source, SCRATCH_SIZES, "BLIP", make_blip, scratch)
    else:
        model = load_pretrained(
            source, "BLIP captioner", lambda s, **kw: BlipForConditionalGeneration.from_pretrained(s, **kw), flag
        )
        processor = load_pretrained(source, "BLIP processor", BlipProcessor.from_pretrained, flag)
    return BlipCaptioner(model.to(device=device, dtype=dtype), processor, compile=compile)
