"""The `attention` entry of an export applied to a loaded model: `full` is the model's own; `moh` is the MoH patch.

`headwise.load` applies it to the model straight after `from_pretrained` and before any adapter: a `learned` MoH
export's routers are modules the model's class does not have, so they are attached first (at their zero
initialisation) and filled by PEFT from the adapter (they are in its modules_to_save) or, for merged weights, from
`moh_routers.safetensors`. A router that is not filled would run at zero and silently change the model, so a
missing or incomplete router file or adapter is an error.

It reads the entry as `headwise.inference.config` parsed it, without importing that module, which calls it back to
check an export's adapter against the model it loads onto.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from headwise.errors import HeadwiseError
from headwise.patches.moh import MoH, MoHMethod
from headwise.patches.moh.attention import ROUTER_MODULE
from headwise.patches.moh.method import PEFT_PREFIX, ROUTERS_FILE

REEXPORT = "re-export the run with `headwise export RUN_DIR --overwrite`"


def apply_attention(model: torch.nn.Module, attention: Any, config_file: str | Path) -> None:
    """Make `model` (a transformers model, not yet wrapped by PEFT) run an export's `attention` entry (a
    `headwise.inference.config` attention model); `config_file`, the export's headwise_inference.json, is named in
    errors."""
    if attention.name == "full":
        return
    if attention.name == "moh":
        _apply_moh(model, attention, f"{config_file}: attention")
        return
    raise HeadwiseError(f"{config_file}: attention {attention.name!r} is not one this headwise runs; upgrade headwise")


def _apply_moh(model: torch.nn.Module, attention: Any, where: str) -> None:
    try:
        method = MoH(MoHMethod(router=attention.router, activation=attention.activation, shared=attention.shared))
    except ValidationError as e:
        reason = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise HeadwiseError(f"{where}: {reason}; {REEXPORT}") from None
    try:
        implied = method.inference_attention(model_config=model.config)["heads"]
    except HeadwiseError as e:
        raise HeadwiseError(f"{where}: {e}; {REEXPORT}") from None
    stated = attention.heads.model_dump()
    if stated != implied:
        differ = ", ".join(f"{key} {stated[key]} (this model: {implied[key]})" for key in stated
                           if stated[key] != implied[key])
        raise HeadwiseError(f"{where}.heads does not fit {type(model).__name__} "
                            f"({model.config.model_type}): {differ}; the export was made for another model, or the "
                            f"file was edited: {REEXPORT}")
    method.prepare_model(model)


def router_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The learned MoH routers' parameters of `model` by module path (none for the other routers)."""
    return {name: p for name, p in model.named_parameters() if f".{ROUTER_MODULE}." in f".{name}"}


def load_merged_routers(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill the learned routers of a model loaded from a merged export with `moh_routers.safetensors`: every router
    tensor of the model, with its shape, and nothing else."""
    from safetensors.torch import load_file

    params = router_parameters(model)
    if not params:
        return
    path = Path(folder) / ROUTERS_FILE
    if not path.is_file():
        raise HeadwiseError(f"{path} is missing: it holds this merged moh export's learned routers (the merged weights "
                            f"cannot), without which they would gate at their zero initialisation; {REEXPORT}")
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise HeadwiseError(f"{path} is damaged ({str(e).splitlines()[0]}); {REEXPORT}") from None
    problem = _router_set_problem(set(params), {name: tuple(t.shape) for name, t in saved.items()},
                                  {name: tuple(p.shape) for name, p in params.items()})
    if problem:
        raise HeadwiseError(f"{path} {problem}; {REEXPORT}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(dtype=p.dtype, device=p.device))


def check_adapter_routers(model: torch.nn.Module, adapter_weights: str | Path) -> None:
    """An adapter export of a learned moh run must hold every router tensor of `model` in its weights file
    `adapter_weights` (PEFT would leave a missing one at its zero initialisation without a word)."""
    from safetensors import safe_open

    params = router_parameters(model)
    if not params:
        return
    path = Path(adapter_weights)
    with safe_open(str(path), framework="pt") as f:
        saved = {name.removeprefix(PEFT_PREFIX): tuple(f.get_slice(name).get_shape()) for name in f.keys()
                 if name.startswith(PEFT_PREFIX)}
    saved = {name: shape for name, shape in saved.items() if f".{ROUTER_MODULE}." in f".{name}"}
    problem = _router_set_problem(set(params), saved, {name: tuple(p.shape) for name, p in params.items()})
    if problem:
        raise HeadwiseError(f"{path} {problem}; {REEXPORT}")


def _router_set_problem(expected: set[str], saved: dict[str, tuple[int, ...]],
                        shapes: dict[str, tuple[int, ...]]) -> str | None:
    missing = sorted(expected - set(saved))
    if missing:
        return (f"lacks {len(missing)} of the model's {len(expected)} learned router tensors, e.g. {missing[0]} (they "
                "would gate at their zero initialisation)")
    foreign = sorted(set(saved) - expected)
    if foreign:
        return f"holds {len(foreign)} router tensor(s) this model has no place for, e.g. {foreign[0]}"
    wrong = [f"{name} {list(saved[name])} (expected {list(shapes[name])})" for name in sorted(expected)
             if saved[name] != shapes[name]]
    if wrong:
        return f"holds {len(wrong)} router tensor(s) of the wrong shape, e.g. {wrong[0]}"
    return None
