"""The two-level config system.

Level 1: a preset name of the project (`mini`, `tiny`, ...). Level 2: every field of the project's config
dataclass becomes a typed `--field value` flag (booleans: `--flag` / `--no-flag`). Mistakes give one clear
line that lists what is valid and suggests close matches (`UserError`, exit code 2).
"""

import dataclasses
import json
import os
import typing

from languini.common_lib.atomic_io import atomic_write_json
from languini.common_lib.errors import UserError
from languini.common_lib.suggest import did_you_mean


def cfg_field(default, help="", choices=None):
    """A dataclass field with a help text and optional allowed values, shown by `--help`."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def _fields(cls_or_cfg) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls_or_cfg)}


def _field_type(cfg_cls, name):
    hints = typing.get_type_hints(cfg_cls)
    return hints[name]


def _convert(cfg_cls, name, raw):
    """Convert a raw (string or JSON) value to the type of field `name`, or raise UserError."""
    typ = _field_type(cfg_cls, name)
    choices = _fields(cfg_cls)[name].metadata.get("choices")
    try:
        if typ is bool:
            if isinstance(raw, bool):
                value = raw
            elif str(raw).lower() in ("1", "true", "yes", "on"):
                value = True
            elif str(raw).lower() in ("0", "false", "no", "off"):
                value = False
            else:
                raise ValueError
        elif typ is int:
            if isinstance(raw, float) and raw.is_integer():
                raw = int(raw)
            if isinstance(raw, bool) or (isinstance(raw, float)):
                raise ValueError
            value = int(raw) if not isinstance(raw, str) else int(raw.replace("_", ""))
        elif typ is float:
            if isinstance(raw, bool):
                raise ValueError
            value = float(raw.replace("_", "")) if isinstance(raw, str) else float(raw)
        elif typ is str:
            value = str(raw)
        else:  # pragma: no cover - configs only use the four scalar types
            raise TypeError(f"unsupported config field type {typ} for {name}")
    except ValueError:
        raise UserError(f"--{name} expects {typ.__name__}, got '{raw}'") from None
    if choices is not None and value not in choices:
        raise UserError(
            f"--{name} must be one of {', '.join(map(str, choices))}; got '{value}'{did_you_mean(value, choices)}"
        )
    return value


def build_preset(cfg_cls, presets: dict, name: str):
    """The config of preset `name`: the dataclass defaults with the preset's overrides applied."""
    if name not in presets:
        raise UserError(f"unknown preset '{name}'{did_you_mean(name, presets)}; valid: {', '.join(presets)}")
    cfg = apply_overrides(cfg_cls(), presets[name])
    return dataclasses.replace(cfg, preset=name) if "preset" in _fields(cfg) else cfg


def apply_overrides(cfg, overrides: dict):
    """Return a copy of `cfg` with typed `overrides` applied; unknown names raise UserError."""
    fields = _fields(cfg)
    converted = {}
    for name, raw in overrides.items():
        if name not in fields:
            raise UserError(f"unknown config field '{name}'{did_you_mean(name, fields)}")
        converted[name] = _convert(type(cfg), name, raw)
    return dataclasses.replace(cfg, **converted)


def parse_flags(cfg_cls, argv: list[str], other_flags: tuple = ()) -> dict:
    """Parse `--field value`, `--field=value`, `--flag`, `--no-flag` into a dict of raw values.

    `other_flags` are the calling tool's own flag names: an unknown flag may be a typo of one of them.
    """
    fields = _fields(cfg_cls)
    bools = {n for n in fields if _field_type(cfg_cls, n) is bool}
    valid = [f"--{n}" for n in (*fields, *other_flags)] + [f"--no-{n}" for n in sorted(bools)]
    out, i = {}, 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            previous = argv[i - 1][2:].replace("-", "_") if i > 0 else ""
            if previous in bools and tok.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise UserError(
                    f"booleans are switches: write --{previous} or --no-{previous} (not --{previous} {tok})"
                )
            raise UserError(f"unexpected argument '{tok}'; flags look like --field value (see --help)")
        key, eq, inline = tok[2:].partition("=")
        key = key.replace("-", "_")
        if key in bools:
            out[key] = inline if eq else True
            i += 1
        elif key.startswith("no_") and key[3:] in bools:
            if eq:
                raise UserError(f"--no-{key[3:]} takes no value: write --no-{key[3:]} or --{key[3:]}")
            out[key[3:]] = False
            i += 1
        elif key in fields:
            if eq:
                out[key] = inline
                i += 1
            else:
                if i + 1 >= len(argv):
                    raise UserError(f"--{key} needs a value ({_field_type(cfg_cls, key).__name__})")
                out[key] = argv[i + 1]
                i += 2
        else:
            raise UserError(f"unknown flag '--{key}'{did_you_mean('--' + key, valid)}; see --help for all flags")
    return out


