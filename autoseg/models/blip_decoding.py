"""Decoding helpers of AutoSeg's BLIP captioner: per-row seeded sampling and cross-attention shared by a set's passes.

Every cluster is captioned ``n_passes`` times from the same encoder states. transformers' cache keeps one copy of the
cross-attention keys/values per generation row and pads every row to the longest set of the call, so each decoding
step reads ``rows x max length`` keys and values per layer: on a CPU that memory traffic, not the arithmetic, was
most of the captioning time. :class:`SharedCrossCache` stores them once per set, in buckets of similar length, and
:class:`SharedCrossAttention` reads them for all of the set's passes at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache, LogitsProcessor
from transformers.models.blip.modeling_blip_text import BlipTextSelfAttention

HF_DEFAULT_TOP_K = 50  # what transformers' sampling applies when the generation config sets no top_k
MIN_BUCKET = 16  # shortest padded length of a bucket of state sets


class GumbelSampler(LogitsProcessor):
    """Samples each row's next token from its top-k / top-p distribution with the row's own generator.

    The Gumbel-max trick on the candidates: ``argmax(log p + Gumbel noise)`` is a sample of ``p``. Top-k and top-p
    keep the candidates HF's warpers keep (the k most likely; then the most likely ones until their mass reaches
    ``top_p``), and noise is drawn for those ``k`` candidates only. Each row draws from its own generator, so its
    sample does not depend on the other rows (HF's sampling draws every row from one global stream). The scores
    returned are 0 at the sampled token and ``-inf`` elsewhere, for greedy decoding to take; put this processor last.

    Args:
        generators: one per row of the generation batch, on the scores' device.
        top_k: candidates per step (0: the whole vocabulary).
        top_p: nucleus mass in (0, 1].
    """

    def __init__(self, generators: Sequence[torch.Generator], top_k: int = HF_DEFAULT_TOP_K, top_p: float = 1.0):
        self.generators = list(generators)
        self.top_k = top_k
        self.top_p = top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        k = vocab if self.top_k <= 0 else min(self.top_k, vocab)
        values, candidates = scores.float().topk(k, dim=-1)  # R x k, most likely first
        probs = values.softmax(-1)
        keep = probs.cumsum(-1) - probs < self.top_p  # mass of the more likely candidates is below top_p
        keep[:, 0] = True
        u = torch.empty_like(values)
        for row, g in zip(u, self.generators, strict=True):
            row.uniform_(generator=g)
        tiny = torch.finfo(u.dtype).tiny
        gumbel = -torch.log((-torch.log(u.clamp_min(tiny))).clamp_min(tiny))  # R x k
        pick = (values + gumbel).masked_fill(~keep, float("-inf")).argmax(-1, keepdim=True)  # R x 1
        return torch.full_like(scores, float("-inf")).scatter_(1, candidates.gather(1, pick), 0.0)


def row_seed(seed: int, key: int, sample: int) -> int:
    """Seed of one sampled caption: mixes the run seed, the cluster's key and the pass index (NumPy SeedSequence)."""
    return int(np.random.SeedSequence([seed, key, sample]).generate_state(1)[0])


def bucket_length(n: int) -> int:
    """Padded length of a set of ``n`` states: ``n`` rounded up to a multiple of :data:`MIN_BUCKET` or of a quarter
    of its octave, whichever is larger (less than ``n / 4`` padding beyond the smallest buckets).

    It depends on ``n`` alone, so a set is computed alike whatever else is in the call."""
    step = max(MIN_BUCKET, 2 ** max(n.bit_length() - 3, 0))
    return -(-n // step) * step


class SharedCrossCache(EncoderDecoderCache):
    """A decoder cache whose cross-attention keys/values are stored once per state set, for its ``group`` rows.

    The generation batch holds ``group`` consecutive rows per set (its passes). Sets are bucketed by
    :func:`bucket_length`; a bucket's keys are ``G x H x d x L_b`` and values ``G x H x L_b x d``, with an additive
    ``-inf`` mask on the padding. With ``mask_padding=False`` every set is padded to the longest and the padding is
    attended (zero states, as transformers v5's BLIP attends them), so models trained that way decode as trained.
    The self-attention part is transformers' ``DynamicCache``.

    Args:
        decoder: the ``BlipTextLMHeadModel`` whose cross-attention layers read this cache.
        states: ``S`` tensors ``L_s x D``, one per set.
        group: consecutive generation rows per set.
        mask_padding: hide the padding (else attend it, see above).
    """

    def __init__(self, decoder: nn.Module, states: Sequence[torch.Tensor], group: int = 1, mask_padding: bool = True):
        super().__init__(DynamicCache(config=decoder.config), DynamicCache(config=decoder.config))
        dev = states[0].device
        self.group = group
        self.n_sets = len(states)
        sizes = [st.shape[0] for st in states]
        if mask_padding:
            padded = [bucket_length(n) for n in sizes]
        else:
            padded = [max(sizes)] * len(sizes)
        packed = torch.cat(list(states))  # sum(L_s) x D
        starts = np.cumsum([0, *sizes])
        # per bucket: the sets, where their packed rows go in the bucket's G x L_b layout, the padding mask
        self.buckets: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        layouts = []
        for length in sorted(set(padded)):
            sets = [s for s, p in enumerate(padded) if p == length]
            src = torch.cat([torch.arange(starts[s], starts[s + 1]) for s in sets]).to(dev)
            dst = torch.cat([torch.arange(sizes[s]) + g * length for g, s in enumerate(sets)]).to(dev)
            mask = None
            if mask_padding:
                lengths = torch.tensor([sizes[s] for s in sets], device=dev)
                pad = torch.arange(length, device=dev)[None] >= lengths[:, None]  # G x L_b
                mask = torch.zeros(pad.shape, dtype=packed.dtype, device=dev).masked_fill(pad, float("-inf"))
                mask = mask[:, None, None, :]  # G x 1 x 1 x L_b
            self.buckets.append((torch.tensor(sets, device=dev), mask))
            layouts.append((len(sets), length, src, dst))
        self.keys: list[list[torch.Tensor]] = []  # per layer, per bucket: G x H x d x L_b
        self.values: list[list[torch.Tensor]] = []  # per layer, per bucket: G x H x L_b x d
        for layer in decoder.bert.encoder.layer:
            att = layer.crossattention.self
            per_proj = []
            for proj in (att.key, att.value):
                rows = proj(packed)  # sum(L_s) x (H * d)
                pad_row = proj(packed.new_zeros(1, packed.shape[-1]))  # what a zero padding state projects to
                out = []
                for n_sets, length, src, dst in layouts:
                    buf = pad_row.expand(n_sets * length, -1).clone()
                    buf[dst] = rows[src]
                    out.append(buf.view(n_sets, length, -1, att.attention_head_size).transpose(1, 2))  # G x H x L x d
                per_proj.append(out)
            # contiguous in the layout the products read (keys transposed): no copy at each decoding step
            self.keys.append([k.transpose(-1, -2).contiguous() for k in per_proj[0]])  # G x H x d x L_b
            self.values.append([v.contiguous() for v in per_proj[1]])  # G x H x L_b x d

    def attend(self, module: BlipTextSelfAttention, hidden: torch.Tensor) -> torch.Tensor:
        """Cross-attention of ``R x q x D`` decoder states (``R = n_sets * group``) in layer ``module.layer_idx``,
        with transformers' operations in transformers' order. Returns ``R x q x (H * d)``."""
        rows, q, _ = hidden.shape
        heads, head = module.num_attention_heads, module.attention_head_size
        query = module.query(hidden).view(self.n_sets, self.group * q, heads, head).transpose(1, 2)  # S x H x gq x d
        single = len(self.buckets) == 1
        context = query if single else torch.empty_like(query)
        for b, (sets, mask) in enumerate(self.buckets):
            qb = query if single else query[sets]  # G x H x gq x d
            scores = torch.matmul(qb, self.keys[module.layer_idx][b]) / math.sqrt(head)
            if mask is not None:
                scores = scores + mask
            probs = module.dropout(nn.functional.softmax(scores, dim=-1))
            out = torch.matmul(probs, self.values[module.layer_idx][b])  # G x H x gq x d
            if single:
                context = out
            else:
                context[sets] = out
        return context.transpose(1, 2).reshape(rows, q, heads * head)


class SharedCrossAttention(BlipTextSelfAttention):
    """BLIP's text cross-attention, reading a :class:`SharedCrossCache` when given one.

    Otherwise it is transformers' own forward, with the padding mask handed on: in transformers v5
    ``BlipTextAttention`` does not pass ``encoder_attention_mask``, and ``BlipTextSelfAttention`` then drops the mask
    it does get (padded encoder states are attended). Install with :func:`install_shared_cross_attention`.
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(cache, SharedCrossCache):
            return cache.attend(self, hidden_states), None
        if encoder_hidden_states is not None and encoder_attention_mask is None:
            encoder_attention_mask = attention_mask  # the cross-attention mask arrives as attention_mask
        return super().forward(
            hidden_states, attention_mask, encoder_hidden_states, encoder_attention_mask, cache=cache, **kwargs
        )


def install_shared_cross_attention(decoder: nn.Module) -> None:
    """Make every cross-attention of a ``BlipTextLMHeadModel`` a :class:`SharedCrossAttention`.

    The modules' class is swapped in place (a subclass adding a forward path; no new parameters), so weights, state
    dict names and ``save_pretrained`` are unchanged."""
    for layer in decoder.bert.encoder.layer:
        if type(layer.crossattention.self) is BlipTextSelfAttention:
            layer.crossattention.self.__class__ = SharedCrossAttention
