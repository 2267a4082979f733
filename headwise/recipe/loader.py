"""Load a recipe: YAML file(s) -> `base:` inheritance -> command-line overrides -> validated `Recipe`.

- `base:` names another recipe (a path relative to the file, or a shipped recipe such as
  `base/smollm2`). Mappings merge deeply; lists and scalars replace. Chains are followed and cycles
  are errors.
- Overrides are `dotted.key=value` (the value is parsed as YAML, so `training.max_steps=20` is an
  int and `peft.target_modules=[q_proj,v_proj]` a list); `~dotted.key` removes a key.
- Every problem is reported at once, as `field (set in FILE): what is wrong. The fix.`, with a
  did-you-mean for unknown keys, before any model is loaded. A problem an override caused says
  `set on the command line by `key=value``, naming the override.
- Files and override values are read by `RecipeYamlLoader`: YAML 1.1 as PyYAML reads it, except that
  floats follow YAML 1.2 (`2e-4` is the float 0.0002, not a string) and a key given twice in one
  mapping is an error naming both lines (plain YAML silently keeps the last one). Numbers and
  booleans are then validated strictly (`headwise.patches.base.Section`), so `max_steps: true` or
  `bf16: "yes"` are errors rather than 1 and true.
"""

from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel, ValidationError

from headwise.errors import HeadwiseError
from headwise.patches.base import section_models
from headwise.recipe.schema import Recipe

RECIPE_FILENAME = "recipe.yaml"
# The first line of every resolved recipe headwise writes beside a run: how a run folder is told apart
# from a folder that merely holds a user's own recipe.yaml.
RESOLVED_HEADER = "# Resolved headwise recipe"


class RecipeError(HeadwiseError):
    """A recipe cannot be used. The message lists every problem with the field, the file and the fix."""


@dataclass
class LoadedRecipe:
    recipe: Recipe
    merged: dict[str, Any]  # the merged mapping before validation (what the user wrote, resolved)
    sources: list[str] = field(default_factory=list)  # files of the `base:` chain, root first

    def resolved_yaml(self) -> str:
        """The validated recipe with every default filled in, as YAML (saved beside each run)."""
        header = f"{RESOLVED_HEADER} (base chain: " + " -> ".join(self.sources) + ")\n"
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
    folder = next((c for c in candidates if c.is_dir()), None)
    if folder is not None:
        inside = sorted(p.name for p in folder.glob("*.yaml"))
        fix = f"recipes in it: {', '.join(inside)}" if inside else "it holds no .yaml file"
        raise RecipeError(f"recipe {ref!r} is a directory ({folder}), not a recipe file; give a .yaml file ({fix})")
    names = list_shipped_recipes()
    hint = difflib.get_close_matches(ref.removesuffix(".yaml"), names, n=1)
    fix = f"did you mean `{hint[0]}`?" if hint else f"shipped recipes: {', '.join(names)}"
    raise RecipeError(f"recipe {ref!r} not found (looked in {relative_to or Path.cwd()} and the shipped recipes); {fix}")


# --------------------------------------------------------------------------------------- YAML reading

