"""The recipe reference, rendered from the schema's help strings (`headwise recipe fields`).

The schema is the single source of truth: the field reference of docs/recipes.md is this output, and a
test checks the page is current.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from headwise.patches.base import section_models
from headwise.recipe.schema import Recipe


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
        sections = section_models(ann)
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


def update_reference_page(path: str = "docs/recipes.md") -> bool:
    """Rewrite the block between the recipe-reference markers of `path`; True when it changed."""
    p = Path(path)
    text = p.read_text()
    new = re.sub(
        r"(<!-- recipe-reference:start -->\n).*?(\n<!-- recipe-reference:end -->)",
        lambda m: m.group(1) + render_recipe_reference() + m.group(2),
        text,
        flags=re.S,
    )
    p.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m headwise.recipe.reference  (from the repository root)
    print("docs/recipes.md updated" if update_reference_page() else "docs/recipes.md already current")
