"""LSTM configs: quasi-LSTM (default) and classic LSTM (`--non_quasi`), presets of the original paper."""

from dataclasses import dataclass

from languini.common_lib.config import cfg_field
from languini.train_lib.train_config import NANO_SCHEDULE, TrainConfig


@dataclass
class Config(TrainConfig):
    n_layers: int = cfg_field(4, "recurrent blocks")
    h_dim: int = cfg_field(512, "residual stream width")
    mlp_dim: int = cfg_field(2048, "MLP hidden width")
    head_dim: int = cfg_field(32, "width of one recurrent head")
    n_heads: int = cfg_field(8, "recurrent heads")
    block_length: int = cfg_field(16, "quasi-LSTM: time steps computed in parallel per block")
    non_quasi: bool = cfg_field(False, "use the classic LSTM (recurrent weights per head) instead")
    coupled: bool = cfg_field(False, "quasi-LSTM with 3 projections: input gate tied to the forget gate")
    scan: str = cfg_field("torch", "quasi-LSTM recurrence kernel", choices=["torch", "triton", "reference"])


# nano: a CPU-sized model on the shared demo-corpus schedule (trains in minutes on two CPU cores).
NANO = dict(n_layers=2, h_dim=128, mlp_dim=512, head_dim=32, n_heads=4, block_length=16, **NANO_SCHEDULE)

PRESETS = {
    "nano": NANO,
    "mini": dict(n_layers=4, h_dim=512, mlp_dim=2048, head_dim=32, n_heads=8, block_length=16),
    "tiny": dict(n_layers=4, h_dim=768, mlp_dim=3072, head_dim=64, n_heads=12, block_length=8),
    "small": dict(n_layers=12, h_dim=768, mlp_dim=3072, head_dim=64, n_heads=12, block_length=16),
    "medium": dict(n_layers=24, h_dim=1024, mlp_dim=4096, head_dim=64, n_heads=16, block_length=16),
    "large": dict(n_layers=24, h_dim=1536, mlp_dim=6144, head_dim=96, n_heads=16, block_length=16),
    "XL": dict(n_layers=24, h_dim=2048, mlp_dim=8192, head_dim=128, n_heads=24, block_length=16),
}
DEFAULT_PRESET = "mini"

