"""Typed configs, one dialect for every command: dataclass defaults -> YAML file -> command line.

A command describes its settings as one dataclass, or several (the fine-tuning stage uses its own
``ScriptArguments`` beside ``trl.SFTConfig`` and ``trl.ModelConfig``). ``parse_config`` builds them
in this order of precedence:

1. the dataclass defaults, then the command's own ``defaults`` (e.g. bf16 only on a GPU);
2. ``--config FILE`` (or the command's default file when ``--config`` is absent);
3. ``--key value`` or ``--key=value`` on the command line (a boolean may omit its value; a list
   takes several values or one YAML list such as ``'[a, b]'``; a mapping takes YAML such as
   ``'{docs: runs/x}'``).

Keys no dataclass has are errors naming the file (or the command line) and the closest valid
key. Values are converted to the annotated types; then each dataclass's ``validate()`` runs, so
invariants are checked before any work starts. ``--help`` lists every key with its help text.
``to_cli`` writes a mapping of settings back as the command-line flags this parser reads.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says where and how."""


def read_text_file(path: Path) -> str:
    """A UTF-8 text file a user wrote (config, template); not UTF-8 is a ConfigError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte {exc.start} cannot be decoded). Save the file as UTF-8 (or plain "
            "ASCII) and rerun; nothing was written.") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a ConfigError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass an existing YAML file (see configs/).")
    text = read_text_file(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(
            f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}. "
            "Fix the syntax (indentation, quotes, colons) and rerun; nothing was written."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must contain a YAML mapping of key: value pairs, found {type(data).__name__}.")
    return data


# ---------------------------------------------------------------------------------------------------- types

def _members(tp: Any) -> list[Any]:
    """The non-None members of a Union (or [tp])."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(tp) if a is not type(None)]
    return [tp]


def _is_list(tp: Any) -> bool:
    return any(typing.get_origin(m) in (list, tuple) or m in (list, tuple) for m in _members(tp))


def _is_bool(tp: Any) -> bool:
    return _members(tp) == [bool]


