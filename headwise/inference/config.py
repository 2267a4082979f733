"""`headwise_inference.json`: what an export needs at inference, versioned.

Every export folder holds one. It says which weights the folder holds (a PEFT adapter on a named
base model, merged weights, or none: the unchanged base model, as DuoAttention exports), which
attention the model runs at inference (`full`, or `moh`: Mixture-of-Head routing with the head split it
implies) and which KV-cache policy generation uses.
`headwise.load` reads it; `format_version` lets later releases read old exports.

The KV policy is a discriminated union on `type`; each policy is its own model so a new policy is a
new class plus an entry in `KVPolicy`:

    {"type": "full"}
    {"type": "streaming", "sink": 4, "recent": 1024}                      (or "recent_ratio": 0.2)
    {"type": "h2o", "heavy_ratio": 0.1, "recent_ratio": 0.1}              (or "heavy": 512, "recent": 512)
    {"type": "duo", "retrieval_heads": [[1, 0], ...], "sink": 128, "recent": 256}
    {"type": "duo", ..., "retrieval_policy": {"type": "h2o", ...}}        (H2O on Duo's retrieval heads)

Validation errors name the field (`kv_policy.heavy_ratio: ...`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from headwise.errors import HeadwiseError
from headwise.version import __version__
from headwise.weight_files import weights_problem

INFERENCE_CONFIG_NAME = "headwise_inference.json"
FORMAT_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FullPolicy(_Strict):
    """Keep every token of every head (plain transformers `DynamicCache`)."""

    type: Literal["full"] = "full"


class _PromptBudget(_Strict):
    """Budgets given either as token counts or as ratios of the prompt length (exactly one form).

    Ratios are resolved once, at the first forward (the prompt), as `max(1, int(ratio * T))` where
    `T` is the padded prompt length (the longest prompt of a batch), as in H2O's own code.
    """

    @staticmethod
    def _check_form(policy: Any, counts: tuple[str, ...], ratios: tuple[str, ...]) -> None:
        given_counts = [f for f in counts if getattr(policy, f) is not None]
        given_ratios = [f for f in ratios if getattr(policy, f) is not None]
        if given_counts and given_ratios:
            raise ValueError(
                f"give the budget either as token counts ({', '.join(counts)}) or as ratios of the prompt length "
                f"({', '.join(ratios)}), not both (got {', '.join(given_counts + given_ratios)})"
            )
        for form in (counts, ratios):
            given = [f for f in form if getattr(policy, f) is not None]
            if given and len(given) != len(form):
                missing = [f for f in form if f not in given]
                raise ValueError(f"{', '.join(missing)} is missing: {', '.join(given)} needs {', '.join(missing)} too")
        if not given_counts and not given_ratios:
            raise ValueError(f"set the budget: {', '.join(counts)} (tokens) or {', '.join(ratios)} (ratios of the prompt length)")


_Tokens = Annotated[int, Field(gt=0)]
_Ratio = Annotated[float, Field(gt=0, le=1)]


class StreamingPolicy(_PromptBudget):
    """StreamingLLM: every head keeps the first `sink` tokens plus the most recent ones.

    Keys stay post-RoPE at their absolute positions (no re-rotation), as in DuoAttention's
    streaming heads and kvpress's StreamingLLMPress. The recent window counts the current token.
    """

    type: Literal["streaming"] = "streaming"
    sink: int = Field(4, ge=0, description="Initial tokens (attention sinks) every head keeps; StreamingLLM uses 4.")
    recent: _Tokens | None = Field(None, description="Most recent tokens kept (token count).")
    recent_ratio: _Ratio | None = Field(None, description="Most recent tokens kept, as a ratio of the prompt length.")

    @model_validator(mode="after")
    def _one_form(self) -> "StreamingPolicy":
        self._check_form(self, ("recent",), ("recent_ratio",))
        return self


class H2OPolicy(_PromptBudget):
    """H2O (heavy-hitter oracle), with real eviction.

    Per layer and KV head: keep the `recent` most recent tokens plus the `heavy` tokens with the
    largest accumulated attention. The score of a key is the sum of the softmax probabilities it
    has received from every query so far (all prompt rows at prefill, then each generated token),
    summed over the query heads of its GQA group; it is not normalised by the number of queries.
    Eviction runs after the prompt and after every decode step; evicted tokens never come back.
    """

    type: Literal["h2o"] = "h2o"
    heavy: _Tokens | None = Field(None, description="Heavy-hitter tokens kept per KV head (token count).")
    recent: _Tokens | None = Field(None, description="Most recent tokens kept per KV head (token count).")
    heavy_ratio: _Ratio | None = Field(None, description="Heavy-hitter budget as a ratio of the prompt length (H2O: 0.1).")
    recent_ratio: _Ratio | None = Field(None, description="Recent-window budget as a ratio of the prompt length (H2O: 0.1).")

    @model_validator(mode="after")
    def _one_form(self) -> "H2OPolicy":
        self._check_form(self, ("heavy", "recent"), ("heavy_ratio", "recent_ratio"))
        return self


class DuoPolicy(_Strict):
    """DuoAttention: retrieval heads keep every token, streaming heads keep `sink` + `recent`.

    `retrieval_heads[layer][kv_head]` is 1 (retrieval) or 0 (streaming), one row per layer and one
    column per KV head, as DuoAttention's binarised gates. Streaming heads hold genuinely smaller
    tensors. Combination: with `retrieval_policy` set to an `h2o` policy, the retrieval heads run
    H2O eviction instead of keeping every token (H2O on Duo's retrieval heads).
    """

    type: Literal["duo"] = "duo"
    retrieval_heads: list[list[int]] = Field(
        description="Per layer, per KV head: 1 = retrieval head (keeps all tokens), 0 = streaming head (sink + recent)."
    )
    sink: int = Field(128, ge=0, description="Sink tokens of the streaming heads (DuoAttention: 128).")
    recent: _Tokens = Field(256, description="Recent tokens of the streaming heads (DuoAttention: 256).")
    retrieval_policy: H2OPolicy | None = Field(
        None, description="Optional policy for the retrieval heads: an `h2o` policy (default: keep every token)."
    )

    @field_validator("retrieval_heads")
    @classmethod
    def _rectangular_binary(cls, rows: list[list[int]]) -> list[list[int]]:
        if not rows or not rows[0]:
            raise ValueError("needs one row per layer with one 0/1 entry per KV head; got an empty mask")
        width = len(rows[0])
        for i, row in enumerate(rows):
            if len(row) != width:
                raise ValueError(f"row {i} has {len(row)} entries, row 0 has {width}: one entry per KV head in every layer")
            bad = [v for v in row if v not in (0, 1)]
            if bad:
                raise ValueError(f"row {i} holds {bad[0]!r}: entries are 1 (retrieval) or 0 (streaming)")
        return rows


KVPolicy = Annotated[Union[FullPolicy, StreamingPolicy, H2OPolicy, DuoPolicy], Field(discriminator="type")]
KV_POLICY_TYPES = ("full", "streaming", "h2o", "duo")


def _format_errors(e: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in e.errors():
        # pydantic puts the union tag after the union field (`kv_policy.h2o.heavy`); name what the user wrote
        raw = [str(x) for x in err["loc"]]
        loc = [x for i, x in enumerate(raw) if not (x in KV_POLICY_TYPES and (i == 0 or raw[i - 1] == "kv_policy"))
               and not (x in ATTENTION_NAMES and i > 0 and raw[i - 1] == "attention")]
        field = ".".join(([prefix] if prefix else []) + loc)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{field}: {msg}" if field else msg)
    return "; ".join(parts)


def parse_kv_policy(policy: Any, *, field: str = "kv_policy"):
    """Validate a KV policy given as a model, a dict, a JSON string or a shorthand.

    Shorthand: `TYPE` or `TYPE:key=value,key=value`, e.g. `h2o:heavy_ratio=0.1,recent_ratio=0.1`,
    `streaming:sink=4,recent=1024`. Errors are `HeadwiseError`s naming the field.
    """
    if policy is None:
        return FullPolicy()
    if isinstance(policy, BaseModel):
        return policy
    if isinstance(policy, str):
        text = policy.strip()
        if text.startswith(("{", "[")):
            try:
                policy = json.loads(text)
            except json.JSONDecodeError as e:
                raise HeadwiseError(f"{field}: not valid JSON ({e.msg} at column {e.colno}): {text}") from e
        else:
            kind, _, rest = text.partition(":")
            policy = {"type": kind.strip()}
            for item in filter(None, (p.strip() for p in rest.split(","))):
                key, eq, value = item.partition("=")
                if not eq or not key.strip():
                    raise HeadwiseError(f"{field}: {item!r} is not key=value (shorthand: TYPE:key=value,key=value)")
                if key.strip() in policy:
                    raise HeadwiseError(f"{field}: {key.strip()} is given twice ({text}); give each key once")
                try:
                    policy[key.strip()] = json.loads(value)
                except json.JSONDecodeError:
                    policy[key.strip()] = value.strip()
    if not isinstance(policy, dict):
        raise HeadwiseError(f"{field}: expected a mapping with a `type` ({', '.join(KV_POLICY_TYPES)}), got {type(policy).__name__}")
    if policy.get("type") not in KV_POLICY_TYPES:
        raise HeadwiseError(f"{field}.type: {policy.get('type')!r} is not a KV policy; use one of {', '.join(KV_POLICY_TYPES)}")
    try:
        return TypeAdapter(KVPolicy).validate_python(policy)
    except ValidationError as e:
        raise HeadwiseError(_format_errors(e, field)) from e


class FullAttention(_Strict):
    """Dense attention at inference (SDPA)."""

    name: Literal["full"] = "full"


class MoHHeads(_Strict):
    """The head split a MoH export's config implies for its model, stated so that `headwise.load` can check the
    model it loads is the one the export was made for. Units are query heads, or KV groups for `kv_group`."""

    query_heads: int = Field(gt=0, description="Query heads per layer.")
    kv_heads: int = Field(gt=0, description="KV heads per layer.")
    unit: Literal["head", "kv_group"] = Field(description="What is routed: a query head, or a whole KV group.")
    shared: int = Field(ge=0, description="Units always active (the first by index).")
    routed: int = Field(ge=0, description="Units the router chooses among.")
    active_routed: int = Field(ge=0, description="Routed units each token uses (top-k).")


class MoHAttention(_Strict):
    """Mixture-of-Head attention (`method: moh`): every head's SDPA output times the router's per-token gate.

    `router`, `activation` and `shared` are the run's `method:` block (its `balance_weight` only weighs a training
    loss); `heads` is the split they give on the exported model. The `learned` router's weights travel with the
    weights: in the adapter (PEFT's modules_to_save) or, for merged weights, in `moh_routers.safetensors`."""

    name: Literal["moh"] = "moh"
    router: Literal["query_norm", "learned", "kv_group"] = Field(
        description="`query_norm` or `kv_group` (parameter-free, by query norm), or `learned` (linear routers).")
    activation: float = Field(gt=0, le=1, description="Share of the query heads active per token.")
    shared: float = Field(ge=0, le=1, description="Share of the query heads always active.")
    heads: MoHHeads


AttentionSpec = Annotated[Union[FullAttention, MoHAttention], Field(discriminator="name")]
ATTENTION_NAMES = ("full", "moh")


class BaseModelRef(_Strict):
    name: str = Field(description="Hub id, local path or headwise alias of the base model.")
    gguf_file: str | None = None
    revision: str | None = None


class InferenceConfig(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    headwise_version: str
    method: str = Field(description="The training method that produced the export (`full`, `sinklora`, ...).")
    weights: Literal["adapter", "merged", "base"] = Field(
        description="`adapter`: a PEFT adapter on `base_model`; `merged`: full weights in the folder; `base`: no weights, "
        "the unchanged `base_model` (DuoAttention exports: only the KV policy is new)."
    )
    base_model: BaseModelRef
    rope_parameters: dict[str, Any] | None = Field(
        None, description="RoPE parameters the model was trained with (context extension); applied on load."
    )
    max_position_embeddings: int | None = None
    attention: AttentionSpec = Field(default_factory=FullAttention)
    kv_policy: KVPolicy = Field(default_factory=FullPolicy)
    extra_modules: dict[str, Any] = Field(
        default_factory=dict, description="Method modules to re-attach before loading an adapter (routers, gates)."
    )

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / INFERENCE_CONFIG_NAME
        path.write_text(json.dumps(self.model_dump(mode="json"), indent=2) + "\n")
        return path

    @classmethod
    def read(cls, directory: str | Path) -> "InferenceConfig":
        """Read and validate `directory/headwise_inference.json`; errors name the file, what is wrong and the fix."""
        path = Path(directory) / INFERENCE_CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} does not exist: {directory} is not a headwise export (run `headwise export RUN_DIR` first)"
            )
        raw = _read_json_object(path)
        _check_format_version(path, raw)
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise HeadwiseError(f"{path}: {_format_errors(e)}") from e


