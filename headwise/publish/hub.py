"""`headwise push`: send an export folder to the Hugging Face Hub with huggingface_hub.

The folder is checked first (a valid `headwise_inference.json`, a model card, non-empty weights,
a tokenizer), so a push never uploads something `headwise.load` or `from_pretrained` cannot open.
The token comes from `HF_TOKEN` or the cached `hf auth login`, exactly as huggingface_hub resolves
it; headwise never prints, logs or writes it.

Every Hub call is bounded: huggingface_hub's shared HTTP client waits without end by default, so for the
push it waits at most `timeout_s` for each network operation (connect, send, each read), and a call that
timed out, lost its connection or got a 408/429/5xx answer is tried again, `retries` more times with
backoff (the retryable answers are those of huggingface_hub's own `http_backoff`). Both come from
`--timeout`/`--retries`, else `HEADWISE_HUB_TIMEOUT`/`HEADWISE_HUB_RETRIES`, else 60 s and 3. A failure
names the call, the endpoint, the tries and the time spent. Trying an upload again is safe: huggingface_hub
skips a commit whose files the repo already holds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from headwise.errors import HeadwiseError
from headwise.inference.config import (
    INFERENCE_CONFIG_NAME,
    InferenceConfig,
    adapter_problem,
    check_weight_files,
)
from headwise.models import resolve_model_source
from headwise.recipe.schema import HubSection
from headwise.train.run_dir import RECIPE_FILE, read_run_recipe

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "HEADWISE_HUB_TIMEOUT"
RETRIES_ENV = "HEADWISE_HUB_RETRIES"
DEFAULT_TIMEOUT_S = 60.0
DEFAULT_RETRIES = 3
# Accepted ranges: beyond an hour per operation or ten retries a push is better re-run later by hand.
MAX_TIMEOUT_S = 3600.0
MAX_RETRIES = 10
# Answers worth another try: huggingface_hub's own `http_backoff` retries on these.
RETRY_STATUS_CODES = (408, 429, 500, 502, 503, 504)
# Backoff before retry n is min(2 ** (n - 1), MAX_BACKOFF_S) seconds.
MAX_BACKOFF_S = 8.0

TIMEOUT_RANGE = f"give seconds, more than 0 and at most {MAX_TIMEOUT_S:g}"
RETRIES_RANGE = f"give a whole number from 0 to {MAX_RETRIES}"

_T = TypeVar("_T")


class PushError(HeadwiseError):
    pass


@dataclass(frozen=True)
class HubRetryPolicy:
    """How long one Hub network operation may wait (`timeout_s`) and how often a failed call is tried again."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    retries: int = DEFAULT_RETRIES

    def __post_init__(self) -> None:
        check_timeout("timeout", self.timeout_s)
        check_retries("retries", self.retries)

    @classmethod
    def resolve(cls, timeout_s: float | None = None, retries: int | None = None) -> "HubRetryPolicy":
        """The given values, else `HEADWISE_HUB_TIMEOUT` / `HEADWISE_HUB_RETRIES`, else the defaults."""
        if timeout_s is None:
            timeout_s = _from_env(TIMEOUT_ENV, float, check_timeout, DEFAULT_TIMEOUT_S)
        if retries is None:
            retries = _from_env(RETRIES_ENV, int, check_retries, DEFAULT_RETRIES)
        return cls(timeout_s, retries)


def check_timeout(name: str, seconds: float) -> float:
    """`seconds` if it is a usable per-operation timeout, else a `PushError` naming `name` and the range."""
    number = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
    if not (number and 0 < seconds <= MAX_TIMEOUT_S):  # NaN fails the comparison too
        raise PushError(f"{name} {seconds!r}: {TIMEOUT_RANGE}")
    return float(seconds)


def check_retries(name: str, retries: int) -> int:
    """`retries` if it is a usable retry count, else a `PushError` naming `name` and the range."""
    if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= MAX_RETRIES:
        raise PushError(f"{name} {retries!r}: {RETRIES_RANGE}")
    return retries


def _from_env(name: str, kind: type, check: Callable[[str, Any], Any], default: Any) -> Any:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = text
    return check(name, value)


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    private: bool
    files: list[str]


