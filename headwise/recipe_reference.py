"""The recipe reference, rendered from the schema's help strings (`headwise recipe fields`).

The schema is the single source of truth: the README's recipe reference is this output, and a test
checks the README is current.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from headwise.recipe import Recipe


def _type_name(annotation: typing.Any) -> str:
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(annotation))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation) if a is not type(None))
    if origin is list:
        return f"list[{', '.join(_type_name(a) for a in typing.get_args(annotation))}]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    return getattr(annotation, "__name__", str(annotation))


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        inner = [a for a in (typing.get_args(typing.get_args(ann)[0]) if typing.get_origin(ann) is typing.Annotated else (ann,))]
        sections = [a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(sections) == 1 and not f.description:
            rows += _rows(sections[0], key + ".")
            continue
        if f.default is not PydanticUndefined and not isinstance(f.default, BaseModel):
            default = f"`{f.default!r}`" if f.default is not None else "—"
        elif f.default_factory is not None:
            default = "see below"
        else:
            default = "**required**"
        desc = (f.description or "").replace("|", "\\|")
        rows.append(f"| `{key}` | {_type_name(ann)} | {default} | {desc} |")
        if len(sections) == 1:
            rows += _rows(sections[0], key + ".")
        elif len(sections) > 1:
            for s in sections:
                tag = s.model_fields.get("name") or s.model_fields.get("type")
                rows += _rows(s, f"{key}[{tag.default if tag else s.__name__}].")
    return rows


def render_recipe_reference() -> str:
    header = "| key | type | default | what it does |\n|---|---|---|---|"
    return header + "\n" + "\n".join(_rows(Recipe, ""))