_REEXPORT = "re-export the run with `headwise export RUN_DIR --overwrite`"


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; an unreadable, empty, binary, truncated or non-object file is a `HeadwiseError`."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise HeadwiseError(f"{path} cannot be read ({e.strerror or e}); check its permissions") from None
    if not data.strip():
        raise HeadwiseError(f"{path} is empty (an interrupted export or a cleared file); {_REEXPORT}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HeadwiseError(f"{path} is binary, not JSON text (byte {e.start} is not UTF-8); {_REEXPORT}") from None
    if "\x00" in text:
        raise HeadwiseError(f"{path} is binary, not JSON text (it holds NUL bytes); {_REEXPORT}")
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        body = text.strip()
        # an export ends with its closing brace: an opened object or list cut short (or an error at the very end)
        # is a partial write, which names the fix better than the parser's message at the cut
        if e.pos >= len(text.rstrip()) or (body[:1] in "{[" and body[-1:] not in "}]"):
            lines = body.count("\n") + 1
            raise HeadwiseError(
                f"{path} is truncated: its JSON stops after line {lines}, unclosed; {_REEXPORT}") from None
        raise HeadwiseError(
            f"{path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); {_REEXPORT}") from None
    if not isinstance(raw, dict):
        kinds = {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
        kind = kinds.get(type(raw), "null")
        raise HeadwiseError(
            f"{path} holds {kind}, not a JSON object: an inference config is an object "
            f"({{\"format_version\": {FORMAT_VERSION}, \"weights\": ..., \"kv_policy\": ...}}); {_REEXPORT}"
        )
    return raw


def _check_format_version(path: Path, raw: dict[str, Any]) -> None:
    """Tell a file from a newer headwise (upgrade) from one without a usable version (re-export)."""
    if "format_version" not in raw:
        raise HeadwiseError(
            f"{path}: format_version is missing (every `headwise export` writes it, so this file was written by hand "
            f"or edited); {_REEXPORT}"
        )
    version = raw["format_version"]
    if type(version) is not int:  # noqa: E721 (bool is an int subclass, and `true == 1`)
        raise HeadwiseError(
            f"{path}: format_version {json.dumps(version)} is not a format version (a whole number; this headwise "
            f"reads {FORMAT_VERSION}); {_REEXPORT}"
        )
    if version > FORMAT_VERSION:
        raise HeadwiseError(
            f"{path}: format_version {version} is newer than this headwise ({__version__}) reads (up to "
            f"{FORMAT_VERSION}); the export was written by a later headwise: upgrade headwise "
            "(`pip install -U headwise`)"
        )
    if version != FORMAT_VERSION:
        raise HeadwiseError(
            f"{path}: format_version {version} is not one this headwise ({__version__}) knows (it reads "
            f"{FORMAT_VERSION}); {_REEXPORT}"
        )


def check_weight_files(folder: str | Path) -> None:
    """Check that every safetensors file of an export folder is whole (`headwise.weight_files`); a
    `HeadwiseError` names the file, what is wrong with it and the fix."""
    problem = weights_problem(folder)
    if problem:
        raise HeadwiseError(f"{os.path.join(folder, problem)}; {_REEXPORT}")


ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def adapter_problem(folder: str | Path, model_config: Any | None,
                    prepare_model: Callable[[Any], None] | None = None) -> str | None:
    """Why the PEFT adapter in `folder` cannot go onto a model of `model_config`, naming the file; None when it fits.

    One check for every place an adapter is used (export of a run's final weights or a checkpoint, `headwise.load`,
    `headwise push`), run before anything is copied, uploaded or loaded. `adapter_config.json` must be a UTF-8 JSON
    object that PEFT accepts and that builds its adapter on the model (a field of the wrong type, such as
    `"r": "eight"`, fails there); the adapter is built on a meta-device copy of the model (no weights, no memory),
    which gives the tensor names and shapes `adapter_model.safetensors` must hold. PEFT itself would load foreign
    tensors silently (leaving the bare base model) and wrong shapes with a long traceback. With `model_config` None
    (the base model's config is not at hand) only the config and the PEFT shape of the tensor names are checked.

    `prepare_model` is the method's patch of the model the adapter was trained on (it attaches modules the adapter
    saves, such as MoH's learned routers); left out, an export folder's own attention (`headwise_inference.json`)
    is applied, so `headwise.load` and `headwise push` check the adapter against the model it loads onto.
    """
    # heavy (torch, peft, transformers): this module is read by recipe validation, which needs none of them
    import torch
    from peft import PeftConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from safetensors import safe_open

    folder = Path(folder)
    config_file, weights_file = folder / ADAPTER_CONFIG_NAME, folder / ADAPTER_WEIGHTS_NAME
    try:
        raw = json.loads(config_file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        return f"{config_file} is missing"
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{config_file} is not UTF-8 JSON ({str(e).splitlines()[0]})"
    if not isinstance(raw, dict):
        return f"{config_file} holds a {type(raw).__name__}, not a JSON object (a PEFT adapter config)"
    try:
        peft_config = PeftConfig.from_pretrained(str(folder))
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        return f"{config_file} is not a PEFT adapter config PEFT accepts ({type(e).__name__}: {str(e).splitlines()[0]})"
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            saved = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except FileNotFoundError:
        return f"{weights_file} is missing"
    except Exception as e:  # safetensors raises several types (SafetensorError, OSError, ...) for a damaged file
        return f"{weights_file} is damaged or cut short ({str(e).splitlines()[0]})"
    foreign = sorted(n for n in saved if not n.startswith("base_model.model."))
    if prepare_model is None and (folder / INFERENCE_CONFIG_NAME).is_file():
        prepare_model = _export_attention_patch(folder)
    if model_config is not None:
        try:
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                meta = AutoModelForCausalLM.from_config(model_config)
                if prepare_model is not None:
                    prepare_model(meta)
                meta = get_peft_model(meta, peft_config)
        except (TypeError, ValueError, KeyError, AttributeError, RuntimeError) as e:
            return (f"{config_file} does not build an adapter on the base model ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else 'wrong field types'})")
        expected = {n: tuple(t.shape) for n, t in get_peft_model_state_dict(meta).items()}
        foreign = sorted(n for n in saved if n not in expected)
        wrong = [f"{n} {list(s)} (expected {list(expected[n])})" for n, s in saved.items()
                 if n in expected and s != expected[n]]
        if wrong:
            return (f"{weights_file} does not fit the base model: {len(wrong)} tensor(s) of the wrong shape, e.g. "
                    f"{wrong[0]}")
    if foreign or not saved:
        named = f"{len(foreign)} tensor(s) that are not this adapter's, e.g. {foreign[0]}" if foreign else "no tensors"
        return f"{weights_file} holds {named}: it is not the adapter of this model"
    return None


def _export_attention_patch(folder: Path) -> Callable[[Any], None] | None:
    """What `headwise.load` applies to the base model before an export's adapter (its attention, with the modules
    the adapter fills), or None for full attention or an inference config that cannot be read (its reader says
    why, before any adapter is checked)."""
    try:
        attention = InferenceConfig.read(folder).attention
    except (HeadwiseError, OSError):
        return None
    if attention.name == "full":
        return None
    from headwise.inference.method_attention import apply_attention  # heavy: torch and the method patches

    return lambda model: apply_attention(model, attention, folder / INFERENCE_CONFIG_NAME)