def resolve_export_folder(path: str | Path) -> Path:
    """Accept an export folder, or a run directory whose export (default `<run>/export`) exists."""
    p = Path(path)
    if not p.exists():
        raise PushError(f"{p} does not exist; give an export folder (with {INFERENCE_CONFIG_NAME}) or a run directory")
    if not p.is_dir():
        raise PushError(f"{p} is a file; give the export folder that holds {INFERENCE_CONFIG_NAME}, or a run directory")
    if (p / INFERENCE_CONFIG_NAME).is_file():
        return p
    if (p / RECIPE_FILE).is_file():
        export = read_run_recipe(p).export_dir(p)
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
    if config.weights == "merged" and config.attention.name == "moh" and config.attention.router == "learned":
        from headwise.patches.moh.method import ROUTERS_FILE  # the merged export's learned routers

        if not (folder / ROUTERS_FILE).is_file():
            missing.append(ROUTERS_FILE)
    if missing:
        raise PushError(f"{folder} is incomplete: missing {', '.join(missing)}; re-run `headwise export --overwrite`")
    try:
        check_weight_files(folder)
    except HeadwiseError as e:
        raise PushError(str(e)) from None
    if config.weights == "adapter":
        problem = adapter_problem(folder, _base_model_config(config))
        if problem:
            raise PushError(f"{problem}; re-export the run (`headwise export RUN_DIR --overwrite`) before pushing")
    return sorted(str(f.relative_to(folder)) for f in folder.rglob("*") if f.is_file())


def _base_model_config(config: InferenceConfig) -> Any | None:
    """The transformers config of an export's base model, or None when it is not at hand (a Hub model not in the
    local cache while offline): the adapter check then covers the adapter's own files only."""
    from transformers import AutoConfig

    base = config.base_model
    try:
        src = resolve_model_source(base.name, base.gguf_file, base.revision)
        kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
        if src.revision:
            kw["revision"] = src.revision
        return AutoConfig.from_pretrained(src.path, **kw)
    except (OSError, ValueError, HeadwiseError):
        return None


def plan_push(path: str | Path, repo_id: str | None, private: bool | None = None) -> PushPlan:
    folder = resolve_export_folder(path)
    files = check_export_folder(folder)
    repo_id_source = "--repo-id"
    if repo_id is None:
        repo_id_source = f"export.hub.repo_id in {folder / 'headwise_recipe.yaml'}"
        hub = _recipe_hub_section(folder / "headwise_recipe.yaml")
        repo_id = hub.get("repo_id")
        private = hub.get("private", True) if private is None else private
    if not repo_id:
        raise PushError("no Hub repo given: pass --repo-id owner/name (or set export.hub.repo_id in the recipe)")
    try:
        HubSection(repo_id=repo_id)  # shape check: `owner/name`
    except ValueError as e:
        fix = "" if repo_id_source == "--repo-id" else f" (got {repo_id!r}); fix it there or pass --repo-id owner/name"
        raise PushError(f"{repo_id_source}: {e.errors()[0]['msg'].removeprefix('Value error, ')}{fix}") from None
    if not isinstance(private, (bool, type(None))):
        raise PushError(f"export.hub.private in {folder / 'headwise_recipe.yaml'} is {private!r}; use true or false")
    return PushPlan(folder, repo_id, True if private is None else private, files)


def _recipe_hub_section(recipe_file: Path) -> dict[str, Any]:
    """`export.hub` of the recipe saved in the export ({} when there is none), for the default repo id."""
    if not recipe_file.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PushError(f"{recipe_file} is not readable YAML ({str(e).splitlines()[0]}); pass --repo-id owner/name, "
                        "or re-export the run to rewrite it") from None
    section: Any = data
    for key in ("export", "hub"):
        if not isinstance(section, dict):
            break
        section = section.get(key)
    if section is None:
        return {}
    if not isinstance(section, dict):
        raise PushError(f"{recipe_file} holds no export.hub mapping (found {type(section).__name__}); "
                        "pass --repo-id owner/name, or re-export the run to rewrite it")
    return section


