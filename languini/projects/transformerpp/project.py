"""The Transformer++ project's contract declaration: config, presets, model and evaluation protocol."""

from languini.train_lib.project_spec import ProjectSpec

from .configs import DEFAULT_PRESET, PRESETS, Config
from .model import Model

SPEC = ProjectSpec(
    Config=Config,
    presets=PRESETS,
    Model=Model,
    eval_protocol="sliding_window",
    default_preset=DEFAULT_PRESET,
    description="Transformer++: RMSNorm, rotary embeddings, SwiGLU, no biases",
)
