"""The project contract: what a folder under `languini/projects/` declares and what its model must do.

A project declares one `SPEC = ProjectSpec(...)` in its `project.py`. The spec carries no name: a project
is named by its folder (see `languini/projects/__init__.py`), so a folder copied by hand is a new project
that trains and evaluates its own model, with its runs under `runs/<folder>/`.

The model (`LanguageModel`) knows nothing of DDP, precision or compile; the trainer wires those in.
The full contract, with the rules the contract tests check, is in docs/architecture.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from languini.common_lib.config import (
    apply_overrides,
    build_preset,
    load_config_json,
    parse_config,
    read_config_json,
)
from languini.common_lib.errors import UserError
from languini.train_lib.train_config import TrainConfig

# How eval.py scores a run: "sliding_window" (windows of seq_len over one stream of the split, the last
# `last_n` tokens of each scored; no state) or "stateful" (the state carried through the whole split).
EVAL_PROTOCOLS = ("sliding_window", "stateful")

# A recurrent state: None (stateless), a tensor, or tuples/lists of those, nested. Every tensor has the
# batch on dimension 0, so the trainer can keep one state per stream and checkpoint it.
State = Any


@runtime_checkable
class LanguageModel(Protocol):
    """What the trainer, evaluation and tools call on a project's model (an `nn.Module`).

    - `Model(config)` builds it; building under `torch.device("meta")` must work (FLOP counts, checks).
    - `forward(x, state)`: x is [batch, time] token ids; returns ([batch, time, vocab] logits, new state).
      Logits at position t depend only on tokens <= t and the incoming state.
    - `get_init_state(batch_size, device)`: the state before the first token (None for stateless models).
      Calling forward on [x1; x2] equals forward on x1, then on x2 with the returned state.
    - optional `layers`: an `nn.ModuleList` of the repeated blocks, compiled one by one by `--compile`.
    """

    def forward(self, x: torch.Tensor, state: State) -> tuple[torch.Tensor, State]: ...

    def get_init_state(self, batch_size: int, device: torch.device | str) -> State: ...


@dataclass(frozen=True)
class ProjectSpec:
    """A project: its config class (a `TrainConfig` subclass), presets, model class and eval protocol.

    `name` is empty in a project's own `project.py`; `languini.projects.load_project` fills it in from the
    folder. Every config the spec makes carries that name in its `project` field.
    """

    Config: type
    presets: dict
    Model: type
    eval_protocol: str
    default_preset: str = "mini"
    description: str = ""
    name: str = ""

    def __post_init__(self):
        problems = spec_problems(self)
        if problems:
            raise TypeError(f"invalid ProjectSpec: {'; '.join(problems)}")

    def named(self, name: str) -> ProjectSpec:
        return dataclasses.replace(self, name=name)

    def _stamped(self, cfg):
        return dataclasses.replace(cfg, project=self.name)

    def preset_config(self, preset: str | None = None):
        """The config of a preset (default: the spec's default preset)."""
        return self._stamped(build_preset(self.Config, self.presets, preset or self.default_preset))

    def parse_config(self, argv: list[str], prog: str, other_flags: tuple = ()):
        """`[PRESET] [--flags]` -> config (help and one-line errors from the config parser; `other_flags`, a
        tool's own flag names, are suggested for a mistyped flag too)."""
        cfg = parse_config(self.Config, self.presets, list(argv), prog, self.default_preset, tuple(other_flags))
        if cfg.project not in ("", self.name):
            raise UserError(f"--project is set by the project folder ({self.name}); remove --project {cfg.project}")
        return self._stamped(cfg)

    def config_from_dict(self, values: dict):
        """A config from saved values (a run's or bundle's config.json); fields this project lacks are ignored."""
        known = {k: v for k, v in values.items() if k in self.Config.__dataclass_fields__}
        return self._stamped(apply_overrides(self.Config(), known))

    def load_run_config(self, path: str):
        """A run's saved config.json; refuses a run that another project trained."""
        data = read_config_json(path)
        project = data.get("project")
        if project and project != self.name:  # before the fields: another project's config has others
            raise UserError(
                f"{path} is a run of project '{project}', not '{self.name}': evaluate it with "
                f"languini/projects/{project}/eval.py (each project scores runs with its own model code)"
            )
        return self._stamped(load_config_json(self.Config, path, data=data))


def spec_problems(spec: ProjectSpec) -> list[str]:
    """The contract rules a spec breaks, in words (empty when it is valid)."""
    problems = []
    if not (isinstance(spec.Config, type) and issubclass(spec.Config, TrainConfig)):
        problems.append("Config must be a dataclass that subclasses languini.train_lib.train_config.TrainConfig")
    if not isinstance(spec.presets, dict) or "nano" not in spec.presets:
        problems.append("presets must be a dict with a CPU-sized 'nano' preset")
    elif spec.default_preset not in spec.presets:
        problems.append(f"default_preset '{spec.default_preset}' is not one of the presets")
    if not (isinstance(spec.Model, type) and issubclass(spec.Model, torch.nn.Module)):
        problems.append("Model must be an nn.Module subclass")
    elif not callable(getattr(spec.Model, "get_init_state", None)):
        problems.append("Model must define get_init_state(batch_size, device)")
    if spec.eval_protocol not in EVAL_PROTOCOLS:
        problems.append(f"eval_protocol must be one of {', '.join(EVAL_PROTOCOLS)}, got '{spec.eval_protocol}'")
    return problems
