"""The configuration reference (docs/config-reference.md), generated from the schema.

Every key of a pipeline config, with its type, its default and the comment that explains
it in the source: the pydantic sections of pipelines/config.py and the dataclasses of
models/hparams.py that the deep stages' `model`, `training` and `augment` sections are.
A test checks that the committed file is current; regenerate it with

    python -m sparkloom.pipelines.config_reference > docs/config-reference.md
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from sparkloom.pipelines.config import Config, _fields, _section_class

_FIELD = re.compile(r"^\s+(\w+)\s*:")
_NOT_NOTES = ("fmt:", "type:", "noqa")


@functools.cache
def _notes(cls: type) -> dict[str, str]:
    """field -> its comment in the class body: the trailing one, else the lines above it."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    notes, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# "))
            continue
        m = _FIELD.match(line)
        if m and "(" not in line.split(":")[0]:
            code, _, tail = line.partition("  # ")
            said = [t for t in (*above, tail.strip()) if t and not t.startswith(_NOT_NOTES)]
            notes.setdefault(m[1], " ".join(said))
        above = []
    return notes


def _type(t: Any) -> str:
    origin, args = get_origin(t), get_args(t)
    if origin is Literal:
        return " \\| ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    if t is type(None):
        return "None"
    return getattr(t, "__name__", str(t)).replace("Ellipsis", "...")


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _limits(cls: type, name: str) -> list[str]:
    """A pydantic field's bounds (Field(ge=1) -> ">= 1"); a dataclass checks its own."""
    if dataclasses.is_dataclass(cls):
        return []
    said = []
    for m in cls.model_fields[name].metadata:
        said += [f"{op} {getattr(m, k)}" for k, op in _BOUNDS.items() if hasattr(m, k)]
    return [", ".join(said)] if said else []


def _value(v: Any) -> str:
    if v is PydanticUndefined or v is dataclasses.MISSING:
        return "required"
    if isinstance(v, tuple):
        v = list(v)
    return f"`{v!r}`".replace("|", "\\|")


def _defaults(cls: type, instance: Any) -> dict[str, Any]:
    """Each field's default: the given instance's value, else the class's."""
    if instance is not None:
        return {name: getattr(instance, name) for name in _fields(cls)}
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING
                else f.default for f in dataclasses.fields(cls)}  # fmt: skip
    return {name: f.get_default(call_default_factory=True) for name, f in cls.model_fields.items()}


def rows(cls: type = Config, prefix: str = "", instance: Any = None) -> list[tuple[str, ...]]:
    """(key, type, default, note) for every leaf key under `cls`, in declaration order."""
    out: list[tuple[str, ...]] = []
    notes, defaults = _notes(cls), _defaults(cls, instance)
    for name, annotation in _fields(cls).items():
        key, default = f"{prefix}{name}", defaults[name]
        child = _section_class(annotation)
        if child is not None and get_origin(annotation) is not dict:
            nested = default if isinstance(default, BaseModel) or dataclasses.is_dataclass(
                default) else None  # fmt: skip
            out += rows(child, key + ".", nested)
        else:
            kind = " ".join([_type(annotation), *_limits(cls, name)])
            out.append((key, kind, _value(default), notes.get(name, "")))
    return out


def reference() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from the schema by `python -m sparkloom.pipelines.config_reference`; do not",
        "edit by hand. How files, `extends:` and overrides combine: [configuration.md]"
        "(configuration.md).",
        "",
    ]
    section = None
    for key, kind, default, note in rows():
        top = key.split(".")[0]
        if top != section:
            section = top
            lines += [
                "",
                f"## `{top}`",
                "",
                "| key | type | default | |",
                "| --- | --- | --- | --- |",
            ]
        note = note.replace("|", "\\|")
        lines.append(f"| `{key}` | {kind} | {default} | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
