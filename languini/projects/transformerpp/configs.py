"""Transformer++ configs: GPT's depth, width and heads, a SwiGLU MLP width that matches GPT's parameters.

`mlp_dim` is the SwiGLU hidden width (three h_dim x mlp_dim matrices instead of GPT's two h_dim x 4h_dim),
chosen per preset, as a multiple of 128 (64 for nano), so the total parameter count is within 1.2% of
the GPT preset of the same name (the counts are in README.md and checked by the tests).
"""

from dataclasses import dataclass

from languini.common_lib.config import cfg_field
from languini.train_lib.train_config import NANO_SCHEDULE, TrainConfig


@dataclass
class Config(TrainConfig):
    n_layers: int = cfg_field(4, "transformer blocks")
    h_dim: int = cfg_field(512, "residual stream width")
    mlp_dim: int = cfg_field(1408, "SwiGLU hidden width")
    head_dim: int = cfg_field(32, "width of one attention head (even: rotary embeddings rotate pairs)")
    n_heads: int = cfg_field(8, "attention heads (n_heads * head_dim need not equal h_dim)")
    rope_base: float = cfg_field(10000.0, "base of the rotary position embedding's frequencies")


# nano: GPT's nano widths on the shared demo-corpus schedule (trains in minutes on two CPU cores).
NANO = dict(n_layers=2, h_dim=128, mlp_dim=384, head_dim=32, n_heads=4, **NANO_SCHEDULE)

PRESETS = {
    "nano": NANO,
    "mini": dict(n_layers=4, h_dim=512, mlp_dim=1408, head_dim=32, n_heads=8),
    "tiny": dict(n_layers=4, h_dim=768, mlp_dim=2048, head_dim=64, n_heads=12),
    "small": dict(n_layers=12, h_dim=768, mlp_dim=2048, head_dim=64, n_heads=12),
    "medium": dict(n_layers=24, h_dim=1024, mlp_dim=2688, head_dim=64, n_heads=16),
    "large": dict(n_layers=24, h_dim=1536, mlp_dim=4096, head_dim=96, n_heads=16),
    "XL": dict(n_layers=24, h_dim=2048, mlp_dim=5504, head_dim=128, n_heads=24),
}
DEFAULT_PRESET = "mini"
