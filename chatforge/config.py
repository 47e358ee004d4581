"""Stage configuration: dataclasses, preset files (TOML) and command-line overrides.

A stage's config is a dataclass whose fields carry their help text in `metadata["help"]`; a nested
dataclass field (the model) is a TOML table in presets and is flattened on the command line, so
`--n-layer 4` overrides `[model] n_layer`. Precedence: dataclass defaults < preset < command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from chatforge.errors import UserError
from chatforge.files import atomic_write

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PRESET_DIR = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_preset(name_or_path: str, stage: str) -> dict:
    """The `[stage]` table of a preset: by name (`tiny`, `cpu`, `gpu-124m`) or a TOML file of one's own.

    A preset file describes one scale for every stage: `[pretrain]`, `[pretrain.model]`, `[sft]`, ...
    """
    path = Path(name_or_path)
    if not path.is_file():
        path = PRESET_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"preset {name_or_path!r} not found: give a TOML file or one of {', '.join(preset_names())}")
    try:
        tables = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    if stage not in tables:
        raise UserError(f"{path}: preset has no [{stage}] table (tables: {', '.join(tables) or 'none'})")
    return tables[stage]


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls, values: dict, where: str = "config"):
    """Build dataclass `cls` from a (nested) dict, naming any unknown or mistyped field."""
    types = _field_types(cls)
    fields_by_name = {f.name: f for f in dataclasses.fields(cls)}
    known = set(fields_by_name)
    unknown = set(values) - known
    if unknown:
        raise UserError(f"{where}: unknown field(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(known))})")
    kwargs = {}
    for name, value in values.items():
        tp = types[name]
        if _is_dataclass_type(tp):
            if not isinstance(value, dict):
                raise UserError(f"{where}: field {name!r} must be a table of {tp.__name__} fields")
            kwargs[name] = from_dict(tp, {**_table_defaults(fields_by_name[name], tp), **value}, f"{where} [{name}]")
        else:
            kwargs[name] = _coerce(value, tp, f"{where}: field {name!r}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def _optional(tp):
    """`X | None` -> X, for a field that may be left unset (a seed); other types as they are."""
    args = typing.get_args(tp)
    if type(None) in args and len(args) == 2:
        return next(a for a in args if a is not type(None))
    return tp


def _coerce(value, tp, where: str):
    if value is None and _optional(tp) is not tp:
        return None
    tp = _optional(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    origin = typing.get_origin(tp) or tp
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where} must be a list, got {value!r}")
        return list(value)
    if not isinstance(value, origin) or (origin is int and isinstance(value, bool)):
        raise UserError(f"{where} must be of type {getattr(tp, '__name__', tp)}, got {value!r}")
    return value


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _table_defaults(f: dataclasses.Field, tp) -> dict:
    """The values in which a table field's default differs from its class's defaults (a command may sample
    with other settings than `SamplingParams()`). Only those: fields derived from others in __post_init__
    (a model's head_dim from d_model) must be derived again from the values given."""
    default, plain = _field_default(f), tp()
    return {g.name: getattr(default, g.name) for g in dataclasses.fields(tp)
            if getattr(default, g.name) != getattr(plain, g.name)}


def _field_default(f: dataclasses.Field):
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]


def _flat_fields(cls, prefix: tuple[str, ...] = (), defaults=None):
    """(path, field, type, default) for every leaf field, nested dataclasses flattened; a nested field's
    default comes from its table's default (`defaults`, an instance of `cls`)."""
    types = _field_types(cls)
    for f in dataclasses.fields(cls):
        default = getattr(defaults, f.name) if defaults is not None else _field_default(f)
        if _is_dataclass_type(types[f.name]):
            yield from _flat_fields(types[f.name], (*prefix, f.name), default)
        else:
            yield (*prefix, f.name), f, types[f.name], default


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One `--option` per leaf field of `cls`; unset options stay absent so presets are not overwritten.
    A field's metadata may say `positional` (a positional argument; a list: one or more), `required` (an
    option that must be given), `metavar`, and `aliases` (other flags, such as `-k`)."""
    seen: dict[str, tuple] = {}
    for path, f, tp, default in _flat_fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if flag in seen:
            raise AssertionError(f"config fields {seen[flag]} and {path} share the flag {flag}")
        seen[flag] = path
        tp = _optional(tp)
        dest, is_list = "cfg:" + ".".join(path), typing.get_origin(tp) is list
        if f.metadata.get("positional"):
            parser.add_argument(dest, metavar=f.metadata.get("metavar", f.name.upper()), nargs="+" if is_list else None,
                                type=typing.get_args(tp)[0] if is_list else tp, help=f.metadata.get("help"))
            continue
        section = f" [{path[0]}]" if len(path) > 1 else ""
        required = bool(f.metadata.get("required"))
        help_text = f"{f.metadata.get('help', '')}{section}" + ("" if required else f" (default: {default!r})")
        kwargs = dict(dest=dest, default=argparse.SUPPRESS, help=help_text, required=required)
        metavar = f.metadata.get("metavar")
        flags = [flag, *f.metadata.get("aliases", [])]
        if tp is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            parser.add_argument(*flags, nargs="+" if required else "*", type=typing.get_args(tp)[0],
                                metavar=metavar or "X", **kwargs)
        else:
            parser.add_argument(*flags, type=tp, metavar=metavar or tp.__name__.upper(), **kwargs)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config options given on the command line, as a nested dict."""
    nested: dict = {}
    for key, value in vars(args).items():
        if not key.startswith("cfg:"):
            continue
        *parents, leaf = key[4:].split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def save_json(value, path: str | Path) -> None:
    """Write a dict (or a config dataclass) as JSON atomically and durably (`files.atomic_write`)."""
    atomic_write(path, json.dumps(to_dict(value) if dataclasses.is_dataclass(value) else value, indent=2) + "\n")


DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"


def require_positive(config, *names: str) -> None:
    """For a config's __post_init__: each named field must be at least 1."""
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(config, name)}")


def from_args(cls, args: argparse.Namespace, where: str):
    """A command's config from its parsed command line (defaults for what was not given)."""
    return from_dict(cls, overrides_from_args(args), where)
