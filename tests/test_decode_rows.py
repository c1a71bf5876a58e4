"""The decoding loop that drops finished rows gives, token for token, what transformers' ``generate`` gives with the
same cache, processors and per-row samplers (the loop it replaced), while computing fewer rows."""

import itertools

import pytest
import torch
from transformers import LogitsProcessorList, TemperatureLogitsWarper

from autoseg.models.blip import MIN_GENERATE_ROWS, CaptionConfig, load_blip
from autoseg.models.blip_decoding import HF_DEFAULT_TOP_K, GumbelSampler, SharedCrossCache, row_seed


@pytest.fixture(scope="module")
def blip():
    captioner = load_blip("scratch:tiny")
    sep = captioner.model.config.text_config.sep_token_id
    with torch.no_grad():  # random weights never end a caption: make [SEP] likely, so rows end at many lengths
        captioner.model.text_decoder.cls.predictions.bias[sep] += 1.5
    return captioner


def generate_reference(blip, states, cfg: CaptionConfig, seed: int) -> list[list[str]]:
    """The previous implementation: one ``generate`` call over every row (finished rows decode padding)."""
    n_pass = cfg.n_passes if cfg.sample else 1
    n_sets = len(states)
    spare = max(0, -(-MIN_GENERATE_ROWS // n_pass) - n_sets)
    states = [*states, *[states[-1]] * spare]
    keys = list(range(n_sets)) + [0] * spare
    rows = len(states) * n_pass
    length = max(st.shape[0] for st in states)
    prompt = blip.prompt_ids(cfg.prompt)
    text_cfg = blip.model.config.text_config
    kwargs = dict(
        do_sample=False,
        num_beams=1,
        max_new_tokens=cfg.max_new_tokens,
        min_new_tokens=cfg.min_new_tokens,
        repetition_penalty=cfg.repetition_penalty,
        eos_token_id=text_cfg.sep_token_id,
        pad_token_id=text_cfg.pad_token_id,
    )
    if cfg.sample:
        gens = [torch.Generator().manual_seed(row_seed(seed, k, p)) for k in keys for p in range(n_pass)]
        warpers = [TemperatureLogitsWarper(cfg.temperature)] if cfg.temperature != 1.0 else []
        kwargs["logits_processor"] = LogitsProcessorList([*warpers, GumbelSampler(gens, HF_DEFAULT_TOP_K, cfg.top_p)])
    out = blip.model.text_decoder.generate(
        input_ids=prompt[None].expand(rows, -1),
        attention_mask=torch.ones(rows, prompt.numel(), dtype=torch.long),
        encoder_hidden_states=states[0].new_zeros(()).expand(rows, length, states[0].shape[-1]),
        encoder_attention_mask=torch.ones(rows, length, dtype=torch.long),
        cache=SharedCrossCache(blip.model.text_decoder, states, n_pass, cfg.mask_padding),
        **kwargs,
    )
    texts = [t.strip().lower() for t in blip.processor.tokenizer.batch_decode(out[:, prompt.numel() :], True)]
    return [texts[i * n_pass : (i + 1) * n_pass] for i in range(n_sets)]


CASES = list(
    itertools.product(
        [1, 3, 7],  # sets (clusters): 1 needs dummy sets, 7 spans several buckets
        [True, False],  # sampled / greedy
        [True, False],  # mask_padding
        [(1.0, 0), (1.3, 3)],  # repetition penalty, min new tokens
    )
)


@pytest.mark.parametrize(("n_sets", "sample", "mask_padding", "penalty_min"), CASES)
@torch.inference_mode()
def test_dropping_finished_rows_keeps_every_caption(blip, n_sets, sample, mask_padding, penalty_min):
    penalty, min_new = penalty_min
    gen = torch.Generator().manual_seed(n_sets)
    lengths = [5, 17, 33, 9, 40, 12, 70][:n_sets]  # several buckets
    states = [torch.randn(n, blip.hidden_size, generator=gen) for n in lengths]
    cfg = CaptionConfig(
        n_passes=4,
        sample=sample,
        max_new_tokens=16,
        min_new_tokens=min_new,
        repetition_penalty=penalty,
        mask_padding=mask_padding,
        temperature=0.8 if sample else 1.0,
    )
    got = blip.caption(states, cfg, seed=5)
    assert got == generate_reference(blip, states, cfg, seed=5)
    if sample:
        ended = [c for per_set in got for c in per_set]
        assert len({len(c.split()) for c in ended}) > 1  # rows really ended at different steps


@torch.inference_mode()
def test_finished_rows_leave_the_batch(blip, monkeypatch):
    rows_per_step = []
    decoder = blip.model.text_decoder
    handle = decoder.register_forward_pre_hook(
        lambda mod, args, kw: rows_per_step.append(kw["input_ids"].shape[0]), with_kwargs=True
    )
    try:
        states = [torch.randn(n, blip.hidden_size) for n in (6, 20, 11)]
        blip.caption(states, CaptionConfig(n_passes=5, max_new_tokens=20, min_new_tokens=1), seed=1)
    finally:
        handle.remove()
    assert rows_per_step[0] == 15 and min(rows_per_step) >= MIN_GENERATE_ROWS
    assert rows_per_step[-1] < rows_per_step[0]  # fewer rows by the end
    assert rows_per_step == sorted(rows_per_step, reverse=True)
