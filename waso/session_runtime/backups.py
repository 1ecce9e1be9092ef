"""Backups of one session's credential store: take, list, prune, reset, restore. No Kubernetes here.

A session's credentials live in its own directory (``SessionIdentity.store_dir``): for neonize
the SQLite file ``whatsmeow.db``, for the simulator ``simulator-credentials.json``. The repair
of a broken device identity backs that store up, resets it and pairs again; a rollback
restores a backup. The rules:

- **Consistent copies of a live store.** SQLite files (any file with the SQLite header, in
  practice ``whatsmeow.db``) are copied with the SQLite online backup API in one step: one
  read transaction, so the copy is a committed state even while whatsmeow holds the
  database open and writes (its connections wait up to go-sqlite3's 5 s busy timeout for
  the few milliseconds the copy holds its read lock). Other regular files are read once and
  written to a temporary file that is renamed into place. SQLite's ``-wal``/``-shm``/
  ``-journal`` files, temporary files (``*.tmp``, dot files) and a pairing attempt's
  ``*.pairing`` store are not credentials and are not copied.
- **A backup is complete when its manifest exists.** ``<backups_dir>/<id>/manifest.json``
  (id, takenAt, each file's size and sha256) is written last, through a temporary file,
  after every copied file and the directory were fsynced. A directory without a readable
  manifest is an interrupted backup: listing ignores it, pruning removes it.
- **Restore verifies, then swaps.** Every file is copied into a sibling of the store
  directory while its checksum is checked; a damaged backup is refused before the store is
  touched. The staged directory then replaces the store in one ``renameat2(RENAME_EXCHANGE)``
  (two renames where the filesystem cannot exchange; ``recover_store`` puts the old store
  back after a crash between them), so a crash leaves the old store or the restored one,
  never a mix, and the old store's journal files go with it.
- Backup ids and file names are single safe path components; anything else is a
  ``ValueError`` naming it.

The caller serializes the operations of one session, and stops the session's transport
before ``reset_store`` or ``restore_backup``: a process that still has the old database open
would go on writing to the file it opened. ``backup_store`` is made for a running session.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from waso.session_runtime.neonize_pairing import SQLITE_SIDE_FILES

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SQLITE_HEADER = b"SQLite format 3\x00"
SQLITE_BUSY_TIMEOUT = 10.0
"""Seconds to wait for the read lock while a writer commits."""
NOT_CREDENTIALS = (*SQLITE_SIDE_FILES, ".tmp", ".pairing")
"""Name endings of files in a store that are not credentials (journals, partial writes, a pairing attempt)."""
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_CHUNK = 1 << 20
_RESTORING, _REPLACED = ".restore-", ".old-"


class BackupError(Exception):
    """A backup that is missing, incomplete or damaged; the store was not touched."""


@dataclass(frozen=True)
class Backup:
    id: str
    taken_at: datetime
    path: Path
    """The backup's directory."""
    files: tuple[str, ...]
    """Names of the store's files it holds, sorted (empty: the store was empty)."""
    size: int
    """Bytes of those files."""


# -- taking ---------------------------------------------------------------------------------


def backup_store(store_dir: Path, backups_dir: Path, backup_id: str, now: datetime) -> Backup:
    """Copy the credential store into ``backups_dir/backup_id``; a missing or empty store gives an empty backup.

    Raises ``ValueError`` for an unsafe id or a naive ``now``, ``FileExistsError`` when a
    complete backup of that id exists (an incomplete one is replaced).
    """
    check_id(backup_id)
    if now.tzinfo is None:
        raise ValueError(f"backup {backup_id!r}: the time must carry a time zone")
    _check_apart(store_dir, backups_dir)
    recover_store(store_dir)
    target = backups_dir / backup_id
    if target.exists():
        if _read_manifest(target) is not None:
            raise FileExistsError(f"backup {backup_id!r} exists in {backups_dir}")
        _remove_backup(target)
    backups_dir.mkdir(parents=True, exist_ok=True)
    target.mkdir()
    _fsync_dir(backups_dir)
    entries = []
    for source in credential_files(store_dir):
        copy = target / source.name
        try:
            kind = _copy_sqlite(source, copy) if _is_sqlite(source) else _copy_file(source, copy)
        except FileNotFoundError:  # removed meanwhile, as the simulator's transport does on a log-out
            if source.exists():
                raise
            log.info("%s: removed while it was backed up; not in backup %s", source, backup_id)
            continue
        digest, size = _digest(copy)
        entries.append({"name": source.name, "kind": kind, "size": size, "sha256": digest})
    _fsync_dir(target)
    manifest = {"id": backup_id, "takenAt": now.isoformat(), "files": entries}
    _write_manifest(target, manifest)
    backup = _backup_from(target, manifest)
    log.info("backup %s of %s: %d files, %d bytes", backup_id, store_dir, len(backup.files), backup.size)
    return backup


