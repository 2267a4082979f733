"""`headwise push`: send an export folder to the Hugging Face Hub with huggingface_hub.

The folder is checked first (a valid `headwise_inference.json`, a model card, non-empty weights,
a tokenizer), so a push never uploads something `headwise.load` or `from_pretrained` cannot open.
The token comes from `HF_TOKEN` or the cached `hf auth login`, exactly as huggingface_hub resolves
it; headwise never prints, logs or writes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from headwise.errors import HeadwiseError
from headwise.inference_config import INFERENCE_CONFIG_NAME, InferenceConfig
from headwise.run_dir import RECIPE_FILE


class PushError(HeadwiseError):
    pass


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    files: list[str]


def resolve_export_folder(path: str | Path) -> Path:
    """Accept an export folder, or a run directory whose export (default `<run>/export`) exists."""
    p = Path(path)
    if (p / INFERENCE_CONFIG_NAME).is_file():
        return p
    if (p / RECIPE_FILE).is_file():
        from headwise.run_dir import read_run_recipe

        export = read_run_recipe(p).export_dir()
        if (export / INFERENCE_CONFIG_NAME).is_file():
            return export
        raise PushError(f"{p} is a run directory without an export; run `headwise export {p}` first")
    raise PushError(f"{p} is neither a headwise export folder (no {INFERENCE_CONFIG_NAME}) nor a run directory")


def check_export_folder(folder: Path) -> list[str]:
    """Validate what would be uploaded; returns the relative file list."""
    config = InferenceConfig.read(folder)  # raises with the field name when invalid
    needed = ["README.md"]
    needed += ["adapter_config.json", "adapter_model.safetensors"] if config.weights == "adapter" else ["config.json"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if config.weights == "merged" and not any(folder.glob("model*.safetensors")):
        missing.append("model.safetensors")
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json")):
        missing.append("tokenizer.json")
    if missing:
        raise PushError(f"{folder} is incomplete: missing {', '.join(missing)}; re-run `headwise export --overwrite`")
    for w in folder.glob("*.safetensors"):
        if w.stat().st_size <= 8:
            raise PushError(f"{w} is empty; re-run `headwise export --overwrite`")
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())


def plan_push(path: str | Path, repo_id: str | None, private: bool | None = None) -> PushPlan:
    folder = resolve_export_folder(path)
    files = check_export_folder(folder)
    if repo_id is None:
        recipe_file = folder / "headwise_recipe.yaml"
        if recipe_file.is_file():
            import yaml

            hub = (yaml.safe_load(recipe_file.read_text()) or {}).get("export", {}).get("hub", {})
            repo_id = hub.get("repo_id")
            private = hub.get("private", True) if private is None else private
    if not repo_id:
        raise PushError("no Hub repo given: pass --repo-id owner/name (or set export.hub.repo_id in the recipe)")
    from headwise.recipe import HubSection

    try:
        HubSection(repo_id=repo_id)  # shape check: `owner/name`
    except ValueError as e:
        raise PushError(f"--repo-id: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    return PushPlan(folder, repo_id, True if private is None else private, files)


def push(plan: PushPlan, *, token: str | None = None, commit_message: str = "Upload headwise export") -> str:
    """Create the repo (if needed) and upload the folder. Returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)  # token None: HF_TOKEN or the cached login
    try:
        api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=plan.repo_id, folder_path=str(plan.folder), commit_message=commit_message, repo_type="model"
        )
    except Exception as e:  # network, auth and Hub errors: one line, never the token
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if token:
            reason = reason.replace(token, "***")
        raise PushError(
            f"pushing {plan.folder} to {plan.repo_id} failed ({type(e).__name__}: {reason}); check the network, "
            "that HF_TOKEN (or `hf auth login`) has write access, and the repo id"
        ) from None
    return str(getattr(info, "commit_url", info))
