"""The run directory: what a training run owns on disk, and how a run picks up where it stopped.

```
<output_dir>/
  recipe.yaml           the resolved recipe (written before training starts)
  checkpoint-<step>/    Trainer checkpoints (adapter + optimizer + trainer_state.json)
  final/                the trained adapter (or weights) and tokenizer, written at the end
  run_summary.json      steps, loss, runtime, versions
  export/               `headwise export` output (default location)
  run.lock              the run lock, while a run trains (see below)
  run.lock.json         who holds it: pid, host, start time, command
```

Nothing a user had is overwritten: a directory that holds a run of a *different* recipe, or that is
a file, is refused before any model is loaded, and resuming validates checkpoints before handing
one to the Trainer (a checkpoint cut off by a kill mid-save, or holding another model's adapter, is
skipped with a warning, falling back to the previous). A run that fails before it has written
anything besides its recipe.yaml leaves the folder as it found it (`claim_run_dir`).

The run lock (`RunLock`, taken by `claim_run_dir`) guarantees that at most one run trains in a
directory at a time, so two runs never overwrite or rotate away each other's checkpoints:

- A run holds an OS lock (`fcntl.flock`) on `run.lock` from before it writes anything in the
  directory until it has written its final files; a second run on the same directory is refused
  before it loads the model or writes anything, with a message naming the holder.
- Both files are removed when a run ends, normally or by an exception (Ctrl-C included). A run
  killed by a signal (SIGKILL, SIGTERM) leaves them, but the kernel drops the OS lock when its
  process dies, so the next run on the same host recognises `run.lock.json` as stale and replaces
  it: a crashed run never blocks the next one.
- A `run.lock.json` written on another host (a shared filesystem) cannot be checked for liveness
  from here: it is refused, and the message says which file to delete if that run is surely gone.
- A distributed launch is one run: the main process (`RANK` 0, set by the launcher before any
  headwise code runs) takes the lock; the other processes neither take nor check it. When the
  main process is refused it exits, and the launcher stops the others (they write nothing first).
- Only `headwise train` takes the lock; export and push read a run without it.
- On a filesystem without `flock` the lock falls back to `run.lock.json` alone, checking the pid's
  liveness on the same host (a narrower guarantee: two runs starting at the same instant may race).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shlex
import socket
import sys
import weakref
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

from headwise.errors import HeadwiseError
from headwise.recipe.loader import (
    RESOLVED_HEADER,
    RecipeError,
    apply_overrides,
    file_provenance,
    parse_override,
    read_yaml_mapping,
    validate_mapping,
)
from headwise.recipe.schema import Recipe
from headwise.weight_files import weights_problem

logger = logging.getLogger(__name__)

RECIPE_FILE = "recipe.yaml"
FINAL_DIR = "final"
SUMMARY_FILE = "run_summary.json"
LOCK_FILE = "run.lock"
LOCK_OWNER_FILE = "run.lock.json"
_RECIPE_TMP = RECIPE_FILE + ".tmp"
# Files the run itself may have written before recipe.yaml: they do not make a folder "not a run".
_BOOKKEEPING_FILES = {LOCK_FILE, LOCK_OWNER_FILE, _RECIPE_TMP}
# Fields a resumed run may change without becoming a different run: how long it trains and how it
# logs or saves, not what it trains.
RESUMABLE_CHANGES = {
    ("training", "resume"),
    ("training", "max_steps"),
    ("training", "num_train_epochs"),
    ("training", "save_steps"),
    ("training", "save_total_limit"),
    ("training", "logging_steps"),
    ("training", "report_to"),
    ("training", "dataloader_num_workers"),
    ("export",),
    ("description",),
}


class RunDirError(HeadwiseError):
    """The output directory cannot be used as asked; nothing in it was touched."""


class RunLockedError(RunDirError):
    """Another run holds the output directory's lock (or may hold it, on another host)."""


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _diff(old: Any, new: Any, prefix: tuple = ()) -> list[tuple[tuple, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), prefix + (k,))
        return out
    return [] if old == new else [(prefix, old, new)]


def recipe_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Changes between two resolved recipes that make them different runs."""
    out = []
    for path, a, b in _diff(old, new):
        if any(path[: len(p)] == p for p in RESUMABLE_CHANGES):
            continue
        out.append(f"{'.'.join(map(str, path))}: {a!r} -> {b!r}")
    return out


def checkpoints(run_dir: Path) -> list[Path]:
    """`checkpoint-<step>` folders, newest first."""
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _json_object(path: Path) -> tuple[dict[str, Any], str | None]:
    """`path`'s JSON object, or ({}, why it is not one)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return {}, f"{path.name} is not valid JSON ({e})"
    if not isinstance(data, dict):
        return {}, f"{path.name} is not a JSON object (it holds a {type(data).__name__})"
    return data, None


