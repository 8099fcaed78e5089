"""Typed, validated configuration.

Every component has one dataclass. Fields declare what they allow with
:func:`option`; :func:`validate` checks a whole tree and raises
:class:`ConfigError` naming the dotted key, the value and what is allowed.
Overrides arrive as ``key=value`` strings (``--set moe.top_k=4``) whose values
are parsed as YAML, so ``true``, ``0.1`` and ``[aux_loss, z_loss]`` all work.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration key or value that is not allowed."""


def option(default: Any = dataclasses.MISSING, *, choices=None, min=None, max=None,
           min_exclusive=False, items=None, help: str = "", default_factory=dataclasses.MISSING):
    """A dataclass field that knows what values it allows."""
    meta = {"choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "items": items, "help": help}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def _allowed(meta: dict, type_name: str) -> str:
    if meta.get("choices"):
        return "one of " + ", ".join(map(str, meta["choices"]))
    if meta.get("items"):
        return f"a list whose items are each one of {', '.join(meta['items'])}"
    parts = [type_name]
    if meta.get("min") is not None:
        parts.append(f"{'>' if meta.get('min_exclusive') else '>='} {meta['min']}")
    if meta.get("max") is not None:
        parts.append(f"<= {meta['max']}")
    return " ".join(parts)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is dict:
        return f"a mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    return getattr(tp, "__name__", str(tp))


def _check_value(key: str, value: Any, tp: Any, meta: dict) -> Any:
    """Coerce ``value`` to type ``tp`` where lossless and check the field's bounds."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin is typing.Union and type(None) in args
    if optional:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    type_name = _type_name(tp)

    def fail(why: str = ""):
        msg = f"{key}={value!r} is not allowed: expected {_allowed(meta, type_name)}"
        raise ConfigError(msg + (f" ({why})" if why else ""))

    if tp is bool:
        if not isinstance(value, bool):
            fail()
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                fail()
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail()
        value = float(value)
        if not math.isfinite(value):
            fail("must be finite")
    elif tp is str:
        if not isinstance(value, str):
            fail()
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)):
            fail()
        value = [_check_value(f"{key}[{i}]", v, args[0], {}) for i, v in enumerate(value)]
        items = meta.get("items")
        if items:
            bad = [v for v in value if v not in items]
            if bad:
                fail(f"unknown item {bad[0]!r}")
            if len(set(value)) != len(value):
                fail("items must not repeat")
        return value
    elif origin is dict:
        if not isinstance(value, dict):
            fail()
        return {str(k): _check_value(f"{key}.{k}", v, args[1], {}) for k, v in value.items()}

    if meta.get("choices") and value not in meta["choices"]:
        fail()
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
        fail()
    if hi is not None and value > hi:
        fail()
    return value


def check_per_expert(cfg: Any, key: str, prefix: str, smallest: float, exclusive: bool,
                     what: str) -> None:
    """A list setting with one value per expert (``cfg.num_experts`` of them), each
    >= ``smallest`` (> when ``exclusive``); None means unset."""
    values = getattr(cfg, key)
    if values is None:
        return
    if len(values) != cfg.num_experts:
        raise ConfigError(f"{prefix}{key}={values} is not allowed: needs one {what} per expert, "
                          f"{prefix}num_experts={cfg.num_experts}, got {len(values)}")
    low = min(values)
    if low < smallest or (exclusive and low == smallest):
        raise ConfigError(f"{prefix}{key}={values} is not allowed: every {what} must be "
                          f"{'>' if exclusive else '>='} {smallest:g}")


def validate(cfg: Any, prefix: str = "") -> Any:
    """Check (and coerce in place) every field of a config tree; return it."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            validate(value, key + ".")
        else:
            setattr(cfg, f.name, _check_value(key, value, hints[f.name], dict(f.metadata)))
    check = getattr(cfg, "check", None)
    if check is not None:
        check(prefix)
    return cfg


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build a config of type ``cls`` from a nested mapping; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}'; allowed keys under "
                          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name} must be a mapping of settings, got {value!r}")
            kwargs[name] = from_dict(hints[name], value, f"{prefix}{name}.")
        else:
            kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` strings to a nested mapping (values parsed as YAML)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. moe.top_k=2")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {exc}") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {p!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, Any, str, str]]:
    """(key, default, allowed, help) for every leaf field, for `divmoe config`-style listings."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += describe(tp, f"{prefix}{f.name}.")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append((prefix + f.name, default, _allowed(dict(f.metadata), _type_name(tp)),
                    f.metadata.get("help", "")))
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


__all__ = ["ConfigError", "option", "validate", "from_dict", "to_dict", "apply_overrides",
           "describe", "dump_yaml", "dataclass"]