def credential_files(store_dir: Path) -> list[Path]:
    """The store's credential files, sorted by name (none when the directory is missing)."""
    if not store_dir.is_dir():
        return []
    return sorted(
        entry
        for entry in store_dir.iterdir()
        if entry.is_file() and not entry.is_symlink() and _is_credential_name(entry.name)
    )


def _copy_sqlite(source: Path, copy: Path) -> str:
    """One-step online backup into a temporary file, then a rename; the copy is one committed state."""
    partial = copy.with_name(copy.name + ".tmp")
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT

    def give_up_when_starved(status: int, remaining: int, total: int) -> None:
        if status in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) and time.monotonic() > deadline:
            raise TimeoutError(f"{source}: no read lock within {SQLITE_BUSY_TIMEOUT:.0f} s, writers hold it")

    try:
        with (
            contextlib.closing(sqlite3.connect(_uri(source, "rw"), uri=True, timeout=SQLITE_BUSY_TIMEOUT)) as src,
            contextlib.closing(sqlite3.connect(partial)) as dst,
        ):
            # pages=-1: all pages in one step under one read lock, so a writer never restarts it;
            # without the deadline, Python would retry a busy step for ever.
            src.backup(dst, progress=give_up_when_starved, sleep=0.05)
    except TimeoutError:
        _remove_quietly(partial)
        raise
    except sqlite3.DatabaseError as error:
        if error.sqlite_errorcode not in (sqlite3.SQLITE_NOTADB, sqlite3.SQLITE_CORRUPT):
            _remove_quietly(partial)
            raise
        # A header that is not a database after all: keep its bytes, a repair wants them most.
        log.warning("%s: not a readable SQLite database (%s); copied byte for byte", source, error)
        _remove_quietly(partial)
        _copy_file(source, copy)
        return "file"
    for suffix in SQLITE_SIDE_FILES:  # the destination was opened in rollback mode and closed: none is left
        _remove_quietly(partial.with_name(partial.name + suffix))
    _fsync_file(partial)
    os.replace(partial, copy)
    return "sqlite"


def _copy_file(source: Path, copy: Path) -> str:
    partial = copy.with_name(copy.name + ".tmp")
    with source.open("rb") as reader, partial.open("wb") as writer:
        shutil.copyfileobj(reader, writer, _CHUNK)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(partial, copy)
    return "file"


def _write_manifest(target: Path, manifest: dict[str, Any]) -> None:
    partial = target / (MANIFEST + ".tmp")
    with partial.open("w") as writer:
        json.dump(manifest, writer, indent=2)
        writer.flush()
        os.fsync(writer.fileno())
    os.replace(partial, target / MANIFEST)
    _fsync_dir(target)


# -- listing and pruning --------------------------------------------------------------------


def list_backups(backups_dir: Path) -> list[Backup]:
    """Complete backups, oldest first (by the time taken, then id); incomplete ones are skipped."""
    return sorted((backup for _, backup in _scan(backups_dir) if backup is not None), key=lambda b: (b.taken_at, b.id))


def prune_backups(backups_dir: Path, keep: int) -> list[str]:
    """Remove incomplete backups and the oldest complete ones beyond ``keep``; returns the removed ids.

    Call it while no backup of this session is being taken: that one has no manifest yet.
    """
    if keep < 0:
        raise ValueError(f"keep must be at least 0, not {keep}")
    found = list(_scan(backups_dir))
    complete = sorted((b for _, b in found if b is not None), key=lambda b: (b.taken_at, b.id))
    doomed = sorted(path.name for path, b in found if b is None)
    doomed += [b.id for b in complete[: max(0, len(complete) - keep)]]
    for backup_id in doomed:
        _remove_backup(backups_dir / backup_id)
    if doomed:
        _fsync_dir(backups_dir)
        log.info("pruned backups in %s: %s", backups_dir, ", ".join(doomed))
    return doomed


