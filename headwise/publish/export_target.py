"""Which folder an export may be written to or replace, and the replacement that never loses both.

`headwise export --out DIR` writes a folder that `--overwrite` may later replace. Replacing deletes the
old folder, so it is allowed only for a folder that holds a previous headwise export and nothing else:

- an export is recognised by its `headwise_inference.json`; its own files are listed in
  `EXPORT_MANIFEST`, written last, so any other file in the folder is the user's (an export written
  before the manifest existed is recognised by the file names an export writes);
- some folders are never replaced whatever they hold (`protected_reason`): the filesystem root, the
  user's home, the working directory, the folders the caller names as in use (the run folder, the
  weights being exported, a local base model) and every folder that contains one of them.

The new folder is built in a hidden sibling (`new_sibling_dir`), then swapped in by `move_into_place`:
the old folder is renamed aside, the new one renamed into place, and only then is the old one deleted;
a failure between the two renames moves the old one back. Folders created here get the permissions of
a plain `mkdir` under the user's umask (`tempfile.mkdtemp` would make them owner-only), and
`match_umask_permissions` gives the files the same treatment.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Sequence

from headwise.errors import HeadwiseError
from headwise.inference.config import INFERENCE_CONFIG_NAME
from headwise.version import __version__

logger = logging.getLogger(__name__)

EXPORT_MANIFEST = "headwise_export_manifest.json"
# The files a headwise export wrote before EXPORT_MANIFEST existed: weights (adapter, merged, sharded),
# model config, the tokenizer files transformers saves, headwise's own files and DuoAttention's
# pattern folder. Only used for a folder without a manifest.
KNOWN_EXPORT_FILES = re.compile(
    r"README\.md|headwise_inference\.json|headwise_recipe\.yaml"
    r"|adapter_config\.json|adapter_model\.safetensors"
    r"|config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json"
    r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json"
    r"|chat_template\.(jinja|json)|additional_chat_templates/[^/]+\.jinja"
    r"|vocab\.(json|txt)|merges\.txt|tokenizer\.model|spiece\.model"
    r"|duo_attention/(config\.json|[^/]+\.tsv)"
)
SHOWN_FILES = 5  # how many foreign files a refusal names


class ExportTargetError(HeadwiseError):
    """The export folder cannot be used as asked; nothing was changed."""


def folder_entries(folder: Path) -> list[str]:
    """Everything under `folder` as sorted relative POSIX paths: files, symlinks, and empty folders
    (with a trailing `/`). Symlinked folders are listed as entries, never followed."""
    entries = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for name in dirs:
            path = Path(root) / name
            try:
                empty = not path.is_symlink() and not any(path.iterdir())
            except OSError:  # unreadable: listed, so that nothing unseen counts as an export's
                empty = True
            if path.is_symlink():
                entries.append((rel / name).as_posix())
            elif empty:
                entries.append((rel / name).as_posix() + "/")
        entries += [(rel / name).as_posix() for name in files]
    return sorted(entries)


def write_manifest(folder: Path) -> Path:
    """Record every entry of a finished export in `folder/EXPORT_MANIFEST`; call it after the last file."""
    path = folder / EXPORT_MANIFEST
    files = [f for f in folder_entries(folder) if f != EXPORT_MANIFEST]
    path.write_text(json.dumps({"headwise_version": __version__, "files": files}, indent=2) + "\n")
    return path


def _manifest_files(folder: Path) -> set[str] | None:
    """The entries `folder`'s manifest lists, or None when it has no readable manifest."""
    try:
        files = json.loads((folder / EXPORT_MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {f for f in files if isinstance(f, str)} if isinstance(files, list) else None


def foreign_entries(folder: Path) -> list[str]:
    """The entries of an export folder that its export did not write (by its manifest, or without
    one by the names an export writes)."""
    listed = _manifest_files(folder)
    if listed is None:
        def written(entry: str) -> bool:
            return KNOWN_EXPORT_FILES.fullmatch(entry) is not None or entry == EXPORT_MANIFEST
    else:
        def written(entry: str) -> bool:
            return entry in listed or entry == EXPORT_MANIFEST
    return [e for e in folder_entries(folder) if not written(e)]


def _named(entries: Sequence[str]) -> str:
    shown = ", ".join(entries[:SHOWN_FILES])
    return shown + (f" and {len(entries) - SHOWN_FILES} more" if len(entries) > SHOWN_FILES else "")


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, KeyError):  # no HOME and no password entry
        return None


def _cwd() -> Path | None:
    try:
        return Path.cwd()
    except OSError:  # the working directory was deleted
        return None


def protected_reason(folder: Path, in_use: Sequence[tuple[str, Path]] = ()) -> str | None:
    """Why `folder` must never be replaced or deleted, or None.

    `in_use` names the folders the command works with, as (description, path) pairs such as
    ("the run folder", run_dir); `folder` must be none of them and contain none of them. The
    filesystem root, the user's home and the working directory are always in use."""
    folder = folder.resolve()
    if folder == Path(folder.anchor):
        return "it is the filesystem root"
    guarded = [(d, Path(p)) for d, p in in_use]
    guarded += [(d, p) for d, p in [("the working directory", _cwd()), ("your home folder", _home())] if p]
    for description, path in guarded:
        path = path.resolve()
        if folder == path:
            return f"it is {description}"
        if folder in path.parents:
            return f"it contains {description} ({path})"
    return None


def check_export_target(
    out: Path, *, overwrite: bool, in_use: Sequence[tuple[str, Path]] = (), label: str = "--out"
) -> Path:
    """Check that an export may be written to `out`; return its resolved path.

    Accepted: a path that does not exist yet, an empty folder that is not protected, and with
    `overwrite` a folder holding a previous headwise export and nothing else. Anything else raises
    ExportTargetError naming `label` (the option or recipe field the path came from), why, and the way
    out. Nothing is created or changed here."""
    target = Path(out).expanduser().resolve()
    shown = f"{label} {str(out)!r}"
    for path in [target, *target.parents]:
        if path.exists() or path.is_symlink():
            if path == target and not path.is_dir():
                raise ExportTargetError(
                    f"{shown} is a file, not a folder; it was left untouched. Pass --out a folder path "
                    "(a new or empty folder, or a previous export with --overwrite)"
                )
            if not path.is_dir():
                raise ExportTargetError(
                    f"{shown} cannot be created: {path} is a file, not a folder; pass --out another folder"
                )
            break
    if not target.exists():
        return target

    reason = protected_reason(target, in_use)
    if reason:
        raise ExportTargetError(
            f"{shown} cannot be the export folder: {reason}, and an export replaces the whole folder; nothing "
            "was changed. Pass --out a new folder"
        )
    if not any(target.iterdir()):
        return target
    if not (target / INFERENCE_CONFIG_NAME).is_file():
        raise ExportTargetError(
            f"{shown} is not empty and holds no headwise export (no {INFERENCE_CONFIG_NAME}; it holds "
            f"{_named(folder_entries(target))}); headwise only writes into a new or empty folder or replaces a "
            "previous export, and nothing was changed. Pass --out a new or empty folder"
        )
    foreign = foreign_entries(target)
    if foreign:
        raise ExportTargetError(
            f"{shown} holds a previous headwise export and also files an export does not write ({_named(foreign)}); "
            "headwise never deletes those, and nothing was changed. Move them out of that folder, or pass --out "
            "another folder"
        )
    if not overwrite:
        raise ExportTargetError(
            f"{shown} already holds a headwise export; pass --overwrite to replace it, or --out another folder"
        )
    return target


def _sibling_name(target: Path, tag: str) -> Path:
    """A free hidden name beside `target` (same folder, so a rename never crosses filesystems)."""
    while True:
        path = target.parent / f".{target.name}.{tag}-{secrets.token_hex(4)}"
        if not (path.exists() or path.is_symlink()):
            return path


def new_sibling_dir(target: Path, tag: str = "tmp") -> Path:
    """Create an empty hidden folder beside `target` (its parents too), with a plain mkdir's permissions."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        while True:
            path = _sibling_name(target, tag)
            try:
                path.mkdir()  # unlike tempfile.mkdtemp (0o700), honours the umask like any mkdir
                return path
            except FileExistsError:  # taken between the check and the mkdir: draw another name
                continue
    except OSError as e:
        raise ExportTargetError(
            f"cannot create the export folder beside {target} ({e.strerror or e}); pass --out a folder you can write to"
        ) from e


def match_umask_permissions(folder: Path) -> None:
    """Give every folder and file under `folder` the mode a plain mkdir / file write gets under the
    umask (some writers, e.g. safetensors, create owner-only files).

    `folder` must have been made by a plain mkdir (`new_sibling_dir`): its mode is 0o777 minus the
    umask, which is read from it rather than by changing the process umask."""
    dir_mode = folder.stat().st_mode & 0o777
    file_mode = dir_mode & 0o666
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, dir_mode)
        for name in files:
            if not (Path(root) / name).is_symlink():
                os.chmod(Path(root) / name, file_mode)


def move_into_place(new: Path, target: Path) -> None:
    """Put the finished folder `new` at `target`, replacing what is there (checked by the caller).

    The old folder is renamed aside first and deleted only once `new` is in place; if moving `new` in
    fails, the old folder is renamed back. A process killed between the two renames leaves the old
    folder whole, at the `.NAME.old-*` name beside `target`."""
    if not (target.exists() or target.is_symlink()):
        new.rename(target)
        return
    aside = _sibling_name(target, "old")
    target.rename(aside)
    try:
        new.rename(target)
    except BaseException:
        aside.rename(target)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as e:
        logger.warning("the new export is in %s, but the old one, moved to %s, could not be deleted (%s); "
                       "delete it by hand", target, aside, e)
