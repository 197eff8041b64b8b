"""Config files for ``graphresize optimize --config FILE`` (TOML, JSON, or YAML with PyYAML).

Rules:

* a key is the name of an ``optimize`` flag (``seq_len`` or ``seq-len``, ``model``, ``output``,
  ``report``) or of a field of :class:`~graphresize.options.OptimizeOptions`; any other key
  is a usage error (exit 2) that names it;
* the keys may sit at the top level or in an ``[optimize]`` table;
* flags given on the command line win over the file, the file wins over the defaults;
* relative paths in the file are relative to the file's folder.

The flags and fields are read from the parser and the dataclass, so options added later are
accepted without changes here.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from graphresize.errors import InputError, UsageError

#: Destinations that are not options of a run: never read from a file, never reported.
META_DESTS = frozenset({"config", "debug", "argv", "command", "help", "version"})

_FILE_KINDS = {".toml": "toml", ".json": "json", ".yaml": "yaml", ".yml": "yaml"}


def read_file(path: Path) -> dict[str, Any]:
    """The mapping in a TOML, JSON or YAML file, keys with ``-`` spelt ``_``."""
    kind = _FILE_KINDS.get(path.suffix.lower())
    if kind is None:
        raise UsageError(f"{path}: config file must end in .toml, .json, .yaml or .yml")
    if not path.is_file():
        raise InputError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    try:
        data = _parse(text, kind)
    except UsageError:
        raise
    except Exception as exc:  # tomllib/json/yaml each raise their own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"{path}: not valid {kind.upper()} ({first[:200]})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a table of options at the top level")
    section = data.pop("optimize", None)
    if section is not None:
        if not isinstance(section, dict):
            raise UsageError(f"{path}: [optimize] must be a table of options")
        data.update(section)
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _parse(text: str, kind: str) -> Any:
    if kind == "json":
        return json.loads(text)
    if kind == "yaml":
        try:
            import yaml
        except ImportError:
            raise UsageError("reading a YAML config needs PyYAML (pip install pyyaml); or use TOML or JSON") from None
        return yaml.safe_load(text)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The sub-command parser ``name`` of the top-level ``parser``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise KeyError(name)


def given_dests(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: Sequence[str]) -> set[str]:
    """Destinations of ``sub`` that ``argv`` sets explicitly (parsed again with every default
    suppressed, so a flag given with its default value still counts as given)."""
    saved = [(a, a.default) for a in sub._actions]
    try:
        for action, _ in saved:
            action.default = argparse.SUPPRESS
        namespace = parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
    # an absent optional positional still stores its suppressed default (through its type)
    return {k for k, v in vars(namespace).items() if str(v) != argparse.SUPPRESS}


def option_types() -> dict[str, Any]:
    """OptimizeOptions field name -> resolved type hint."""
    from graphresize.options import OptimizeOptions

    hints = typing.get_type_hints(OptimizeOptions)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(OptimizeOptions)}


def _wrong(key: str, value: Any, expected: str) -> UsageError:
    return UsageError(f"config key {key!r}: expected {expected}, got {value!r}")


def _scalar(key: str, value: Any, kind: Any, base: Path) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            raise _wrong(key, value, "true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _wrong(key, value, "an integer")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _wrong(key, value, "a number")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise _wrong(key, value, "a string")
        return value
    if isinstance(kind, type) and issubclass(kind, Path):
        if not isinstance(value, str):
            raise _wrong(key, value, "a path string")
        path = Path(value).expanduser()
        return path if path.is_absolute() else base / path
    return value


def coerce_field(key: str, value: Any, hint: Any, base: Path) -> Any:
    """``value`` from a file as the type ``hint`` of an OptimizeOptions field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        errors = []
        for option in options:
            try:
                return coerce_field(key, value, option, base)
            except UsageError as exc:
                errors.append(exc)
        raise errors[0] if errors else _wrong(key, value, str(hint))
    if origin in (Mapping, dict, typing.Mapping):
        if not isinstance(value, dict):
            raise _wrong(key, value, "a table")
        args = typing.get_args(hint)
        inner = args[1] if len(args) == 2 else Any
        return {str(k): coerce_field(f"{key}.{k}", v, inner, base) for k, v in value.items()}
    if origin in (tuple, list, Sequence):
        if not isinstance(value, list):
            raise _wrong(key, value, "a list")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = args[0] if args else Any
        return tuple(coerce_field(key, v, inner, base) for v in value)
    return _scalar(key, value, hint, base)