def checkpoint_problem(ckpt: Path, adapter_tensors: dict[str, tuple[int, ...]] | None = None) -> str | None:
    """Why `ckpt` cannot be resumed from, in words, or None when it is whole.

    Refused: a missing or unreadable `trainer_state.json`, or one that is not a JSON object with an
    integer `global_step`; an `adapter_config.json` that is not a JSON object; no weights; damaged
    weights; and, when `adapter_tensors` (name -> shape, as this model's adapter saves them) is
    given, an `adapter_model.safetensors` whose tensor names or shapes differ (an adapter of another
    model, rank or method: PEFT would load none of it without a word). Only file headers are read.
    """
    state = ckpt / "trainer_state.json"
    if not state.is_file():
        return f"{state.name} is missing"
    state_data, problem = _json_object(state)
    if problem:
        return problem
    step = state_data.get("global_step")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"{state.name} has no integer `global_step` (found {step!r})"
    adapter_config = ckpt / "adapter_config.json"
    if adapter_config.is_file():
        problem = _json_object(adapter_config)[1]
        if problem:
            return problem
    if not any(ckpt.glob("*.safetensors")) and not any(ckpt.glob("global_step*")):
        return "it holds no weights (*.safetensors or a DeepSpeed global_step folder)"
    problem = weights_problem(ckpt)
    if problem is None and adapter_tensors is not None:
        problem = _adapter_mismatch(ckpt / "adapter_model.safetensors", adapter_tensors)
    return problem


def _adapter_mismatch(weights: Path, expected: dict[str, tuple[int, ...]]) -> str | None:
    """How the tensors in `weights` differ from `expected` (names and shapes, from the header), or None."""
    from safetensors import safe_open

    if not weights.is_file():
        return f"{weights.name} is missing (this run trains a LoRA adapter)"
    with safe_open(str(weights), framework="pt") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    foreign = sorted(set(found) - set(expected))
    absent = sorted(set(expected) - set(found))
    if foreign or absent:
        parts = []
        if foreign:
            parts.append(f"{len(foreign)} tensor(s) that are not this model's adapter (e.g. {foreign[0]!r})")
        if absent:
            parts.append(f"{len(absent)} of the adapter's tensor(s) missing (e.g. {absent[0]!r})")
        return f"{weights.name} holds an adapter of another model or recipe: {'; '.join(parts)}"
    reshaped = sorted(n for n in expected if found[n] != tuple(expected[n]))
    if reshaped:
        n = reshaped[0]
        return (f"{weights.name} holds an adapter of another shape: {len(reshaped)} tensor(s) differ, e.g. {n!r} is "
                f"{list(found[n])}, this recipe's adapter has {list(expected[n])} (another peft.r or model?)")
    return None


def confirm_resume_checkpoint(
    recipe: Recipe, resume: Path | None, adapter_tensors: dict[str, tuple[int, ...]] | None
) -> Path | None:
    """Check the checkpoint `prepare_run_dir` picked against the adapter of the model now built.

    The tensor check needs the model, which is built after the run folder is claimed. A checkpoint
    that does not fit is skipped with a warning (falling back to an older one that fits, else to a
    start from step 0) under `resume: auto`, and refused (RunDirError) when `training.resume` names it.
    """
    if resume is None or adapter_tensors is None:
        return resume
    problem = checkpoint_problem(resume, adapter_tensors)
    if problem is None:
        return resume
    if recipe.training.resume not in ("auto", "never"):
        raise RunDirError(f"training.resume {recipe.training.resume!r}: {problem}; pick another checkpoint or `resume: auto`")
    logger.warning("skipping %s: %s; trying an older one", resume, problem)
    step = int(resume.name.split("-")[1])
    for ckpt in checkpoints(recipe.run_dir()):
        if int(ckpt.name.split("-")[1]) >= step:
            continue
        problem = checkpoint_problem(ckpt, adapter_tensors)
        if problem is None:
            return ckpt
        logger.warning("skipping %s: %s; trying an older one", ckpt, problem)
    logger.warning("no checkpoint in %s fits this run; training starts from step 0", recipe.run_dir())
    return None