def _scan(backups_dir: Path) -> Iterator[tuple[Path, Backup | None]]:
    """Every backup directory with its backup, None when it is incomplete; other entries are not ours."""
    if not backups_dir.is_dir():
        return
    for entry in sorted(backups_dir.iterdir()):
        if entry.is_dir() and not entry.is_symlink() and _ID.fullmatch(entry.name):
            manifest = _read_manifest(entry)
            yield entry, (_backup_from(entry, manifest) if manifest is not None else None)


def _read_manifest(target: Path) -> dict[str, Any] | None:
    """The manifest when it is present and well-formed, else None (an interrupted backup)."""
    try:
        manifest = json.loads((target / MANIFEST).read_text())
        if not isinstance(manifest, dict) or manifest.get("id") != target.name:
            raise ValueError("not this backup's manifest")
        if datetime.fromisoformat(manifest["takenAt"]).tzinfo is None:
            raise ValueError("takenAt has no time zone")
        for entry in manifest["files"]:
            _check_name(entry["name"])
            if not isinstance(entry["size"], int) or not isinstance(entry["sha256"], str):
                raise ValueError(f"bad entry {entry!r}")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        log.warning("%s: unusable manifest, treated as incomplete: %s", target, error)
        return None
    return manifest


def _backup_from(target: Path, manifest: dict[str, Any]) -> Backup:
    files = manifest["files"]
    return Backup(
        id=manifest["id"],
        taken_at=datetime.fromisoformat(manifest["takenAt"]),
        path=target,
        files=tuple(sorted(f["name"] for f in files)),
        size=sum(f["size"] for f in files),
    )


def _remove_backup(target: Path) -> None:
    """The manifest goes first: a crash half-way leaves an incomplete backup, never a damaged complete one."""
    _remove_quietly(target / MANIFEST)
    _fsync_dir(target)
    shutil.rmtree(target)


# -- reset and restore ----------------------------------------------------------------------


def reset_store(store_dir: Path) -> list[str]:
    """Remove every regular file of the store (journals and partial writes too); returns their names.

    The directory and any subdirectory stay. The session's transport must be stopped.
    """
    recover_store(store_dir)
    if not store_dir.is_dir():
        return []
    removed = sorted(e.name for e in store_dir.iterdir() if e.is_symlink() or e.is_file())
    for name in removed:
        _remove_quietly(store_dir / name)
    _fsync_dir(store_dir)
    log.info("reset the store %s: removed %s", store_dir, ", ".join(removed) or "nothing")
    return removed


def restore_backup(backups_dir: Path, backup_id: str, store_dir: Path) -> Backup:
    """Replace the store with a verified copy of the backup; the session's transport must be stopped.

    Raises ``BackupError`` (store untouched) when the backup is missing, incomplete, or a
    file's size or sha256 differs from its manifest; ``ValueError`` for an unsafe id or a
    store directory holding more than files (a subdirectory would be lost in the swap).
    """
    check_id(backup_id)
    _check_apart(store_dir, backups_dir)
    recover_store(store_dir)
    target = backups_dir / backup_id
    manifest = _read_manifest(target) if target.is_dir() and not target.is_symlink() else None
    if manifest is None:
        raise BackupError(f"backup {backup_id!r} in {backups_dir} is missing or incomplete (no valid manifest)")
    if store_dir.is_dir():
        others = sorted(e.name for e in store_dir.iterdir() if e.is_symlink() or not e.is_file())
        if others:
            raise ValueError(f"the store {store_dir} holds more than files ({', '.join(others)}): not replacing it")
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = _sibling(store_dir, _RESTORING)
    staged.mkdir()
    try:
        for entry in manifest["files"]:
            _verified_copy(target / entry["name"], staged / entry["name"], entry, backup_id)
        if store_dir.is_dir():
            os.chmod(staged, store_dir.stat().st_mode & 0o7777)
        _fsync_dir(staged)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _swap_in(staged, store_dir)
    backup = _backup_from(target, manifest)
    log.info("restored backup %s into %s: %s", backup_id, store_dir, ", ".join(backup.files) or "an empty store")
    return backup


