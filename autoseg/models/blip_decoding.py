"""Decoding helpers of AutoSeg's BLIP captioner: per-row seeded sampling, cross-attention shared by a set's passes,
and a decoding loop that stops computing the rows that have finished.

Every cluster is captioned ``n_passes`` times from the same encoder states. transformers' cache keeps one copy of the
cross-attention keys/values per generation row and pads every row to the longest set of the call, so each decoding
step reads ``rows x max length`` keys and values per layer: on a CPU that memory traffic, not the arithmetic, was
most of the captioning time. :class:`SharedCrossCache` stores them once per set, in buckets of similar length, and
:class:`SharedCrossAttention` reads them for all of the set's passes at once.

transformers' ``generate`` keeps every row in the batch until the last one ends (finished rows decode padding), so a
batch costs its longest caption times its rows. :func:`decode` is the same greedy loop (same processors, same order,
same stopping) that drops a finished row from every product; the captions are unchanged (checked against
``generate`` token for token in the tests).
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

    def select(self, rows: torch.Tensor) -> GumbelSampler:
        """The sampler of a subset of the rows (their generators go on where they are)."""
        return GumbelSampler([self.generators[i] for i in rows.tolist()], self.top_k, self.top_p)


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
        self.slots: torch.Tensor | None = None  # after select_rows: each row's place in the n_sets x group grid
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
        self.keys: list[list[torch.Tensor]] = []  # per layer, per bucket: G x H x L_b x d
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
            # contiguous in the layout attention reads: no copy at each decoding step
            self.keys.append([k.contiguous() for k in per_proj[0]])  # G x H x L_b x d
            self.values.append([v.contiguous() for v in per_proj[1]])  # G x H x L_b x d

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current rows, in order): self-attention states, and the shared
        keys/values of the sets that still have a row. A set keeps its ``group`` slots (a dropped row's slot decodes
        zeros), so its products keep their shape and their results."""
        self.self_attention_cache.batch_select_indices(rows)
        grid = torch.arange(self.n_sets * self.group, device=rows.device) if self.slots is None else self.slots
        slots = grid[rows]
        kept = torch.unique(slots // self.group)  # positions of the sets that still have rows, in order
        if len(kept) < self.n_sets:
            where = torch.full((self.n_sets,), -1, dtype=torch.long, device=rows.device)
            where[kept] = torch.arange(len(kept), device=rows.device)
            buckets, keys, values = [], [[] for _ in self.keys], [[] for _ in self.values]
            for b, (sets, mask) in enumerate(self.buckets):
                keep = (where[sets] >= 0).nonzero()[:, 0]
                if len(keep) == 0:
                    continue
                buckets.append((where[sets[keep]], None if mask is None else mask[keep]))
                for layer in range(len(self.keys)):
                    keys[layer].append(self.keys[layer][b][keep])
                    values[layer].append(self.values[layer][b][keep])
            self.buckets, self.keys, self.values = buckets, keys, values
            slots = where[slots // self.group] * self.group + slots % self.group
            self.n_sets = len(kept)
        full = len(slots) == self.n_sets * self.group and bool((slots == torch.arange(len(slots))).all())
        self.slots = None if full else slots

    def attend(self, module: BlipTextSelfAttention, hidden: torch.Tensor) -> torch.Tensor:
        """Cross-attention of ``R x q x D`` decoder states (``R = n_sets * group``, or the rows kept by
        :meth:`select_rows`) in layer ``module.layer_idx``: transformers' projections, its softmax attention fused
        (``scaled_dot_product_attention``: about 2x faster on a CPU; equal within float rounding).
        Returns ``R x q x (H * d)``."""
        rows, q, _ = hidden.shape
        heads, head = module.num_attention_heads, module.attention_head_size
        query = module.query(hidden)  # R x q x (H * d)
        if self.slots is not None:  # dropped rows' slots decode zeros; every set keeps its shape
            grid = query.new_zeros(self.n_sets * self.group, q, query.shape[-1])
            grid[self.slots] = query
            query = grid
        query = query.view(self.n_sets, self.group * q, heads, head).transpose(1, 2)  # S x H x gq x d
        single = len(self.buckets) == 1
        context = query if single else torch.empty_like(query)
        for b, (sets, mask) in enumerate(self.buckets):
            qb = query if single else query[sets]  # G x H x gq x d
            keys, values = self.keys[module.layer_idx][b], self.values[module.layer_idx][b]
            drop = module.dropout.p if module.training else 0.0
            out = nn.functional.scaled_dot_product_attention(
                qb, keys, values, attn_mask=mask, dropout_p=drop, scale=1 / math.sqrt(head)
            )  # G x H x gq x d
            if single:
                context = out
            else:
                context[sets] = out
        context = context.transpose(1, 2).reshape(self.n_sets * self.group, q, heads * head)
        return context if self.slots is None else context[self.slots]


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


def decode(
    decoder: nn.Module,
    prompt: torch.Tensor,
    cache: SharedCrossCache,
    states_like: torch.Tensor,
    processors: Sequence[LogitsProcessor],
    sampler: GumbelSampler | None,
    eos: int,
    pad: int,
    max_new_tokens: int,
    live: torch.Tensor | None = None,
    min_rows: int = 1,
) -> torch.Tensor:
    """Greedy decoding (of the sampler's scores when given) of ``cache``'s rows, dropping rows as they finish.

    The steps of transformers' ``generate`` with ``do_sample=False``: the decoder's last logits in float32, the
    ``processors`` then the ``sampler`` (row by row), the argmax, padding after a row's ``eos``, the end when every row
    has ended or after ``max_new_tokens``. A finished row is dropped from the batch (its self-attention states and, once
    all its set's rows have ended, the set's cross-attention keys/values), but at least ``min_rows`` rows are kept
    (BLAS kernels for 1-3 rows round differently from those for more).

    Args:
        decoder: a ``BlipTextLMHeadModel`` with :class:`SharedCrossAttention` installed.
        prompt: ``P`` prompt token ids, the same for every row.
        cache: the rows' cache (``n_sets * group`` rows).
        states_like: a tensor of the encoder states' dtype, device and width ``D`` (the decoder reads the shape).
        processors: row-independent logits processors, in transformers' order.
        sampler: the rows' sampler (one generator per row), last; None: greedy.
        live: per row, whether its caption is wanted (False: a dummy row, ended from the start).

    Returns:
        ``R x (P + T)`` token ids, ``pad`` after a row's ``eos``.
    """
    rows, length, dim = cache.n_sets * cache.group, 1, states_like.shape[-1]
    device = prompt.device
    ids = prompt[None].expand(rows, -1).clone()  # every row's tokens so far (R x (P + t))
    alive = torch.ones(rows, dtype=torch.bool, device=device) if live is None else live.clone()
    active = torch.arange(rows, device=device)  # the rows in the batch (original indices)
    step_ids = ids
    positions = torch.arange(ids.shape[1], device=device)[None].expand(rows, -1)
    for _ in range(max_new_tokens):
        n = len(active)
        out = decoder(
            input_ids=step_ids,
            cache=cache,
            position_ids=positions,
            encoder_hidden_states=states_like.new_zeros(()).expand(n, length, dim),
            encoder_attention_mask=torch.ones(n, length, dtype=torch.long, device=device),
            logits_to_keep=1,
            use_cache=True,
            is_decoder=True,
            return_dict=True,
        )
        scores = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)
        history = ids[active]
        for processor in processors:
            scores = processor(history, scores)
        if sampler is not None:
            scores = sampler(history, scores)
        tokens = torch.where(alive[active], scores.argmax(-1), pad)
        ids = torch.cat([ids, ids.new_full((rows, 1), pad)], 1)
        ids[active, -1] = tokens
        alive[active[tokens == eos]] = False
        if not alive.any():
            break
        keep = alive[active]
        if int(keep.sum()) < min_rows:  # ended rows stay in the batch to make up min_rows
            keep[(~keep).nonzero()[: min_rows - int(keep.sum()), 0]] = True
        if not keep.all():
            kept = keep.nonzero()[:, 0]
            cache.select_rows(kept)
            sampler = sampler.select(kept) if sampler is not None else None
            active = active[kept]
        step_ids = ids[active, -1:]
        positions = positions.new_full((len(active), 1), ids.shape[1] - 1)
    return ids
