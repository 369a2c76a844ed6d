"""Command-line flags from a dataclass: one helper for every `ilf` subcommand.

Each field of an arguments dataclass becomes one flag (``loop_start`` -> ``--loop-start``):

- the type comes from `typing.get_type_hints`: ``int``, ``float``, ``str``, their optional forms
  (``float | None``: the flag takes a float, absent means None) and ``list[str]`` / ``list[int]``
  (a repeatable flag);
- ``bool`` fields are switches: ``--name`` when the default is False, ``--no-name`` when it is True;
- the help text is the field's entry in the class docstring's ``Args:`` section, followed by the
  default;
- ``field(metadata={"choices": (...)})`` restricts the values, ``{"type": fn}`` parses them with
  ``fn`` (an argparse type, e.g. a positive int or a comma-separated list), ``{"positional": True}`` makes the
  field a positional argument, ``{"cli": False}`` keeps it off the command line;
- a field whose type is itself a dataclass (``TrainArgs.loop: ILFConfig``) contributes its own
  fields as flags, with the outer field's default instance giving their defaults.

`from_namespace` builds the dataclass back from the parsed flags. With ``unset_is_none=True`` every
flag defaults to None, so that a caller can layer what was given over a preset (`ilf train --preset`).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

__all__ = [
    "add_dataclass_arguments",
    "field_default",
    "field_help",
    "flag_name",
    "from_namespace",
    "unwrap_optional",
]


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_help(cls: type) -> dict[str, str]:
    """Field name -> help text, from the ``Args:`` sections of the class's docstring and its base
    classes' (Google style; ``a, b: text`` documents several fields at once)."""
    out: dict[str, str] = {}
    for c in reversed(cls.__mro__):
        out |= _args_section(c.__doc__ or "") if c.__dict__.get("__doc__") else {}
    return {k: v.replace("``", "").replace("`", "") for k, v in out.items()}  # no rst markup in --help


def _args_section(doc: str) -> dict[str, str]:
    if "Args:" not in doc:
        return {}
    lines = doc.split("Args:", 1)[1].splitlines()
    indent = None
    out: dict[str, str] = {}
    current: list[str] = []
    for ln in lines:
        if not ln.strip():
            continue
        lead = len(ln) - len(ln.lstrip())
        if indent is None:
            indent = lead
        if lead < indent:
            break
        head, sep, rest = ln.strip().partition(":")
        names = [n.strip() for n in head.split(",")]
        if lead == indent and sep and all(n.isidentifier() for n in names):
            current = names
            for n in names:
                out[n] = rest.strip()
        elif current:
            for n in current:
                out[n] += " " + ln.strip()
    return out


def unwrap_optional(t: Any) -> tuple[Any, bool]:
    """(base type, optional) of ``T`` or ``T | None``."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"unsupported union type {t}")
        return args[0], True
    return t, False


def field_default(f: dataclasses.Field) -> Any:
    """The default value of a dataclass field (called factory), or `dataclasses.MISSING`."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    unset_is_none: bool = False,
    exclude: tuple[str, ...] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """One flag per field of dataclass `cls` (see the module docstring); `defaults` overrides the
    fields' own defaults (a nested dataclass's, from the outer default instance)."""
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("cli", True):
            continue
        base, _ = unwrap_optional(hints[f.name])
        default = (defaults or {}).get(f.name, field_default(f))
        if dataclasses.is_dataclass(base):
            inner = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else {}
            add_dataclass_arguments(parser, base, unset_is_none=unset_is_none, defaults=inner)
            continue
        text = helps.get(f.name, "")
        kw: dict[str, Any] = {"help": text}
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, type=f.metadata.get("type", base), **kw)
            continue
        if base is bool:
            if default is True:
                parser.add_argument(
                    "--no-" + f.name.replace("_", "-"),
                    dest=f.name,
                    action="store_false",
                    help=f"do not {text}",
                )
            else:
                parser.add_argument(flag_name(f.name), action="store_true", help=text)
            parser.set_defaults(**{f.name: None if unset_is_none else bool(default)})
            continue
        if typing.get_origin(base) is list and "type" not in f.metadata:
            (item,) = typing.get_args(base)
            kw |= {"type": item, "action": "append", "help": f"{text} (repeatable)"}
            parser.add_argument(flag_name(f.name), default=None, **kw)
            continue
        if base not in (int, float, str) and "type" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {hints[f.name]} for a flag")
        shown = "" if default in (None, dataclasses.MISSING, "") else f" (default: {default})"
        kw["help"] = text + shown
        kw["type"] = f.metadata.get("type", base)
        if default is dataclasses.MISSING:
            kw["required"] = True
        parser.add_argument(flag_name(f.name), default=None if unset_is_none else _none(default), **kw)


def _none(v: Any) -> Any:
    return None if v is dataclasses.MISSING else v


def from_namespace(cls: type, ns: argparse.Namespace, base: dict[str, Any] | None = None) -> Any:
    """The dataclass `cls` from parsed flags: a flag left unset (None, or an empty repeatable list)
    takes `base`'s value (a preset), else the field's default."""
    base = dict(base or {})
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        inner, _ = unwrap_optional(hints[f.name])
        if dataclasses.is_dataclass(inner):  # its fields are flat flags (and flat preset keys)
            start = base.pop(f.name, None) or field_default(f)
            start = dataclasses.asdict(start) if dataclasses.is_dataclass(start) else dict(start or {})
            names = {g.name for g in dataclasses.fields(inner)}
            start |= {k: base.pop(k) for k in list(base) if k in names}
            values[f.name] = from_namespace(inner, ns, start)
            continue
        if f.name in base:
            values[f.name] = base.pop(f.name)
        v = getattr(ns, f.name, None)
        if v is not None:
            values[f.name] = v
    if base:
        raise ValueError(f"unknown {cls.__name__} fields {sorted(base)}")
    return cls(**values)