_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"
# YAML 1.1's floats (PyYAML's resolver: a dot is required, `1_000.5`, `1:30.5`, `.inf`, `.nan`) plus
# YAML 1.2's, which need no dot and no exponent sign (`2e-4`, `1E5`, `-.5`). Plain integers stay ints.
_FLOAT_PATTERN = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class RecipeYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 floats: users write learning rates as `2e-4`, which YAML 1.1
    reads as the string "2e-4" (strict validation would then refuse it)."""


RecipeYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
RecipeYamlLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT_PATTERN, list("-+0123456789."))


def _refuse_duplicate_keys(node: yaml.Node, where: str, path: tuple[str, ...] = (), seen: set[int] | None = None) -> None:
    """A key given twice in one mapping is an error (YAML loaders silently keep the last value)."""
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias to a node already checked (or a recursive structure)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first_line: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG or not isinstance(key_node, yaml.ScalarNode):
                _refuse_duplicate_keys(value_node, where, path, seen)
                continue
            line = key_node.start_mark.line + 1
            key = (key_node.tag, key_node.value)
            dotted = ".".join(path + (key_node.value,))
            if key in first_line:
                lines = f"on line {line}" if first_line[key] == line else f"(lines {first_line[key]} and {line})"
                raise RecipeError(
                    f"{where}: line {line}: key `{dotted}` is given twice {lines}; "
                    "YAML would silently keep only the last value: delete one of them"
                )
            first_line[key] = line
            _refuse_duplicate_keys(value_node, where, path + (key_node.value,), seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(item, where, path + (str(i),), seen)


def load_recipe_yaml(text: str, where: str, key_path: tuple[str, ...] = ()) -> Any:
    """Parse recipe YAML (a file's text or an override's value) with `RecipeYamlLoader`, refusing
    duplicate keys. `where` names the text in errors, `key_path` is where the value goes in the
    recipe (for an override's value). Raises yaml.YAMLError for bad syntax."""
    loader = RecipeYamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(node, where, key_path)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """A recipe file's mapping, read strictly (UTF-8, duplicate keys refused, YAML 1.2 floats); every
    problem is one RecipeError naming the file and the place."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"{path}: cannot be read ({e.strerror or e}); check the path and its permissions") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line, column = raw.count(b"\n", 0, e.start) + 1, e.start - raw.rfind(b"\n", 0, e.start)
        raise RecipeError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte position {e.start}, line {line}, column "
            f"{column}); a recipe is a YAML text file: save it as UTF-8, or check that this is the recipe you meant"
        ) from None
    try:
        data = load_recipe_yaml(text, str(path))
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, other control characters)
        line, column = text.count("\n", 0, e.position) + 1, e.position - text.rfind("\n", 0, e.position)
        raise RecipeError(
            f"{path}: character #x{e.character:04x} at line {line}, column {column} is not allowed in YAML; "
            "a recipe is a YAML text file: check that this is the recipe you meant"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the syntax there") from None
    if data is None:
        raise RecipeError(
            f"{path} is empty (no YAML content); a recipe needs at least `model: {{name: ...}}` "
            "(see `headwise recipe show quickstart`)"
        )
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


@dataclass(frozen=True)
class Source:
    """Where a recipe value came from: a file, or a command-line override (`key=value` or `~key`)."""

    file: str | None = None
    override: str | None = None  # the override as typed

    @property
    def on_command_line(self) -> bool:
        return self.override is not None

    def phrase(self) -> str:
        """`set in FILE`, `set on the command line by `k=v``, `removed on the command line by `~k``."""
        if self.override is None:
            return f"set in {self.file}"
        verb = "removed" if self.override.startswith("~") else "set"
        return f"{verb} on the command line by `{self.override}`"


# Dotted key path (a tuple of keys) -> where its value came from.
Provenance = dict[tuple, Source]


def _record_sources(data: Any, source: Source, prefix: tuple, into: Provenance) -> None:
    into[prefix] = source
    if isinstance(data, dict):
        for k, v in data.items():
            _record_sources(v, source, prefix + (k,), into)


def file_provenance(data: dict[str, Any], file: str) -> Provenance:
    """Every key of `data` attributed to `file` (for a mapping read from one file, e.g. a run's
    saved recipe.yaml, before `apply_overrides` records the overrides on top)."""
    provenance: Provenance = {}
    _record_sources(data, Source(file=file), (), provenance)
    return provenance


def _load_chain(path: Path, seen: list[Path], provenance: Provenance) -> dict[str, Any]:
    if path in seen:
        cycle = " -> ".join(str(p) for p in seen + [path])
        raise RecipeError(f"`base:` chain loops: {cycle}; remove one of the `base:` keys")
    seen.append(path)
    data = read_yaml_mapping(path)
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
    _record_sources(data, Source(file=str(path)), (), provenance)
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
        value = load_recipe_yaml(raw, f"override {text!r}", tuple(key.split("."))) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value, False


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], provenance: Provenance) -> dict[str, Any]:
    """`data` with the overrides applied in order; `provenance` records each override where it acts
    (a `~` removal too, so an error it causes, such as a missing required key, names it)."""
    out = copy.deepcopy(data)
    for text in overrides:
        path, value, remove = parse_override(text)
        key = tuple(path)
        node = out
        for part in path[:-1]:
            if not isinstance(node.get(part), dict):
                if remove:
                    break
                node[part] = {}
            node = node[part]
        else:
            if remove and path[-1] not in node:
                continue  # nothing to remove
            for stale in [k for k in provenance if k[: len(key)] == key]:  # what the file set there is gone
                del provenance[stale]
            if remove:
                node.pop(path[-1])
                provenance[key] = Source(override=text)
            else:
                node[path[-1]] = value
                _record_sources(value, Source(override=text), key, provenance)
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


def _source_of(loc: Sequence[Any], provenance: Provenance) -> Source | None:
    for n in range(len(loc), -1, -1):
        if tuple(loc[:n]) in provenance:
            return provenance[tuple(loc[:n])]
    return None


def _override_key(override: str) -> str:
    return override.removeprefix("~").split("=", 1)[0]


def _related_overrides(loc: Sequence[Any], provenance: Provenance, message: str) -> list[str]:
    """The overrides that can have caused an error at `loc`: those that set or removed something
    inside it, and those that switched the member of a discriminated section holding it. For a rule
    across sections (`loc` empty), the overrides of the fields its message names, if it names any."""
    loc = tuple(loc)
    found: list[str] = []
    for key, source in provenance.items():
        if not source.on_command_line:
            continue
        inside = key[: len(loc)] == loc
        switched_tag = any(
            key == section + (tag,) and loc[: len(section)] == section for section, tag in DISCRIMINATED_SECTIONS.items()
        )
        if inside or switched_tag:
            found.append(source.override)
    found = list(dict.fromkeys(found))
    if not loc:
        named = [o for o in found if re.search(rf"(?<![\w.]){re.escape(_override_key(o))}(?!\w)", message)]
        found = named or found
    return found


def _where(loc: Sequence[Any], provenance: Provenance, message: str) -> str:
    """`set in FILE`, or the override that set (or removed) the value, or the file plus the overrides
    that changed the section an error is about."""
    own = _source_of(loc, provenance)
    if own is not None and own.on_command_line:
        return own.phrase()
    where = own.phrase() if own is not None else "default value"
    related = _related_overrides(loc, provenance, message)
    if related:
        where += "; changed on the command line by " + ", ".join(f"`{o}`" for o in related)
    return where


def _type_fix(kind: str, value: Any) -> str:
    """How to write a value of the right type (values are validated strictly: no `true` for 1, no
    `"yes"` for true)."""
    if kind in ("int_type", "int_parsing", "int_from_float", "float_type", "float_parsing"):
        whole = kind.startswith("int")
        number = "a whole number" if whole else "a number (e.g. 0.5 or 2e-4)"
        if isinstance(value, bool):
            return f"write {number}: true/false is not a number"
        if isinstance(value, str):
            return f"write {number} without quotes"
        return f"write {number}"
    if kind in ("bool_type", "bool_parsing"):
        return "write true or false" + (" without quotes" if isinstance(value, str) else "")
    if kind == "string_type" and isinstance(value, (bool, int, float)):
        return "put the value in quotes to make it text"
    if kind == "literal_error" and isinstance(value, bool):
        return "YAML reads unquoted on/off/yes/no as true/false: put the value in quotes"
    return ""


def _describe(err: dict[str, Any], data: dict[str, Any], provenance: Provenance) -> str:
    loc = _clean_loc(err["loc"], data)
    dotted = ".".join(str(p) for p in loc) or "(recipe)"
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    where = _where(loc, provenance, msg)
    if kind == "extra_forbidden":
        _, allowed = _model_at([p for p in loc[:-1] if isinstance(p, str)], data)
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.5)
        fix = f"did you mean `{hint[0]}`?" if hint else f"allowed keys here: {', '.join(allowed)}"
        return f"{dotted} ({where}): unknown key; {fix}"
    if kind == "missing":
        own = _source_of(loc, provenance)
        cause = f" ({own.phrase()})" if own is not None and own.on_command_line else ""
        return f"{dotted}{cause}: required but missing; add it to the recipe (see `headwise recipe fields`)"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        known = [t.strip(" '") for t in str(ctx.get("expected_tags", "")).split(",") if t.strip()]
        hint = difflib.get_close_matches(str(ctx.get("tag")), known, n=1, cutoff=0.5)
        fix = f"did you mean `{hint[0]}`? " if hint else ""
        return f"{dotted}.{ctx.get('discriminator', 'name').strip(chr(39))} ({where}): {ctx.get('tag')!r} is unknown; {fix}known: {', '.join(known)}"
    if "input" in err and kind not in ("value_error", "assertion_error") and not isinstance(err["input"], dict):
        fix = _type_fix(kind, err["input"])
        return f"{dotted} ({where}): {msg}, got {err['input']!r}" + (f"; {fix}" if fix else "")
    return f"{dotted} ({where}): {msg}"


def validate_mapping(data: dict[str, Any], provenance: Provenance | None = None, label: str = "recipe") -> Recipe:
    """Validate a merged recipe mapping; every problem in one RecipeError, each naming where its value
    was set (`provenance`; see `file_provenance` and `apply_overrides`)."""
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
    provenance: Provenance = {}
    seen: list[Path] = []
    merged = _load_chain(path, seen, provenance)
    merged = apply_overrides(merged, overrides, provenance)
    recipe = validate_mapping(merged, provenance, label=str(path))
    return LoadedRecipe(recipe=recipe, merged=merged, sources=[str(p) for p in reversed(seen)])