def recover_store(store_dir: Path) -> None:
    """Finish what a crash interrupted in ``restore_backup``: the old store comes back if the store is gone.

    Left-over staged or replaced copies are removed. Called by every operation here; the
    runtime may call it before it opens a store.
    """
    parent = store_dir.parent
    if not parent.is_dir():
        return
    ours = re.compile(rf"\.{re.escape(store_dir.name)}({_RESTORING}|{_REPLACED})[0-9a-f]{{8}}")
    leftovers = sorted(e for e in parent.iterdir() if ours.fullmatch(e.name) and e.is_dir())
    replaced = [e for e in leftovers if _REPLACED in e.name.removeprefix(f".{store_dir.name}")]
    if not store_dir.exists() and replaced:
        os.rename(replaced[0], store_dir)  # the crash fell between the two renames of _swap_in's fallback
        leftovers.remove(replaced[0])
        log.warning("%s: put the store back that an interrupted restore had moved aside", store_dir)
    for leftover in leftovers:
        shutil.rmtree(leftover, ignore_errors=True)
    if leftovers:
        _fsync_dir(parent)


def _verified_copy(source: Path, copy: Path, entry: dict[str, Any], backup_id: str) -> None:
    digest = hashlib.sha256()
    size = 0
    try:
        with source.open("rb") as reader, copy.open("wb") as writer:
            while chunk := reader.read(_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                writer.write(chunk)
            writer.flush()
            os.fsync(writer.fileno())
    except FileNotFoundError:
        raise BackupError(f"backup {backup_id!r} is damaged: {entry['name']} is missing") from None
    if size != entry["size"] or digest.hexdigest() != entry["sha256"]:
        raise BackupError(
            f"backup {backup_id!r} is damaged: {entry['name']} has {size} bytes with sha256 {digest.hexdigest()},"
            f" the manifest says {entry['size']} bytes with sha256 {entry['sha256']}"
        )


def _swap_in(staged: Path, store_dir: Path) -> None:
    """Make ``staged`` the store in one step where the filesystem allows it; the old store is removed."""
    parent = store_dir.parent
    if not store_dir.exists():
        os.rename(staged, store_dir)
    elif _exchange(staged, store_dir):
        shutil.rmtree(staged)  # now the old store, with its journal files
    else:
        replaced = _sibling(store_dir, _REPLACED)
        os.rename(store_dir, replaced)
        os.rename(staged, store_dir)  # a crash before this: recover_store puts ``replaced`` back
        _fsync_dir(parent)
        shutil.rmtree(replaced)
    _fsync_dir(parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False when this system or filesystem cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot exchange {a} and {b}: {os.strerror(code)}")


# -- names and small file helpers -----------------------------------------------------------


def check_id(backup_id: str) -> None:
    """Refuse an id that is not one safe path component (letters, digits, ``._-``, not starting with ``.``)."""
    if not isinstance(backup_id, str) or not _ID.fullmatch(backup_id):
        raise ValueError(
            f"backup id {backup_id!r} is not a safe name: 1-128 of letters, digits, '.', '_', '-',"
            " starting with a letter or digit"
        )


def _check_name(name: Any) -> None:
    if not isinstance(name, str) or not _ID.fullmatch(name) or name == MANIFEST:
        raise ValueError(f"file name {name!r} is not a plain file name")


def _is_credential_name(name: str) -> bool:
    return bool(_ID.fullmatch(name)) and name != MANIFEST and not name.endswith(NOT_CREDENTIALS)


def _check_apart(store_dir: Path, backups_dir: Path) -> None:
    store, backups = store_dir.absolute(), backups_dir.absolute()
    if store == backups or store in backups.parents or backups in store.parents:
        raise ValueError(f"the backups ({backups_dir}) and the store ({store_dir}) must not contain each other")


def _sibling(store_dir: Path, kind: str) -> Path:
    return store_dir.parent / f".{store_dir.name}{kind}{secrets.token_hex(4)}"


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as reader:
        return reader.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _uri(path: Path, mode: str) -> str:
    return f"{path.absolute().as_uri()}?mode={mode}"


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as reader:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync_file(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_dir(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
