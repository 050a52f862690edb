"""Gated DeltaNet configs: GPT's depth, width and heads, a SwiGLU MLP width that matches GPT's parameters.

`mlp_dim` is the SwiGLU hidden width, chosen per preset as a multiple of 128 (64 for nano) so the total
parameter count is within 1.1% of the GPT preset of the same name (README.md lists the counts, the tests
check them). Keys and values have `head_dim` channels per head, so each head's state is head_dim x head_dim.
"""

from dataclasses import dataclass

from languini.common_lib.config import cfg_field
from languini.train_lib.train_config import NANO_SCHEDULE, TrainConfig


@dataclass
class Config(TrainConfig):
    n_layers: int = cfg_field(4, "gated DeltaNet blocks")
    h_dim: int = cfg_field(512, "residual stream width")
    mlp_dim: int = cfg_field(1280, "SwiGLU hidden width")
    head_dim: int = cfg_field(
        32, "key and value width of one head (the state of a head is head_dim x head_dim)"
    )
    n_heads: int = cfg_field(8, "heads of the delta rule")
    conv_size: int = cfg_field(4, "kernel width of the short causal depthwise convolutions on q, k and v")
    gate: bool = cfg_field(
        True, "gated DeltaNet (learned decay g <= 0); --no-gate: the plain delta rule, g = 0"
    )
    kernel: str = cfg_field(
        "torch", "delta-rule kernel: chunked PyTorch, the step-by-step loop, or flash-linear-attention (CUDA)",
        choices=["torch", "reference", "fla"],
    )  # fmt: skip
    chunk_size: int = cfg_field(64, "time steps per chunk of the chunked delta rule (--kernel torch)")


# nano: GPT's nano widths on the shared demo-corpus schedule (trains in minutes on two CPU cores).
NANO = dict(n_layers=2, h_dim=128, mlp_dim=320, head_dim=32, n_heads=4, **NANO_SCHEDULE)

PRESETS = {
    "nano": NANO,
    "mini": dict(n_layers=4, h_dim=512, mlp_dim=1280, head_dim=32, n_heads=8),
    "tiny": dict(n_layers=4, h_dim=768, mlp_dim=1792, head_dim=64, n_heads=12),
    "small": dict(n_layers=12, h_dim=768, mlp_dim=1792, head_dim=64, n_heads=12),
    "medium": dict(n_layers=24, h_dim=1024, mlp_dim=2432, head_dim=64, n_heads=16),
    "large": dict(n_layers=24, h_dim=1536, mlp_dim=3584, head_dim=96, n_heads=16),
    "XL": dict(n_layers=24, h_dim=2048, mlp_dim=4480, head_dim=128, n_heads=24),
}
DEFAULT_PRESET = "mini"
