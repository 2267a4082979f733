"""Load a recipe: YAML file(s) -> `base:` inheritance -> command-line overrides -> validated `Recipe`.

- `base:` names another recipe (a path relative to the file, or a shipped recipe such as
  `base/smollm2`). Mappings merge deeply; lists and scalars replace. Chains are followed and cycles
  are errors.
- Overrides are `dotted.key=value` (the value is parsed as YAML, so `training.max_steps=20` is an
  int and `peft.target_modules=[q_proj,v_proj]` a list); `~dotted.key` removes a key.
- Every problem is reported at once, as `field (set in FILE): what is wrong. The fix.`, with a
  did-you-mean for unknown keys, before any model is loaded.
"""

from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from headwise.errors import HeadwiseError
from headwise.recipe import Recipe
from headwise.schema_base import section_models

RECIPE_FILENAME = "recipe.yaml"


class RecipeError(HeadwiseError):
    """A recipe cannot be used. The message lists every problem with the field, the file and the fix."""


@dataclass
class LoadedRecipe:
    recipe: Recipe
    merged: dict[str, Any]  # the merged mapping before validation (what the user wrote, resolved)
    sources: list[str] = field(default_factory=list)  # files of the `base:` chain, root first

    def resolved_yaml(self) -> str:
        """The validated recipe with every default filled in, as YAML (saved beside each run)."""
        header = "# Resolved headwise recipe (base chain: " + " -> ".join(self.sources) + ")\n"
        return header + yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False)


def shipped_recipes_dir() -> Path:
    return Path(str(resources.files("headwise.recipes")))


def list_shipped_recipes() -> list[str]:
    """Names of the recipes shipped with headwise (`quickstart`, `base/smollm2`, ...)."""
    root = shipped_recipes_dir()
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def _find_recipe_file(ref: str, relative_to: Path | None) -> Path:
    candidates = []
    for base in ([relative_to] if relative_to else []) + [Path.cwd()]:
        candidates += [base / ref, base / f"{ref}.yaml"]
    candidates += [shipped_recipes_dir() / ref, shipped_recipes_dir() / f"{ref}.yaml"]
    for c in candidates:
        if c.is_file():
            return c.resolve()
    names = list_shipped_recipes()
    hint = difflib.get_close_matches(ref.removesuffix(".yaml"), names, n=1)
    fix = f"did you mean `{hint[0]}`?" if hint else f"shipped recipes: {', '.join(names)}"
    raise RecipeError(f"recipe {ref!r} not found (looked in {relative_to or Path.cwd()} and the shipped recipes); {fix}")


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax there") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model:, method:, ...), got a {type(data).__name__}")
    return data


# Sections that are discriminated unions: when a child names another member (another method,
# another KV policy), its block replaces the base's instead of merging into it, since the base's
# keys belong to a different schema.
DISCRIMINATED_SECTIONS: dict[tuple[str, ...], str] = {("method",): "name", ("export", "kv_policy"): "type"}


def deep_merge(base: dict[str, Any], over: dict[str, Any], _path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Mappings merge recursively; anything else (lists included) in `over` replaces `base`."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        path = _path + (k,)
        tag = DISCRIMINATED_SECTIONS.get(path)
        old = out.get(k)
        switched = tag is not None and isinstance(v, dict) and isinstance(old, dict) and tag in v and v[tag] != old.get(tag)
        if isinstance(v, dict) and isinstance(old, dict) and not switched:
            out[k] = deep_merge(old, v, path)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _record_sources(data: Any, source: str, prefix: tuple, into: dict[tuple, str]) -> None:
    into[prefix] = source
    if isinstance(data, dict):
        for k, v in data.items():
            _record_sources(v, source, prefix + (k,), into)


def _load_chain(path: Path, seen: list[Path], provenance: dict[tuple, str]) -> dict[str, Any]:
    if path in seen:
        cycle = " -> ".join(str(p) for p in seen + [path])
        raise RecipeError(f"`base:` chain loops: {cycle}; remove one of the `base:` keys")
    seen.append(path)
    data = _read_yaml_mapping(path)
    base_ref = data.pop("base", None)
    merged: dict[str, Any] = {}
    if base_ref is not None:
        if not isinstance(base_ref, str):
            raise RecipeError(f"{path}: base: must be one recipe path or name, got {base_ref!r}")
        try:
            base_path = _find_recipe_file(base_ref, path.parent)
        except RecipeError as e:
            raise RecipeError(f"{path}: base: {e}") from None
        merged = _load_chain(base_path, seen, provenance)
    _record_sources(data, str(path), (), provenance)
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any, bool]:
    """`a.b=1` -> (['a','b'], 1, False); `~a.b` -> (['a','b'], None, True)."""
    if text.startswith("~"):
        return text[1:].split("."), None, True
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not `key.sub=value` (or `~key.sub` to remove a key)")
    key, raw = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise RecipeError(f"override {text!r}: the key {key!r} is empty or has an empty part")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value, False


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], provenance: dict[tuple, str]) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for text in overrides:
        path, value, remove = parse_override(text)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                if remove:
                    break
                node[part] = {}
            node = node[part]
        else:
            if remove:
                node.pop(path[-1], None)
            else:
                node[path[-1]] = value
                _record_sources(value, "command line", tuple(path), provenance)
    return out


