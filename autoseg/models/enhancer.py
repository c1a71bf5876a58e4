"""EmbeddingEnhancer: a small residual head on BLIP patch tokens, trained so that tokens group along segments.

The head is identity at initialisation (its output projection is zero), so an untrained head reproduces plain
BBoost. It is built from timm's ViT ``Block`` (self-attention + MLP) or pre-norm residual ``Mlp`` blocks, and sees
an optional 2-D sine position code of the patch grid, so one head serves every input scale.

Weights are stored as safetensors with the hyperparameters in the file's metadata: ``load_enhancer(path)`` needs
nothing else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from autoseg.utils.io import atomic_write
from autoseg.vocab.bboost import sine_position_code

FORMAT = "autoseg.embedding_enhancer"
FORMAT_VERSION = "1"
BLOCKS = ("attn", "mlp")


@dataclass
class EnhancerConfig:
    """Hyperparameters of the head (stored in the safetensors metadata).

    Attributes:
        dim: token width D (BLIP's vision hidden size: 768 for ViT-B, 1024 for ViT-L).
        width: internal width of the blocks.
        depth: number of blocks.
        block: "attn" (timm ViT ``Block``: self-attention + MLP) or "mlp" (pre-norm residual ``Mlp``, per token).
        num_heads: attention heads ("attn" blocks); must divide ``width``.
        mlp_ratio: MLP hidden width as a multiple of ``width``.
        pos_dim: channels of the 2-D sine position code appended to the input (0: none; multiple of 4).
    """

    dim: int
    width: int = 256
    depth: int = 2
    block: str = "attn"
    num_heads: int = 4
    mlp_ratio: float = 4.0
    pos_dim: int = 64

    def __post_init__(self) -> None:
        for name in ("dim", "width", "depth", "num_heads", "pos_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"enhancer {name}={value!r}: expected a whole number")
        ratio = self.mlp_ratio
        if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not (math.isfinite(ratio) and ratio > 0):
            raise ValueError(f"enhancer mlp_ratio={ratio!r}: expected a positive, finite number")
        if self.num_heads < 1:
            raise ValueError(f"enhancer num_heads={self.num_heads}: expected at least 1")
        if self.block not in BLOCKS:
            raise ValueError(f"enhancer block {self.block!r} unknown; choose one of {BLOCKS}")
        if self.dim < 1 or self.width < 1 or self.depth < 0:
            raise ValueError(
                f"enhancer needs dim >= 1, width >= 1, depth >= 0; got {self.dim}, {self.width}, {self.depth}"
            )
        if self.block == "attn" and self.width % self.num_heads:
            raise ValueError(f"enhancer width {self.width} must be a multiple of num_heads {self.num_heads}")
        if self.pos_dim % 4:
            raise ValueError(f"enhancer pos_dim must be a multiple of 4, got {self.pos_dim}")


class MlpBlock(nn.Module):
    """Pre-norm residual MLP on each token: ``x + Mlp(LayerNorm(x))``."""

    def __init__(self, width: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.mlp = Mlp(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class EmbeddingEnhancer(nn.Module):
    """Residual head ``tokens + out(blocks(in(norm(tokens) ++ pos)))`` with ``out`` zero at init (identity).

    Args:
        config: hyperparameters.
    """

    def __init__(self, config: EnhancerConfig):
        super().__init__()
        self.config = config
        self.norm_in = nn.LayerNorm(config.dim)
        self.proj_in = nn.Linear(config.dim + config.pos_dim, config.width)
        if config.block == "attn":
            blocks = [
                Block(config.width, config.num_heads, config.mlp_ratio, qkv_bias=True) for _ in range(config.depth)
            ]
        else:
            blocks = [MlpBlock(config.width, config.mlp_ratio) for _ in range(config.depth)]
        self.blocks = nn.Sequential(*blocks)
        self.norm_out = nn.LayerNorm(config.width)
        self.proj_out = nn.Linear(config.width, config.dim)
        nn.init.zeros_(self.proj_out.weight)  # zero residual: identity at init, as in ControlNet's zero convolutions
        nn.init.zeros_(self.proj_out.bias)

    @property
    def dim(self) -> int:
        return self.config.dim

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Enhance patch tokens.

        Args:
            tokens: ``B x N x D`` patch tokens, row-major on ``grid`` (``N = h * w``).
            grid: ``(h, w)`` patch grid.

        Returns:
            ``B x N x D`` enhanced tokens.
        """
        if tokens.shape[-1] != self.dim:
            raise ValueError(
                f"the enhancer was trained on {self.dim}-d tokens but got {tokens.shape[-1]}-d ones: it belongs to "
                "another BLIP model; pass the BLIP it was trained with, or train a head for this one"
            )
        if tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"got {tokens.shape[1]} tokens for a {grid[0]}x{grid[1]} grid")
        x = self.norm_in(tokens)
        if self.config.pos_dim:
            pos = sine_position_code(*grid, self.config.pos_dim).to(x)  # N x P
            x = torch.cat([x, pos.expand(x.shape[0], -1, -1)], dim=-1)  # B x N x (D + P)
        x = self.blocks(self.proj_in(x))  # B x N x width
        return tokens + self.proj_out(self.norm_out(x)).to(tokens.dtype)


