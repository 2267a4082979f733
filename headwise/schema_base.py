"""The base class of every recipe section (kept apart so method modules can define their own
sections without importing the whole recipe schema)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors; values are validated on assignment too.

    Types are strict: a number field refuses `true` and `"10"`, a boolean field refuses `"yes"` and
    `1` (pydantic's default would silently read them as 1, 10 and true). An int is still accepted
    where a float is expected. Recipe files are read with YAML 1.2 floats
    (`headwise.recipe_loader.RecipeYamlLoader`), so `2e-4` arrives as a float, not a string.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)


def section_models(annotation) -> list[type[BaseModel]]:
    """The section classes an annotation can hold, through Optional, Union and Annotated."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return section_models(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return [m for a in typing.get_args(annotation) for m in section_models(a)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return []
