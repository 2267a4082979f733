"""The recipe wing: the schema (`schema`: one pydantic section per YAML block, the `method:` block built
from the method registry), the loader (`loader`: `base:` inheritance, `key=value` overrides, errors that
name where a value was set) and the generated field reference (`reference`)."""

from headwise.recipe.loader import LoadedRecipe, RecipeError, load_recipe
from headwise.recipe.schema import Recipe

__all__ = ["LoadedRecipe", "Recipe", "RecipeError", "load_recipe"]