def _scalar(value: Any, tp: Any) -> Any:
    """Convert one value to a non-Union type; raises ValueError/TypeError."""
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in {"true", "1", "yes", "on"}:
            return True
        if text in {"false", "0", "no", "off"}:
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, (bool, list, dict)):
            raise ValueError(f"expected a number, got {value!r}")
        if tp is int and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ValueError(f"expected a string, got {type(value).__name__}")
        return str(value)
    if origin is Literal:
        for option in typing.get_args(tp):
            if value == option or str(value) == str(option):
                return option
        raise ValueError(f"expected one of {list(typing.get_args(tp))}, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {type(value).__name__}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [coerce(v, item_tp, "a list item") for v in value]
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping, got {type(value).__name__}")
        return dict(value)
    return value


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the annotated type ``tp``.

    For a Union, a value that already has one of its types is kept, a string is kept where the
    Union admits strings (the dataclass parses it, as transformers' arguments do), and otherwise
    each member is tried in order."""
    if value is None:
        return None
    members = _members(tp)
    optional = type(None) in typing.get_args(tp)
    if value == "" and optional and str not in members:  # an empty command-line value clears an optional setting
        return None
    try:
        if len(members) == 1:
            return _scalar(value, members[0])
        plain = [m for m in members if isinstance(m, type) and not issubclass(m, enum.Enum)]
        if any(isinstance(value, m) and not (m is int and isinstance(value, bool)) for m in plain):
            return value
        if isinstance(value, str) and str in members:
            return value
        for member in members:
            try:
                return _scalar(value, member)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"expected {tp}, got {value!r}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None


# ---------------------------------------------------------------------------------------------------- parsing

def _fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:  # a library dataclass with an unresolvable annotation: fall back to the raw types
        return {f.name: f.type for f in dataclasses.fields(cls)}


def known_keys(classes: tuple[type, ...]) -> list[str]:
    return sorted({f.name for cls in classes for f in _fields(cls)})


def unknown_keys_error(keys: list[str], where: str, classes: tuple[type, ...]) -> ConfigError:
    """``Unknown config key(s) 'x' (did you mean 'y'?) in <where>`` plus what to do."""
    known = known_keys(classes)
    named = []
    for key in keys:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        named.append(f"'{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    owners = ", ".join(c.__name__ for c in classes)
    return ConfigError(f"Unknown config key(s) {', '.join(named)} in {where}. Every key must be a field of {owners}; "
                       "fix the spelling or remove the key (--help lists every valid key).")


def _parser(classes: tuple[type, ...], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE", help="YAML file with any of the keys below")
    seen: set[str] = set()
    for cls in classes:
        hints = _hints(cls)
        group = parser.add_argument_group(cls.__name__)
        for f in _fields(cls):
            if f.name in seen:
                continue
            seen.add(f.name)
            tp = hints.get(f.name, f.type)
            kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                      "help": str(f.metadata.get("help", "")).replace("%", "%%")}
            if _is_bool(tp):
                kwargs.update(nargs="?", const="true", metavar="BOOL")
            elif _is_list(tp):
                kwargs.update(nargs="+", metavar="VALUE")
            else:
                kwargs["metavar"] = getattr(_members(tp)[0], "__name__", "VALUE").upper()
            flags = sorted({f"--{f.name}", f"--{f.name.replace('_', '-')}"})
            group.add_argument(*flags, **kwargs)
    return parser


def _from_cli(raw: Any, tp: Any) -> Any:
    """A command-line value as the parser collected it (a list for list-typed keys) -> value for coerce().

    One value stays a string, so that ``'[a, b]'`` is read as YAML, ``a,b`` is split at commas for a list
    setting, and a setting that also admits a string (``--report_to none``) receives it as given."""
    if not isinstance(raw, list):
        return raw
    if raw in (["none"], [""]) and str not in _members(tp):
        return []
    return raw[0] if len(raw) == 1 else raw


def parse_config(types_: type | tuple[type, ...], argv: list[str] | None = None, *, description: str = "",
                 default_config: str | Path | None = None, defaults: dict[str, Any] | None = None) -> Any:
    """Build the dataclass(es) from defaults -> YAML -> command line; one instance, or a tuple for a tuple."""
    classes = (types_,) if isinstance(types_, type) else tuple(types_)
    parser = _parser(classes, description)
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse printed the usage; --help exits 0 and should stay a success
        if exc.code in (0, None):
            raise
        raise ConfigError("Invalid command-line arguments; see the usage above.") from exc
    if rest:
        keys = [r[2:].split("=")[0] for r in rest if r.startswith("--")] or rest
        raise unknown_keys_error(keys, "the command line", classes)
    config_path = args.config or default_config
    data = load_yaml(config_path) if config_path else {}
    source = f"config file {config_path}" if config_path else "the defaults"
    unknown = sorted(set(data) - set(known_keys(classes)))
    if unknown:
        raise unknown_keys_error(unknown, str(config_path), classes)
    cli = {k: v for k, v in vars(args).items() if k != "config"}
    built = [_build(cls, {**(defaults or {}), **data}, cli, source) for cls in classes]
    return built[0] if isinstance(types_, type) else tuple(built)


def _build(cls: type, data: dict[str, Any], cli: dict[str, Any], source: str) -> Any:
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in _fields(cls):
        tp = hints.get(f.name, f.type)
        if f.name in cli:
            value = coerce(_from_cli(cli[f.name], tp), tp, f"command line: --{f.name}")
        elif f.name in data:
            value = coerce(data[f.name], tp, f"{source}: key '{f.name}'")
        else:
            continue
        choices = f.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"'{f.name}' must be one of {', '.join(map(str, choices))}, got {value!r} ({source} or "
                              "the command line).")
        values[f.name] = value
    try:
        cfg = cls(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"Invalid {cls.__name__} settings in {source} or its command-line overrides: {exc} Fix the "
                          "value named above and rerun; nothing was written.") from None
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def to_cli(settings: dict[str, Any]) -> list[str]:
    """``--key value`` pairs that ``parse_config`` reads back to the same values (lists and mappings as JSON)."""
    out: list[str] = []
    for key, value in settings.items():
        flag = f"--{key}"
        if isinstance(value, bool):
            out += [flag, "true" if value else "false"]
        elif isinstance(value, (list, dict)):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, "" if value is None else str(value)]
    return out


def config_hash(cfg: Any) -> str:
    """Stable short hash of a dataclass config (or mapping) for caching and manifests."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
