"""Typed stage configs: dataclass defaults -> YAML file -> command-line overrides.

Every stage describes its settings as one dataclass. ``parse_config`` builds it in that
order of precedence, rejects keys the dataclass does not have (naming the key and the
file), coerces values to the annotated types and then calls the dataclass's
``validate()`` (if it has one) so invariants are checked before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration problem the user must fix; the message says where and how."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, turning every failure into a ConfigError that names the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist. Pass an existing YAML file (see configs/).")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
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


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to the annotated type ``tp``."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    try:
        if tp is Any:
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
            if isinstance(value, bool):
                raise ValueError(f"expected a number, got {value!r}")
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(f"expected an integer, got {value!r}")
            return tp(float(value)) if tp is int and isinstance(value, str) and "e" in value.lower() else tp(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return str(value)
        if origin in (list, tuple):
            if isinstance(value, str):
                value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"expected a list, got {type(value).__name__}")
            (item_tp, *_) = typing.get_args(tp) or (Any,)
            return [coerce(v, item_tp, where) for v in value]
        if origin is dict or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ValueError(f"expected a mapping, got {type(value).__name__}")
            return dict(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str) -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and coercing types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"Unknown config key(s) {', '.join(repr(k) for k in unknown)} in {source}. "
            f"Valid keys for {cls.__name__}: {', '.join(sorted(fields))}. Check the spelling or remove the key."
        )
    values = {k: coerce(v, hints[k], f"{source}: key '{k}'") for k, v in data.items()}
    return cls(**values)


def parse_config(cls: type[T], argv: list[str] | None = None, description: str = "") -> T:
    """Defaults -> ``--config FILE`` -> ``--key value`` overrides, then ``validate()``.

    Every dataclass field becomes a ``--field-name`` flag (underscores or dashes both work).
    """
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    parser.add_argument("--config", help="YAML file with any of the keys below")
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        flags = {f"--{f.name}", f"--{f.name.replace('_', '-')}"}
        helptext = f.metadata.get("help", "")
        parser.add_argument(*sorted(flags), dest=f.name, default=argparse.SUPPRESS, help=helptext,
                            metavar=getattr(_strip_optional(hints[f.name]), "__name__", "VALUE").upper())
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # argparse printed the usage; --help exits 0 and should stay a success
        if exc.code in (0, None):
            raise
        raise ConfigError("Invalid command-line arguments; see the usage above.") from exc
    if rest:
        raise ConfigError(
            f"Unknown command-line option(s): {' '.join(rest)}. Run with --help to list the valid options."
        )
    data: dict[str, Any] = load_yaml(args.config) if args.config else {}
    source = str(args.config) if args.config else "defaults"
    cfg = from_dict(cls, data, source)
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    for key, raw in overrides.items():
        setattr(cfg, key, coerce(raw, hints[key], f"command line: --{key}"))
    if hasattr(cfg, "validate"):
        cfg.validate()  # type: ignore[attr-defined]
    return cfg


def config_hash(cfg: Any) -> str:
    """Stable short hash of a dataclass config (or mapping) for caching and manifests."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    blob = json.dumps(data, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