def push(plan: PushPlan, *, token: str | None = None, commit_message: str = "Upload headwise export",
         policy: HubRetryPolicy | None = None) -> str:
    """Create the repo (if needed) and upload the folder. Returns the commit URL.

    Each Hub call waits and retries as `policy` says (default: `HubRetryPolicy.resolve()`); a failure is a
    `PushError` naming the call, the endpoint, the tries and the seconds spent, never the token.
    """
    from huggingface_hub import HfApi, get_token

    policy = policy or HubRetryPolicy.resolve()
    api = HfApi(token=token)  # token None: HF_TOKEN or the cached login
    secret = token or get_token()
    calls: list[tuple[str, Callable[[], Any]]] = [
        ("create_repo (creating the repo)",
         lambda: api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model")),
        ("upload_folder (uploading the files and committing them)",
         lambda: api.upload_folder(repo_id=plan.repo_id, folder_path=str(plan.folder), commit_message=commit_message,
                                   repo_type="model")),
    ]
    info: Any = None
    with hub_timeout(policy.timeout_s):
        for what, call in calls:
            info = _call_with_retries(what, call, policy, where=f"{plan.folder} to {plan.repo_id}",
                                      endpoint=api.endpoint, secret=secret)
    return str(getattr(info, "commit_url", info))


@contextmanager
def hub_timeout(seconds: float) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client a per-operation timeout of `seconds`, restored on exit.

    huggingface_hub builds that client with no timeout (a server that accepts the connection and never
    answers holds a call forever) and sends every repo and commit request through it (`get_session`), with the
    client's default timeout. The client is changed in place rather than through `set_client_factory`, which
    has no getter to restore a factory the caller installed.
    """
    from huggingface_hub import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


def _failure_kind(error: BaseException) -> str | None:
    """`"timeout"`, `"status"` (a 408/429/5xx answer) or `"network"` for a failure worth another try, else None.

    The transport errors come from the HTTP library huggingface_hub runs on (httpx2, or httpx before 2.0).
    """
    from huggingface_hub import get_session

    http = sys.modules[type(get_session()).__module__.partition(".")[0]]
    if isinstance(error, http.TimeoutException):
        return "timeout"
    if isinstance(error, (http.NetworkError, http.RemoteProtocolError)):
        return "network"
    return "status" if _status_code(error) in RETRY_STATUS_CODES else None


def _status_code(error: BaseException) -> int | None:
    response = getattr(error, "response", None)
    return getattr(response, "status_code", None)


def _call_with_retries(what: str, call: Callable[[], _T], policy: HubRetryPolicy, *, where: str, endpoint: str,
                       secret: str | None) -> _T:
    """`call()`, tried again after timeouts, lost connections and 408/429/5xx answers; a `PushError` at the end."""
    started = time.monotonic()
    tries = 0
    while True:
        tries += 1
        try:
            return call()
        except Exception as e:  # network, auth and Hub errors: one line, never the token
            kind = _failure_kind(e)
            reason = _one_line(e, secret)
            if kind is None or tries > policy.retries:
                spent = f"{tries} {'try' if tries == 1 else 'tries'} over {time.monotonic() - started:.1f} s"
                raise PushError(_failure_message(f"pushing {where} failed: {what}", kind, e, reason, spent, policy,
                                                 endpoint)) from None
            wait = min(2.0 ** (tries - 1), MAX_BACKOFF_S)
            logger.warning("%s at %s failed (%s); try %d of %d in %.0f s", what, endpoint, reason, tries + 1,
                           policy.retries + 1, wait)
            time.sleep(wait)


def _one_line(error: BaseException, secret: str | None) -> str:
    lines = str(error).strip().splitlines()
    reason = f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__
    return reason.replace(secret, "***") if secret else reason


def _failure_message(head: str, kind: str | None, error: BaseException, reason: str, spent: str,
                     policy: HubRetryPolicy, endpoint: str) -> str:
    if kind == "timeout":
        return (f"{head} got no answer from {endpoint} within the {policy.timeout_s:g} s timeout ({spent}); check "
                f"the network and HF_ENDPOINT, or allow more time with --timeout SECONDS ({TIMEOUT_ENV}) and more "
                f"tries with --retries N ({RETRIES_ENV})")
    if kind == "status":
        return (f"{head} at {endpoint} answered HTTP {_status_code(error)} ({spent}; last: {reason}); the Hub is "
                f"failing or overloaded: try again later, or with more tries (--retries N, {RETRIES_ENV})")
    if kind == "network":
        return f"{head} could not reach {endpoint} ({spent}; last: {reason}); check the network and HF_ENDPOINT"
    if _status_code(error) in (401, 403):
        advice = "check that HF_TOKEN (or `hf auth login`) has write access to the repo's owner"
    else:
        advice = "check the network, HF_ENDPOINT, HF_TOKEN (or `hf auth login`) and the repo id"
    return f"{head} at {endpoint} ({reason}); {advice}"
