"""Frozen dataclass configs loaded from YAML with strict validation.

Each command has one config dataclass whose field defaults are the defaults; ``configs/<command>.yaml`` is generated
from it by :func:`config_yaml` for people to read and copy (``covidctnet defaults NAME``). Loading checks unknown keys,
types and ranges and names the key in the error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import textwrap
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

from covidctnet.core.errors import ConfigError
from covidctnet.core.files import atomic_write_text

__all__ = ["load_config", "config_to_dict", "save_config", "validate_config", "coerce_value", "config_yaml"]

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce_value(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert YAML forms (lists to tuples, ints to floats).

    Raises:
        ConfigError: naming ``key`` and ``source`` when the value does not fit.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, not {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, not {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: '{key}' must be a list, not {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0], key, source) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must have {len(args)} items, not {len(value)} ({value!r})")
        return tuple(coerce_value(v, a, key, source) for v, a in zip(value, args))
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, not {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        # a nested settings group: a mapping of its keys (those left out keep their defaults)
        return value if isinstance(value, tp) else validate_config(tp, value, f"{source}: {key}")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be true or false, not {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: '{key}' must be an integer, not {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: '{key}' must be a number, not {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: '{key}' must be a string, not {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{source}: '{key}' must be {_type_name(tp)}, not {value!r}")
    return value


def validate_config(cls: type[T], raw: Mapping[str, Any], source: str = "config") -> T:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types.

    Ranges are checked by the dataclass's own ``__post_init__``, which should raise ``ConfigError``.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a mapping of keys to values, not {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: coerce_value(v, hints[k], k, source) for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError as err:
        # range checks in __post_init__ name the key but cannot know the file: add it here, once, for every config
        message = str(err)
        if message.startswith(f"{source}:"):
            raise
        raise ConfigError(f"{source}: {message}") from err
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from err


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> T:
    """Load a config: dataclass defaults, then ``defaults`` (a preset), the YAML at ``path``, then ``overrides``.

    Args:
        cls: the frozen config dataclass of the command.
        path: optional YAML file; its keys must be fields of ``cls``.
        overrides: values given on the command line; ``None`` values mean "not given" and are skipped.
        defaults: a named preset applied before the YAML (e.g. the official preprocessing profile).

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type or out-of-range value (the message names the key).
    """
    raw: dict[str, Any] = dict(defaults or {})
    source = "config"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{path}: cannot read config YAML: {str(err).splitlines()[0]}") from err
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, not {type(loaded).__name__}")
        raw.update(loaded)
    if overrides:
        raw.update({k: v for k, v in overrides.items() if v is not None})
        if path is None:
            source = "command line"
    return validate_config(cls, raw, source)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A YAML-friendly dict of a config dataclass (tuples become lists)."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write a config dataclass as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


_ROLE = re.compile(r":(\w+):`(~?)([\w.]+)`")


def _plain_text(text: str) -> str:
    """Docstring markup to plain text: ``x`` -> x, :class:`~a.B` -> B."""
    # :mod:`a.b` keeps its dotted name (a module is found by it); :class:`~a.B` and :func:`a.f` keep their last part
    text = _ROLE.sub(lambda m: m.group(3) if m.group(1) == "mod" else m.group(3).rsplit(".", 1)[-1], text)
    return " ".join(text.replace("``", "").split())


def _docstring_parts(cls: type) -> tuple[str, list[tuple[list[str], str]]]:
    """The summary of a config class's docstring and its ``Attributes:`` entries as ``([names], text)``."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    summary, _, rest = doc.partition("Attributes:")
    entries: list[tuple[list[str], str]] = []
    for line in rest.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^    (\w[\w, ]*):\s*(.*)$", line)
        if m and not line.startswith("     "):
            entries.append(([n.strip() for n in m.group(1).split(",")], m.group(2)))
        elif entries:
            entries[-1] = (entries[-1][0], entries[-1][1] + " " + line.strip())
    return summary, entries


def config_yaml(cls: type, preset: Mapping[str, Any] | None = None, title: str | None = None) -> str:
    """The defaults of a config dataclass as commented YAML: what ``configs/<command>.yaml`` holds.

    The text is generated, never typed: values come from the dataclass (after ``preset``, e.g. the official
    preprocessing profile), comments from its docstring's ``Attributes:`` section, the header from its summary.

    Args:
        cls: a frozen config dataclass whose docstring documents every field.
        preset: field values applied over the defaults (validated as a config file would be).
        title: first header line; default: the docstring summary.

    Raises:
        ConfigError: a field the docstring does not document, or an invalid preset.
    """
    values = config_to_dict(validate_config(cls, dict(preset or {}), f"{cls.__name__} preset"))
    summary, entries = _docstring_parts(cls)
    documented = {name: (names, text) for names, text in entries for name in names}
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in documented]
    if missing:
        raise ConfigError(f"{cls.__name__}: field(s) {missing} missing from the docstring's Attributes section")
    wrap = textwrap.TextWrapper(width=118, initial_indent="# ", subsequent_indent="#   ", break_on_hyphens=False,
                                break_long_words=False)
    # the file is the defaults: "(defaults = configs/x.yaml)" in the class summary says nothing inside it
    header = re.sub(r"\s*\(defaults = configs/[\w.]+\)", "", _plain_text(title or summary))
    lines = [f"# {line}" for line in textwrap.wrap(header, 118, break_on_hyphens=False, break_long_words=False)]
    lines += ["# Generated from the config dataclass (covidctnet defaults); a YAML passed with --config overrides "
              "keys.",
              ""]
    done: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.name in done:
            continue
        names, text = documented[f.name]
        comment = re.sub(r"\bNone\b", "null", _plain_text(text))  # the YAML spelling of None
        lines += wrap.wrap(f"{', '.join(names)}: {comment}")
        for name in names:
            dumped = yaml.safe_dump({name: values[name]}, default_flow_style=True, sort_keys=False, width=1000)
            lines.append(dumped.strip().removeprefix("{").removesuffix("}"))
            done.add(name)
    return "\n".join(lines) + "\n"
