"""The config reference (docs/config_reference.md), generated from the schema: every key with its type, bounds,
default and description, section by section; one table per method and per data source.

    diffalign configs --reference > docs/config_reference.md

A test regenerates the page and compares it with the committed one, so the reference cannot drift from the schema.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from diffalign.config.base import Section
from diffalign.config.methods import BETA_CONVENTION, METHOD_CONFIGS
from diffalign.config.schema import Config
from diffalign.config.sections import SOURCE_CONFIGS

HEADER = """# Config reference

Generated from the schema (`diffalign/config/`) by `diffalign configs --reference`; a test keeps this page equal to
the schema, so edit the field descriptions there, not here. Precedence: schema default < YAML < dotted override on the
command line (`diffalign train sdxl_dpo optim.lr=2e-5 method.beta=5000`). Unknown keys are refused with the nearest
valid name. `diffalign configs` lists the shipped recipes; `diffalign train CONFIG --dry-run` prints a resolved config.

The pairwise methods' {beta}.
"""


_BOUNDS = ((annotated_types.Ge, "ge", "≥"), (annotated_types.Gt, "gt", ">"), (annotated_types.Le, "le", "≤"), (annotated_types.Lt, "lt", "<"))


def _bounds(info: FieldInfo) -> str:
    """The field's numeric bounds, e.g. "≥ 0, < 0.5"."""
    return ", ".join(f"{sign} {getattr(meta, attr)}" for meta in info.metadata for kind, attr, sign in _BOUNDS if isinstance(meta, kind))


def type_name(annotation: Any) -> str:
    """A readable type: `"a" | "b"` for a Literal, `int | null` for an optional, `list[str]`, `dict[str, float]`."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(f'"{a}"' if isinstance(a, str) else str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is typing.Annotated:
        return type_name(args[0])
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def _default(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "—"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _table(model: type[Section], prefix: str, skip: tuple[str, ...] = ()) -> tuple[list[str], list[tuple[str, type[Section], str]]]:
    """The rows of `model`'s own keys, and its nested sections (dotted key, class, description) to render after it."""
    rows, nested = [], []
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        key = f"{prefix}.{name}"
        if _is_section(info.annotation):
            nested.append((key, info.annotation, info.description or ""))
            continue
        kind = type_name(info.annotation)
        bounds = _bounds(info)
        rows.append(f"| `{key}` | {_cell(kind)}{' (' + bounds + ')' if bounds else ''} | {_cell(_default(info))} | "
                    f"{_cell(info.description or '')} |")
    return rows, nested


def _section(model: type[Section], key: str, title: str, description: str, level: int = 2, skip: tuple[str, ...] = ()) -> list[str]:
    rows, nested = _table(model, key, skip)
    out = [f"{'#' * level} {title}", ""]
    if description:
        out += [_cell(description), ""]
    if rows:
        out += ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]
    for sub_key, sub_model, sub_description in nested:
        out += _section(sub_model, sub_key, f"`{sub_key}`", sub_description, level + 1)
    return out


def _variants(classes, tag: str, key: str, level: int) -> list[str]:
    out = []
    for cls in classes:
        info = cls.model_fields[tag]
        value = typing.get_args(info.annotation)[0]
        out += _section(cls, key, f"`{key}.{tag}: {value}`", info.description or "", level, skip=(tag,))
    return out


def config_reference() -> str:
    """The whole reference page, as markdown."""
    lines = [HEADER.format(beta=BETA_CONVENTION).rstrip(), ""]
    for name, info in Config.model_fields.items():
        description = info.description or ""
        if name == "method":
            lines += ["## `method`", "", _cell(description), "",
                      "Keys common to a group of methods are listed under each method that has them.", ""]
            lines += _variants(METHOD_CONFIGS.values(), "name", "method", 3)
        elif name == "data":
            data = info.annotation
            lines += _section(data, "data", "`data`", description, skip=("source",))
            lines += ["### `data.source`", "", _cell(data.model_fields["source"].description or ""), ""]
            lines += _variants(SOURCE_CONFIGS, "kind", "data.source", 4)
        else:
            lines += _section(info.annotation, name, f"`{name}`", description)
    return "\n".join(lines).rstrip() + "\n"

