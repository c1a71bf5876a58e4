"""CLIP text embeddings of every (name, template) prompt, with each template's words before the name run once.

CLIP's text transformer is causal: a token's states depend only on the tokens before it. The tokens a template puts
before the name ("<start> a photo of a") have the same keys and values whatever the name, so they are computed once
per template, and each prompt runs only its tokens from the name on (3 of the ~11 tokens of most templates). The
pooled state (the end token, found as transformers finds it), the final layer norm and the projection are CLIP's;
the result equals ``get_text_features`` on the full prompts up to float rounding. transformers' text model has no
key/value cache to start from, hence this forward built from its layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def prefix_ids(tokenizer, template: str) -> list[int]:
    """Token ids of a template's text before ``{}``: the start token and the words, without the end token."""
    ids = tokenizer(template.split("{}")[0].rstrip()).input_ids
    return ids[:-1] if ids and ids[-1] == tokenizer.eos_token_id else ids


def pooled_index(text_model: nn.Module, ids: list[int]) -> int:
    """Where transformers' CLIP text model pools: the (first) highest id for the legacy ``eos_token_id == 2``, else
    the first end token, or position 0 when there is none (``(ids == eos).int().argmax()`` of an all-zero row)."""
    if text_model.eos_token_id == 2:
        return max(range(len(ids)), key=lambda i: (ids[i], -i))
    eos = text_model.eos_token_id
    return ids.index(eos) if eos in ids else 0


def heads(att: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values of ``N x L x D`` states, each ``N x H x L x d``."""
    n, length, _ = x.shape
    return tuple(
        p(x).view(n, length, att.num_heads, att.head_dim).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj)
    )


def run_prefixes(text_model: nn.Module, prefixes: Sequence[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Keys and values of every layer for the templates' prefixes (right-padded, causal): each ``T x H x P x d``."""
    dev = text_model.embeddings.token_embedding.weight.device
    span = max(len(p) for p in prefixes)
    ids = torch.zeros(len(prefixes), span, dtype=torch.long, device=dev)
    for i, p in enumerate(prefixes):
        ids[i, : len(p)] = torch.tensor(p, device=dev)
    t = len(prefixes)
    hidden = text_model.embeddings(input_ids=ids)
    causal = torch.ones(span, span, dtype=torch.bool, device=dev).tril()
    out = []
    for layer in text_model.encoder.layers:
        att = layer.self_attn
        q, k, v = heads(att, layer.layer_norm1(hidden))
        out.append((k, v))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=att.scale)
        hidden = hidden + att.out_proj(ctx.transpose(1, 2).reshape(t, span, -1))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return out


def run_suffixes(
    text_model: nn.Module,
    ids: torch.Tensor,
    start: torch.Tensor,
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor]],
    prefix_rows: torch.Tensor,
    prefix_len: torch.Tensor,
) -> torch.Tensor:
    """The text layers on ``N x L`` suffix tokens that follow a cached prefix; returns ``N x L x D`` final states.

    Args:
        ids: suffix token ids (right-padded; padding is only seen by later padding, as in the causal model).
        start: ``N`` positions of the first suffix token (its prefix's length).
        prefix_kv: per layer, the prefixes' keys and values, each ``T x H x P x d``.
        prefix_rows: ``N`` index of each suffix's prefix.
        prefix_len: ``T`` real length of each prefix.
    """
    n, length = ids.shape
    dev = ids.device
    positions = start[:, None] + torch.arange(length, device=dev)[None]  # N x L
    hidden = text_model.embeddings(input_ids=ids, position_ids=positions)
    span = prefix_kv[0][0].shape[2] if prefix_kv else 0
    seen = torch.arange(span, device=dev)[None] < prefix_len[prefix_rows][:, None]  # N x P: real prefix tokens
    causal = torch.ones(length, length, dtype=torch.bool, device=dev).tril()  # L x L
    mask = torch.cat([seen[:, None].expand(n, length, span), causal.expand(n, -1, -1)], dim=-1)[:, None]  # N 1 L P+L
    for layer, (pk, pv) in zip(text_model.encoder.layers, prefix_kv, strict=True):
        att = layer.self_attn
        q, k, v = heads(att, layer.layer_norm1(hidden))
        k = torch.cat([pk[prefix_rows], k], dim=2)  # N x H x (P + L) x d
        v = torch.cat([pv[prefix_rows], v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=att.scale)  # N x H x L x d
        hidden = hidden + att.out_proj(out.transpose(1, 2).reshape(n, length, -1))
        hidden = hidden + layer.mlp(layer.layer_norm2(hidden))
    return text_model.final_layer_norm(hidden)


def template_text_features(
    text_model: nn.Module, projection: nn.Module, tokenizer, templates: Sequence[str], names: Sequence[str]
) -> torch.Tensor:
    """Projected CLIP text features of ``template.format(name)`` for every name and template: ``C x T x E``.

    A prompt whose tokens do not start with its template's prefix tokens (a tokenizer that merges across the name's
    boundary) runs in full.

    Args:
        text_model: a CLIP(Seg) text transformer (``embeddings``, ``encoder.layers``, ``final_layer_norm``).
        projection: its text projection.
        tokenizer: the model's tokenizer.
    """
    dev = text_model.embeddings.token_embedding.weight.device
    prefixes = [prefix_ids(tokenizer, t) for t in templates]
    prompts = [t.format(n) for n in names for t in templates]
    full = tokenizer(prompts, truncation=True).input_ids
    empty = len(prefixes)  # the empty prefix (index T) serves prompts that run in full
    rows = []  # per prompt: (prefix index, suffix ids, pooled position within the suffix)
    for i, ids in enumerate(full):
        t, pooled_at = i % len(templates), pooled_index(text_model, ids)
        p = prefixes[t]
        shared = ids[: len(p)] == p and pooled_at >= len(p)
        keep = len(p) if shared else 0
        rows.append((t if shared else empty, ids[keep:], pooled_at - keep))
    kv = run_prefixes(text_model, [*prefixes, [tokenizer.pad_token_id or 0]])
    prefix_len = torch.tensor([*(len(p) for p in prefixes), 0], device=dev)
    pooled = [None] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, (_, suffix, _) in enumerate(rows):  # prompts of one suffix length together: no padding
        by_length.setdefault(len(suffix), []).append(i)
    for _, members in sorted(by_length.items()):
        ids = torch.tensor([rows[i][1] for i in members], device=dev)  # N x L
        which = torch.tensor([rows[i][0] for i in members], device=dev)
        states = run_suffixes(text_model, ids, prefix_len[which], kv, which, prefix_len)  # N x L x D
        at = torch.tensor([rows[i][2] for i in members], device=dev)
        for i, state in zip(members, states[torch.arange(len(members), device=dev), at], strict=True):
            pooled[i] = state
    features = projection(torch.stack(pooled))  # (C T) x E
    return features.view(len(names), len(templates), -1)