def save_enhancer(
    enhancer: EmbeddingEnhancer, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the head as safetensors (atomically) with its config in the metadata.

    Args:
        enhancer: the head (its config is stored).
        path: output file, conventionally ``*.safetensors``.
        state_dict: weights to store instead of the head's current ones (e.g. from a checkpoint).
    """
    sd = enhancer.state_dict() if state_dict is None else state_dict
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}
    metadata = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "config": json.dumps(dataclasses.asdict(enhancer.config)),
    }
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_enhancer(path: str | os.PathLike, device: str | torch.device = "cpu") -> EmbeddingEnhancer:
    """Load a head written by :func:`save_enhancer` (or exported at the end of ``train.py fit``), in eval mode.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a directory, a damaged, truncated or other file than an enhancer's safetensors, or weights that do
            not match the stored config (the message lists missing / unexpected keys and shape mismatches).
    """
    p = Path(path)
    expected = (
        "expected a .safetensors file exported by `train.py fit` (<log_dir>/export/{last,best}/enhancer.safetensors) "
        "or written by autoseg.models.enhancer.save_enhancer"
    )
    if p.is_dir():
        raise ValueError(f"{p}: is a directory; {expected}")
    if not p.is_file():
        raise FileNotFoundError(f"{p}: enhancer weights not found; {expected}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 - no tensor is read
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"{p}: not a readable safetensors file ({e}): it is damaged, truncated or of another format; {expected}"
        ) from e
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{p}: not an AutoSeg enhancer (metadata format {metadata.get('format')!r}, expected {FORMAT!r}); "
            "export one with `train.py fit` on an EnhancerModule config"
        )
    try:
        config = EnhancerConfig(**json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{p}: enhancer metadata has no valid 'config' ({e})") from e
    check_config_against_shapes(p, config, shapes)
    enhancer = EmbeddingEnhancer(config)  # its size is now that of the file's tensors
    try:
        tensors = load_file(str(p))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{p}: not a readable safetensors file ({e}); {expected}") from e
    enhancer.load_state_dict(tensors, strict=True)
    return enhancer.to(device).eval()


def check_config_against_shapes(path: Path, config: EnhancerConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Check a head's metadata config against the shapes of the tensors in its file, before the head is built.

    The sizes the config declares are compared with the tensors (read from the file's header only), then every
    parameter of the head built on the ``meta`` device (no memory): a config that declares a huge head over small
    tensors is refused, so the head built afterwards is no larger than the file.

    Raises:
        ValueError: one line naming ``path``, the config field and the tensor that disagree, or the keys and shapes
            that differ.
    """

    def disagree(field: str, evidence: str) -> ValueError:
        return ValueError(
            f"{path}: metadata config {field}={getattr(config, field)!r} disagrees with the weights ({evidence}); "
            "the file is damaged or was edited; re-export it"
        )

    norm_in, proj_in = shapes.get("norm_in.weight"), shapes.get("proj_in.weight")
    if norm_in is not None and len(norm_in) == 1 and norm_in[0] != config.dim:
        raise disagree("dim", f"norm_in.weight has shape {norm_in}: dim {norm_in[0]}")
    if proj_in is not None and len(proj_in) == 2:
        if proj_in[0] != config.width:
            raise disagree("width", f"proj_in.weight has shape {proj_in}: width {proj_in[0]}")
        if proj_in[1] != config.dim + config.pos_dim:
            raise disagree("pos_dim", f"proj_in.weight has shape {proj_in}: pos_dim {proj_in[1] - config.dim}")
    depth = len({k.split(".")[1] for k in shapes if k.startswith("blocks.")})
    if depth != config.depth:
        raise disagree("depth", f"the file holds {depth} blocks")
    fc1 = shapes.get("blocks.0.mlp.fc1.weight")
    if fc1 is not None and len(fc1) == 2 and fc1[0] != int(config.width * config.mlp_ratio):
        raise disagree("mlp_ratio", f"blocks.0.mlp.fc1.weight has shape {fc1}: mlp_ratio {fc1[0]} / {config.width}")
    with torch.device("meta"):  # every other parameter, without allocating anything
        model = {k: tuple(v.shape) for k, v in EmbeddingEnhancer(config).state_dict().items()}
    missing, unexpected = sorted(set(model) - set(shapes)), sorted(set(shapes) - set(model))
    mismatched = [f"{k}: file {shapes[k]} vs model {v}" for k, v in model.items() if k in shapes and shapes[k] != v]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{path}: weights do not match the stored config {config}: missing keys {missing}, unexpected keys "
            f"{unexpected}, shape mismatches {mismatched}; the file is damaged or was edited; re-export it"
        )