# ------------------------------------------------------------------------------- error reporting


def _model_at(loc: Sequence[Any], data: dict[str, Any]) -> tuple[type[BaseModel] | None, list[str]]:
    """The section model at `loc` (field names only) and the field names it allows; for a
    discriminated union, the member the data names."""
    model: type[BaseModel] | None = Recipe
    node: Any = data
    for part in loc:
        if model is None or part not in model.model_fields:
            return None, []
        node = node.get(part) if isinstance(node, dict) else None
        candidates = section_models(model.model_fields[part].annotation)
        if len(candidates) > 1:
            tag = DISCRIMINATED_SECTIONS.get(tuple(loc[: loc.index(part) + 1]), "name")
            chosen = [c for c in candidates if isinstance(node, dict) and c.model_fields.get(tag) and c.model_fields[tag].default == node.get(tag)]
            candidates = chosen or candidates
        model = candidates[0] if len(candidates) == 1 else None
        if model is None:
            return None, sorted({n for c in candidates for n in c.model_fields})
    return model, list(model.model_fields) if model else []


def _clean_loc(loc: Sequence[Any], data: dict[str, Any]) -> list[Any]:
    """Drop pydantic's union tags (`method.full.x` -> `method.x`) and keep real keys."""
    out: list[Any] = []
    node: Any = data
    for part in loc:
        if isinstance(node, dict) and part not in node and isinstance(part, str) and tuple(out) in DISCRIMINATED_SECTIONS:
            continue  # the discriminator tag pydantic inserts
        out.append(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out


def _source_of(loc: Sequence[Any], provenance: dict[tuple, str]) -> str:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in provenance:
            return provenance[tuple(loc[:n])]
    return "defaults"


def _describe(err: dict[str, Any], data: dict[str, Any], provenance: dict[tuple, str]) -> str:
    loc = _clean_loc(err["loc"], data)
    dotted = ".".join(str(p) for p in loc) or "(recipe)"
    where = _source_of(loc, provenance)
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "extra_forbidden":
        _, allowed = _model_at([p for p in loc[:-1] if isinstance(p, str)], data)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        fix = f"did you mean `{hint[0]}`?" if hint else f"allowed keys here: {', '.join(allowed)}"
        return f"{dotted} (set in {where}): unknown key; {fix}"
    if kind == "missing":
        return f"{dotted}: required but missing; add it to the recipe (see `headwise recipe fields`)"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        known = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]
        hint = difflib.get_close_matches(str(ctx.get("tag")), known, n=1, cutoff=0.5)
        fix = f"did you mean `{hint[0]}`? " if hint else ""
        return f"{dotted}.{ctx.get('discriminator', 'name').strip(chr(39))} (set in {where}): {ctx.get('tag')!r} is unknown; {fix}known: {', '.join(known)}"
    if "input" in err and kind not in ("value_error", "assertion_error") and not isinstance(err["input"], dict):
        return f"{dotted} (set in {where}): {msg}, got {err['input']!r}"
    return f"{dotted} (set in {where}): {msg}"


def validate_mapping(data: dict[str, Any], provenance: dict[tuple, str] | None = None, label: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err, data, provenance or {}) for err in e.errors()]
        body = "\n".join(f"  - {p}" for p in problems)
        n = len(problems)
        raise RecipeError(f"{label}: {n} problem{'s' if n > 1 else ''}\n{body}") from None


def load_recipe(ref: str | Path, overrides: Sequence[str] = ()) -> LoadedRecipe:
    """Resolve `ref` (a file, or a shipped recipe name), follow `base:`, apply overrides, validate."""
    path = _find_recipe_file(str(ref), None)
    provenance: dict[tuple, str] = {}
    seen: list[Path] = []
    merged = _load_chain(path, seen, provenance)
    merged = apply_overrides(merged, overrides, provenance)
    recipe = validate_mapping(merged, provenance, label=str(path))
    return LoadedRecipe(recipe=recipe, merged=merged, sources=[str(p) for p in reversed(seen)])