def _written_by_headwise(saved: Path) -> bool:
    try:
        with saved.open("rb") as f:
            return f.read(len(RESOLVED_HEADER)) == RESOLVED_HEADER.encode()
    except OSError:
        return False


def read_saved_recipe(path: Path) -> dict[str, Any]:
    """The mapping of a run's saved `recipe.yaml`, read as strictly as a recipe file; RunDirError
    naming the file and the way out when it is unreadable, not UTF-8, not YAML or not a mapping."""
    try:
        return read_yaml_mapping(path)
    except RecipeError as e:
        raise RunDirError(f"{e} (it is the resolved recipe saved beside the run: restore it, e.g. with "
                          "`headwise recipe show YOUR_RECIPE > " + str(path) + "`)") from None


def check_run_dir(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Raise RunDirError unless `run_dir` can hold a run of the recipe `resolved`; reads, never writes.

    Refused: a path that is (or lies under) a file, a folder holding a run of a different recipe,
    and a non-empty folder that is not a headwise run.
    """
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if path.is_dir():
                break
            what = "is a file" if path == run_dir else f"lies under {str(path)!r}, which is a file"
            raise RunDirError(
                f"training.output_dir {str(run_dir)!r} {what}, not a folder; set training.output_dir to a folder "
                "path (it is created if missing), e.g. `training.output_dir=runs/new`; the file was not touched"
            )
    saved = run_dir / RECIPE_FILE
    if saved.is_file() and not _written_by_headwise(saved):
        raise RunDirError(
            f"training.output_dir {str(run_dir)!r} holds a {RECIPE_FILE} that headwise did not write (a run's starts "
            f"with {RESOLVED_HEADER!r}), so it is not a headwise run; choose another training.output_dir (e.g. "
            "`training.output_dir=runs/new`); nothing there was touched"
        )
    if saved.is_file():
        try:
            diffs = recipe_differences(read_saved_recipe(saved), resolved)
        except RunDirError as e:
            diffs = [f"its {RECIPE_FILE} is unreadable: {e}"]
        if diffs:
            listed = "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
            raise RunDirError(
                f"training.output_dir {str(run_dir)!r} holds a run of a different recipe ({listed}); choose another "
                "training.output_dir (e.g. `training.output_dir=runs/new`) or delete that directory"
            )
    elif run_dir.is_dir() and any(p.name not in _BOOKKEEPING_FILES for p in run_dir.iterdir()):
        raise RunDirError(
            f"training.output_dir {str(run_dir)!r} exists and is not a headwise run (no {RECIPE_FILE}); choose another "
            "training.output_dir or empty it"
        )


def prepare_run_dir(recipe: Recipe, resolved: dict[str, Any], resolved_yaml: str) -> Path | None:
    """Check `training.output_dir` against the recipe and return the checkpoint to resume from.

    Raises RunDirError (touching nothing) when `check_run_dir` refuses the directory, when
    checkpoints exist and `resume: never`, or when an explicit resume checkpoint is corrupt.
    Writes the resolved recipe beside the run on the main process. Call it under the run lock
    (`claim_run_dir` does) so that no other run writes there meanwhile.
    """
    run_dir = recipe.run_dir()
    check_run_dir(run_dir, resolved)

    resume: Path | None = None
    mode = recipe.training.resume
    if mode not in ("auto", "never"):
        resume = Path(mode)
        problem = checkpoint_problem(resume)
        if problem:
            raise RunDirError(f"training.resume {mode!r}: {problem}; pick another checkpoint or `resume: auto`")
    else:
        found = checkpoints(run_dir)
        if found and mode == "never":
            raise RunDirError(
                f"training.output_dir {str(run_dir)!r} has checkpoints ({found[0].name}) and training.resume is `never`; "
                "use `training.resume=auto` to continue, or another output_dir"
            )
        for ckpt in found:
            problem = checkpoint_problem(ckpt)
            if problem is None:
                resume = ckpt
                break
            logger.warning("skipping %s: %s (a run killed while saving leaves this); trying an older one", ckpt, problem)

    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        # Replace, never truncate in place: the other processes of a launch read this file meanwhile.
        tmp = run_dir / _RECIPE_TMP
        tmp.write_text(resolved_yaml)
        os.replace(tmp, run_dir / RECIPE_FILE)
    return resume


@contextmanager
def claim_run_dir(recipe: Recipe, resolved: dict[str, Any], resolved_yaml: str) -> Iterator[Path | None]:
    """`prepare_run_dir` under the run lock, held (on the main process) until the `with` block ends.

    Yields the checkpoint to resume from. The directory is checked once before the lock is taken,
    so a refused directory (a file, a foreign folder, another recipe's run) is not touched at all,
    and once more under the lock, since a run may have finished there in between.

    A run that fails (an exception, Ctrl-C included) before it has added anything to the folder
    besides `recipe.yaml` leaves the folder as it found it: the `recipe.yaml` it wrote is removed
    (or the previous one put back), and the folder, with any parents this run created, is removed
    when nothing else is in it. Otherwise the rerun of a corrected command would be refused as "a run
    of a different recipe". Once the run has written anything else (a checkpoint, a log), everything
    stays, the saved recipe describing it.
    """
    run_dir = recipe.run_dir()
    check_run_dir(run_dir, resolved)
    if not is_main_process():
        yield prepare_run_dir(recipe, resolved, resolved_yaml)
        return
    first_created = next((p for p in reversed((run_dir, *run_dir.parents)) if not p.exists()), None)
    try:
        with RunLock(run_dir):
            before = _run_contents(run_dir)
            saved = run_dir / RECIPE_FILE
            previous_recipe = saved.read_bytes() if saved.is_file() else None
            try:
                yield prepare_run_dir(recipe, resolved, resolved_yaml)
            except BaseException:
                if _run_contents(run_dir) - {RECIPE_FILE} == before - {RECIPE_FILE}:
                    _restore_recipe(saved, previous_recipe)
                raise
    except BaseException:
        if first_created is not None:
            _remove_empty_folders(run_dir, first_created)
        raise


def _run_contents(run_dir: Path) -> set[str]:
    """Names in `run_dir`, the lock's own files left out."""
    return {p.name for p in run_dir.iterdir() if p.name not in _BOOKKEEPING_FILES} if run_dir.is_dir() else set()


def _restore_recipe(saved: Path, previous: bytes | None) -> None:
    (saved.parent / _RECIPE_TMP).unlink(missing_ok=True)
    if previous is None:
        saved.unlink(missing_ok=True)
    elif not saved.is_file() or saved.read_bytes() != previous:
        tmp = saved.parent / _RECIPE_TMP
        tmp.write_bytes(previous)
        os.replace(tmp, saved)


def _remove_empty_folders(run_dir: Path, top: Path) -> None:
    """rmdir `run_dir` and its parents up to `top` (the first this run created), stopping at one that is not empty."""
    for folder in (run_dir, *run_dir.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == top:
            return


# Locks this process holds, so that a forked child (a DataLoader worker) closes its inherited copy
# of the descriptor: the lock then lives exactly as long as the process that took it.
_held_locks: "weakref.WeakSet[RunLock]" = weakref.WeakSet()


def _close_inherited_locks() -> None:
    for lock in list(_held_locks):
        lock._forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunLock:
    """The exclusive claim of one run on its output directory (see the module docstring).

    `acquire` raises RunLockedError naming the holder when another run has the directory;
    `release` (or leaving the `with` block) removes `run.lock` and `run.lock.json`. The OS lock is
    `fcntl.flock` on `run.lock`: released by the kernel when the process dies, however it dies.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.lock_path = self.run_dir / LOCK_FILE
        self.owner_path = self.run_dir / LOCK_OWNER_FILE
        self._fd: int | None = None
        self._pid: int | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock or raise RunLockedError (RunDirError when the folder cannot be created)."""
        import fcntl

        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(
                f"training.output_dir {str(self.run_dir)!r} cannot be created ({e.strerror}); choose a folder you can write to"
            ) from e
        while True:
            fd, created = self._open_lock_file()
            os_locked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    os.close(fd)  # EWOULDBLOCK: a live run holds it
                    raise RunLockedError(self._busy_message(self._read_owner())) from None
                logger.warning("%s does not support file locks (%s); the run lock relies on %s alone",
                               self.run_dir, e.strerror, LOCK_OWNER_FILE)
                os_locked = False
            if os_locked and not self._is_current_lock_file(fd):
                os.close(fd)  # the previous holder removed this file while we waited for it: lock the new one
                continue
            break
        try:
            self._check_stale_owner(os_locked)
            self._write_owner()
        except BaseException:
            if created and os_locked:  # leave the folder as it was; safe only while we hold the lock
                self.lock_path.unlink(missing_ok=True)
            os.close(fd)
            raise
        self._fd, self._pid = fd, os.getpid()
        _held_locks.add(self)

    def _open_lock_file(self) -> tuple[int, bool]:
        """A descriptor of `run.lock`, and whether this call created the file."""
        flags = os.O_RDWR | os.O_CLOEXEC
        while True:
            try:
                try:
                    return os.open(self.lock_path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
                except FileExistsError:
                    return os.open(self.lock_path, flags), False
            except FileNotFoundError:
                continue  # removed by its holder between the two calls
            except OSError as e:
                raise RunDirError(
                    f"training.output_dir {str(self.run_dir)!r}: cannot create {LOCK_FILE} there ({e.strerror}); choose a "
                    "folder you can write to"
                ) from e

    def release(self) -> None:
        """Remove the lock files and drop the lock; a no-op when not held by this process."""
        if self._fd is None or self._pid != os.getpid():
            return
        # Unlink while still locked: a run that opened the old file sees it is no longer current.
        for path in (self.owner_path, self.lock_path):
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        os.close(self._fd)
        self._fd = None
        _held_locks.discard(self)

    def _forget_in_child(self) -> None:
        # Closing the child's copy leaves the parent's lock in place (flock belongs to the open file
        # description, still open in the parent); LOCK_UN here would release it for both.
        if self._fd is not None and self._pid != os.getpid():
            os.close(self._fd)
            self._fd = None

    def _is_current_lock_file(self, fd: int) -> bool:
        try:
            on_disk = os.stat(self.lock_path)
        except FileNotFoundError:
            return False
        held = os.fstat(fd)
        return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)

    def _read_owner(self) -> dict[str, Any] | None:
        try:
            owner = json.loads(self.owner_path.read_text())
        except (OSError, ValueError):
            return None
        return owner if isinstance(owner, dict) else None

    def _check_stale_owner(self, os_locked: bool) -> None:
        """Refuse an owner record this process cannot prove dead; drop one it can."""
        owner = self._read_owner()
        if owner is None:
            return
        here = socket.gethostname()
        if owner.get("host") != here:
            raise RunLockedError(
                f"training.output_dir {str(self.run_dir)!r} is claimed by a run on another host ({_describe(owner)}); "
                f"this host ({here}) cannot tell whether it still runs. Wait for it to finish; if you are sure no run uses "
                f"this folder, delete {self.owner_path} and start again"
            )
        # Holding the OS lock proves its owner gone; without OS locks, the pid is the only evidence.
        if not os_locked and isinstance(owner.get("pid"), int) and _pid_alive(owner["pid"]):
            raise RunLockedError(self._busy_message(owner))
        logger.warning("%s names a run that ended without releasing it (%s; killed?): taking the lock over",
                       self.owner_path, _describe(owner))

    def _write_owner(self) -> None:
        owner = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(sys.argv),
            "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        }
        self.owner_path.write_text(json.dumps(owner, indent=2) + "\n")

    def _busy_message(self, owner: dict[str, Any] | None) -> str:
        holder = _describe(owner) if owner else "details not written yet, it is starting"
        return (
            f"training.output_dir {str(self.run_dir)!r} is in use by another run ({holder}); wait for it to finish or "
            "stop it, or choose another training.output_dir (e.g. `training.output_dir=runs/new`)"
        )


def _describe(owner: dict[str, Any]) -> str:
    text = f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} since {owner.get('started', '?')}"
    if owner.get("command"):
        text += f", `{owner['command']}`"
    return text


EXPORT_OVERRIDABLE = ("method", "export")


def read_run_recipe(run_dir: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """The resolved recipe saved beside a run (used by export and push), with `overrides` applied.

    Only `method.*` (not `method.name`) and `export.*` may be overridden: everything else describes
    how the saved weights were trained."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        raise RunDirError(f"{path} does not exist: {run_dir} is not a headwise run directory (train it with `headwise train`)")
    data = read_saved_recipe(path)
    try:
        for text in overrides:
            key = parse_override(text)[0]
            if key[0] not in EXPORT_OVERRIDABLE or key[:2] == ["method", "name"]:
                raise RunDirError(
                    f"override {text!r}: only method.* (not method.name) and export.* settings can change after "
                    f"training; {'.'.join(key)} describes how {run_dir} was trained (train again to change it)"
                )
        label = str(path) + (f" with {' '.join(overrides)}" if overrides else "")
        provenance = file_provenance(data, str(path))  # so an error names the file or the override that set it
        return validate_mapping(apply_overrides(data, overrides, provenance), provenance, label=label)
    except RecipeError as e:
        raise RunDirError(str(e)) from e
