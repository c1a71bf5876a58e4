"""Label Studio's brush RLE (the ``rle`` of a ``brushlabels`` result), encoded with numpy.

The format is thi.ng ``rle-pack`` over the mask's RGBA bytes (each pixel's value repeated 4 times, row-major): a
32-bit value count, the word size minus 1 (5 bits), four run-length field sizes minus 1 (4 bits each), then per run
a flag bit (1: a repeated run, 0: literal values), a 2-bit index into the field sizes, the run length minus 1 in that
many bits, and the value (8 bits); the bit string is padded with zeros to whole bytes.

This encoder gives the bytes of ``label_studio_sdk.converter.brush.mask2rle`` (same fields, same choices: a run of 1
as a one-value literal, field sizes 3/4/8/16 bits, runs over 65,536 split into 65,536-long pieces, the padding that
``mask2rle`` adds), without the SDK: the SDK pins ``numpy<2.3`` through OpenCV and brings pandas, nltk and a code
generator, and its pure-Python encoder builds a string of bits per run. The tests decode these bytes with a reader
written from the format description above.
"""

from __future__ import annotations

import numpy as np

RLE_SIZES = (3, 4, 8, 16)  # bits of the run-length field, chosen by a 2-bit index
WORD_SIZE = 8
MAX_RUN = 2**16


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE bytes of an ``H x W`` mask (bool, or uint8 values; Label Studio paints with 255).

    Returns:
        the bytes as a list of ints, as Label Studio's JSON holds them.
    """
    if mask.ndim != 2:
        raise ValueError(f"expected an H x W mask, got shape {mask.shape}")
    values = mask.astype(np.uint8) * 255 if mask.dtype == bool else mask.astype(np.uint8)
    flat = values.ravel()
    n = flat.size * 4  # RGBA: each pixel's value 4 times
    header = f"{n:032b}{WORD_SIZE - 1:05b}" + "".join(f"{s - 1:04b}" for s in RLE_SIZES)
    header_bits = np.array([c == "1" for c in header], dtype=np.uint8)
    if flat.size == 0:
        body = np.zeros(0, dtype=np.uint8)
    else:
        change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        starts = np.concatenate(([0], change))
        lengths = np.diff(np.concatenate((starts, [flat.size]))) * 4
        run_values = flat[starts].astype(np.int64)
        lengths, run_values = _split_long_runs(lengths, run_values)
        body = _run_bits(lengths, run_values)
    bits = np.concatenate((header_bits, body))
    pad = 8 - bits.size % 8  # mask2rle pads 1..8 zero bits (a whole zero byte when already aligned)
    bits = np.concatenate((bits, np.zeros(pad, dtype=np.uint8)))
    return np.packbits(bits).tolist()


def _split_long_runs(lengths: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs over :data:`MAX_RUN` as full 65,536-long pieces followed by the rest, as ``mask2rle`` writes them."""
    pieces = np.maximum((lengths - 1) // MAX_RUN, 0)  # full pieces before the rest (which is 1..MAX_RUN long)
    if not pieces.any():
        return lengths, values
    counts = pieces + 1
    out_values = np.repeat(values, counts)
    out_lengths = np.full(int(counts.sum()), MAX_RUN, dtype=np.int64)
    last = np.cumsum(counts) - 1
    out_lengths[last] = lengths - pieces * MAX_RUN
    return out_lengths, out_values


def _run_bits(lengths: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The bits of each run: flag, size index, length - 1, value (MSB first), concatenated."""
    index = np.select([lengths <= 8, lengths <= 16, lengths <= 256], [0, 1, 2], default=3)
    size = np.asarray(RLE_SIZES)[index]
    flag = (lengths > 1).astype(np.int64)
    nbits = 1 + 2 + size + WORD_SIZE
    code = (flag << (2 + size + WORD_SIZE)) | (index << (size + WORD_SIZE)) | ((lengths - 1) << WORD_SIZE) | values
    width = int(nbits.max())  # <= 27 bits
    left_aligned = code << (width - nbits)
    shifts = np.arange(width - 1, -1, -1)
    bits = ((left_aligned[:, None] >> shifts[None, :]) & 1).astype(np.uint8)
    used = np.arange(width)[None, :] < nbits[:, None]
    return bits[used]