def _typed(name: str, typ, raw: str):
    try:
        return typ(raw.replace("_", "")) if typ in (int, float) else typ(raw)
    except ValueError:
        raise UserError(f"--{name} expects {typ.__name__}, got '{raw}'") from None


def split_tool_flags(argv: list[str], tool_flags: dict) -> tuple[dict, list[str]]:
    """Take a tool's own flags ({name: (type, default, help)}) out of argv, before the config flags are
    parsed: (their typed values with defaults, the remaining argv)."""
    values = {name: default for name, (_, default, _) in tool_flags.items()}
    rest, i = [], 0
    while i < len(argv):
        key, eq, inline = argv[i][2:].partition("=") if argv[i].startswith("--") else ("", "", "")
        key = key.replace("-", "_")
        if key not in tool_flags:
            rest.append(argv[i])
            i += 1
            continue
        typ = tool_flags[key][0]
        if typ is bool:
            values[key] = True
            i += 1
        elif eq:
            values[key] = _typed(key, typ, inline)
            i += 1
        elif i + 1 < len(argv):
            values[key] = _typed(key, typ, argv[i + 1])
            i += 2
        else:
            raise UserError(f"--{key} needs a value ({typ.__name__})")
    return values, rest


def config_help(cfg_cls, presets: dict, prog: str, default_preset: str) -> str:
    """The --help text: the presets and every flag with its type, default and help."""
    lines = [
        f"usage: {prog} [PRESET] [--field value ...]",
        "",
        f"presets: {', '.join(presets)} (default: {default_preset})",
        "",
        "flags (defaults shown are the dataclass defaults; presets override some):",
    ]
    for f in dataclasses.fields(cfg_cls):
        typ = _field_type(cfg_cls, f.name)
        flag = f"--{f.name}" + ("/--no-" + f.name if typ is bool else f" {typ.__name__.upper()}")
        extra = f" [{'|'.join(map(str, f.metadata['choices']))}]" if f.metadata.get("choices") else ""
        lines.append(f"  {flag:<38} {f.metadata.get('help', '')}{extra} (default: {f.default!r})")
    return "\n".join(lines)


def parse_config(
    cfg_cls, presets: dict, argv: list[str], prog: str, default_preset: str = "mini", other_flags: tuple = ()
):
    """Level 1 + level 2: `[PRESET] [--flags]` -> config. Prints help and exits 0 on -h/--help.
    `other_flags`: the calling tool's own flag names, suggested for a mistyped flag.

    A config class may declare `FOLLOWS = {follower: leader}`: a leader given on the command line sets its
    follower too, unless the follower is given as well.
    """
    argv = list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(config_help(cfg_cls, presets, prog, default_preset))
        raise SystemExit(0)
    name = default_preset
    if argv and not argv[0].startswith("-"):
        name = argv.pop(0)
    cfg = build_preset(cfg_cls, presets, name)
    flags = parse_flags(cfg_cls, argv, other_flags)
    for follower, leader in getattr(cfg_cls, "FOLLOWS", {}).items():  # e.g. decay_steps follows max_train_steps
        if leader in flags and follower not in flags:
            flags[follower] = flags[leader]
    return apply_overrides(cfg, flags)


def config_flags(cfg, base, skip: tuple = ()) -> list[str]:
    """The flags that turn config `base` into `cfg` (fields in `skip` left out), ready to paste after the
    preset name."""
    flags = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in skip or value == getattr(base, f.name):
            continue
        if isinstance(value, bool):
            flags.append(f"--{f.name}" if value else f"--no-{f.name}")
        else:
            flags += [f"--{f.name}", str(value)]
    return flags


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path):
    """Write the resolved config as JSON (atomically)."""
    atomic_write_json(path, config_to_dict(cfg))


def read_config_json(path) -> dict:
    """The JSON object of a config file; a missing, unreadable or damaged file is one UserError line."""
    if not os.path.isfile(path):
        raise UserError(f"no config file at {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not a readable config ({type(e).__name__}); restore it") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a config (a JSON object)")
    return data


def load_config_json(cfg_cls, path, strict: bool = True, data: dict | None = None):
    """Read a config JSON written by `save_config` (or use its already read `data`). Unknown keys raise
    (strict) or are dropped."""
    data = read_config_json(path) if data is None else data
    fields = _fields(cfg_cls)
    unknown = sorted(set(data) - set(fields))
    if unknown and strict:
        raise UserError(f"{path} has fields this project does not know: {', '.join(unknown)}")
    return apply_overrides(cfg_cls(), {k: v for k, v in data.items() if k in fields})


def format_config(cfg) -> str:
    """One `name = value` line per field, for printing the resolved config."""
    d = config_to_dict(cfg)
    width = max(map(len, d))
    return "\n".join(f"  {k:<{width}} = {v!r}" for k, v in d.items())