def coerce_flag(key: str, value: Any, action: argparse.Action, base: Path) -> Any:
    """``value`` from a file as argparse would have stored flag ``action``."""
    if action.nargs == 0:  # store_true / store_false
        return _scalar(key, value, bool, base)
    if value is None:
        if action.default is not None:
            raise _wrong(key, value, "a value")
        return None
    kind = action.type or str
    if kind in (bool, int, float, str) or (isinstance(kind, type) and issubclass(kind, Path)):
        value = _scalar(key, value, kind, base)
    elif isinstance(value, str):
        try:
            value = kind(value)
        except (TypeError, ValueError) as exc:
            raise _wrong(key, value, getattr(kind, "__name__", "a value")) from exc
    if action.choices is not None and value not in action.choices:
        raise UsageError(f"config key {key!r}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return value


@dataclasses.dataclass
class Merge:
    """The outcome of merging a config file into parsed ``optimize`` arguments."""

    file: Path | None
    flags: dict[str, argparse.Action]
    values: dict[str, Any]
    sources: dict[str, str]
    field_values: dict[str, Any]

    def finish(self, options):
        """``options`` (built from the arguments by the CLI) completed for fields it left at
        their default: from the flag of the same name when its value fits the field's type
        (flags added without a line in the CLI), else from the file (tables merge key by key,
        the command line winning)."""
        hints = option_types()
        changes: dict[str, Any] = {}
        for field in dataclasses.fields(options):
            name, current = field.name, getattr(options, field.name)
            at_default = current == _default(field)
            if name in self.field_values:
                value = self.field_values[name]
                if isinstance(value, dict) and isinstance(current, Mapping):
                    changes[name] = {**value, **dict(current)}
                elif at_default:
                    changes[name] = value
            elif name in self.flags and at_default and self.values.get(name) is not None:
                try:
                    value = coerce_field(name, self.values[name], hints[name], Path("."))
                except UsageError:
                    continue
                if value != current:
                    changes[name] = value
        return dataclasses.replace(options, **changes) if changes else options

    def effective(self, options) -> dict[str, Any]:
        """Every option of the run as a config mapping (JSON types), and where each came from."""
        settings = {name: jsonable(self.values[name]) for name in sorted(self.flags)}
        for field in dataclasses.fields(options):
            if field.name not in self.flags:
                settings[field.name] = jsonable(getattr(options, field.name))
        return {
            "file": str(self.file) if self.file else None,
            "settings": settings,
            "sources": {k: self.sources.get(k, "default") for k in settings},
        }


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def jsonable(value: Any) -> Any:
    """``value`` with paths as strings and tuples as lists, for JSON."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [jsonable(v) for v in value]
    return value


def merge_optimize_args(args: argparse.Namespace, parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> Merge:
    """Fill ``args`` (parsed ``optimize`` arguments) from ``args.config`` where the command
    line did not set a flag (``argv`` None: nothing counts as given); return what
    :meth:`Merge.finish` needs for the remaining fields."""
    sub = subparser(parser, "optimize")
    flags = {a.dest: a for a in sub._actions if a.dest not in META_DESTS and a.dest != argparse.SUPPRESS}
    given = given_dests(parser, sub, argv) & set(flags) if argv is not None else set()
    sources = dict.fromkeys(given, "cli")
    field_values: dict[str, Any] = {}
    path = getattr(args, "config", None)
    if path is not None:
        data = read_file(Path(path))
        fields = option_types()
        base = Path(path).parent
        for key, value in data.items():
            if key in flags:
                value = coerce_flag(key, value, flags[key], base)  # checked even when the command line wins
                if key not in given:
                    setattr(args, key, value)
                    sources[key] = "config"
            elif key in fields and key not in META_DESTS:
                field_values[key] = coerce_field(key, value, fields[key], base)
                sources[key] = "config"
            else:
                raise UsageError(f"{path}: unknown key {key!r}{_suggest(key, [*flags, *fields])}")
    values = {dest: getattr(args, dest, None) for dest in flags}
    return Merge(Path(path) if path else None, flags, values, sources, field_values)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, sorted(set(known) - META_DESTS), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
