"""Credential-store backups: consistent copies of a live SQLite store, verified restores, pruning. No cluster."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from waso.session_runtime import backups
from waso.session_runtime.backups import (
    MANIFEST,
    Backup,
    BackupError,
    backup_store,
    list_backups,
    prune_backups,
    recover_store,
    reset_store,
    restore_backup,
)
from waso.session_runtime.neonize_transport import STORE_FILE, stored_jid
from waso.session_runtime.simulator_transport import CREDENTIALS_FILE

T0 = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
PREFILL = 3000
JID = "4915112345601:53@s.whatsapp.net"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    path = tmp_path / "sessions" / "s1"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def kept(tmp_path: Path) -> Path:
    return tmp_path / "backups" / "s1"


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def leftovers(store: Path) -> list[str]:
    return sorted(p.name for p in store.parent.iterdir() if p.name.startswith("."))


def make_db(path: Path, journal_mode: str, rows: int) -> None:
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute(f"PRAGMA journal_mode={journal_mode}")
        db.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, payload BLOB NOT NULL)")
        db.execute("CREATE TABLE meta (n INTEGER NOT NULL)")
        db.execute("BEGIN")
        db.execute("INSERT INTO meta (n) VALUES (0)")
        db.executemany("INSERT INTO rows (payload) VALUES (?)", ((os.urandom(1024),) for _ in range(rows)))
        db.execute("COMMIT")


def read_db(path: Path) -> tuple[str, list[int], int]:
    """Integrity, row ids and the writer's counter of a database, read from a copy (no journal files near ``path``)."""
    copy = path.with_name(path.name + ".check")
    shutil.copyfile(path, copy)
    try:
        with contextlib.closing(sqlite3.connect(copy)) as db:
            integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
            ids = [row[0] for row in db.execute("SELECT id FROM rows ORDER BY id")]
            counter = db.execute("SELECT n FROM meta").fetchone()[0]
    finally:
        for leftover in copy.parent.glob(copy.name + "*"):
            leftover.unlink()
    return integrity, ids, counter


class Writer(threading.Thread):
    """Commits one row and the counter in each transaction, on its own connection, ``pause`` seconds apart."""

    def __init__(self, path: Path, pause: float) -> None:
        super().__init__(name="writer", daemon=True)
        self.path, self.pause, self.committed, self.errors = path, pause, 0, list[BaseException]()
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with contextlib.closing(sqlite3.connect(self.path, timeout=10, isolation_level=None)) as db:
                while not self.stop.is_set():
                    db.execute("BEGIN IMMEDIATE")
                    db.execute("INSERT INTO rows (payload) VALUES (?)", (os.urandom(1024),))
                    db.execute("UPDATE meta SET n = n + 1")
                    db.execute("COMMIT")
                    self.committed += 1
                    if self.pause:
                        time.sleep(self.pause)
        except BaseException as error:
            self.errors.append(error)


@pytest.mark.parametrize("journal_mode", ["wal", "delete"])
def test_a_backup_taken_while_a_writer_commits_is_one_committed_state(
    store: Path, kept: Path, journal_mode: str
) -> None:
    db = store / STORE_FILE
    make_db(db, journal_mode, PREFILL)  # ~3.5 MB: the copy takes long enough to overlap commits
    # In rollback-journal mode a writer that commits back to back starves readers for seconds
    # (SQLite's busy handler polls); whatsmeow writes in bursts, so leave it a millisecond.
    writer = Writer(db, pause=0.0 if journal_mode == "wal" else 0.001)
    writer.start()
    try:
        deadline = time.monotonic() + 10
        while writer.committed < 50 and time.monotonic() < deadline:
            time.sleep(0.005)
        taken = []
        for n in range(5):
            before = writer.committed
            backup = backup_store(store, kept, f"b{n}", T0 + timedelta(minutes=n))
            taken.append((backup, before, writer.committed))
    finally:
        writer.stop.set()
        writer.join(10)
    assert writer.errors == []
    assert any(after > before for _, before, after in taken), "no commit overlapped a backup"
    seen = []
    for backup, before, after in taken:
        assert backup.files == (STORE_FILE,)
        integrity, ids, counter = read_db(backup.path / STORE_FILE)
        assert integrity == "ok"
        assert ids == list(range(1, len(ids) + 1))  # a prefix of the committed rows, no gaps
        assert counter == len(ids) - PREFILL  # the counter and the rows come from the same commit
        assert before <= counter <= after + 1  # the commit in flight when the copy ended may be in it
        seen.append(counter)
    assert seen == sorted(seen)
    assert [b.id for b in list_backups(kept)] == [f"b{n}" for n in range(5)]


def test_the_simulator_credentials_round_trip(store: Path, kept: Path) -> None:
    credentials = store / CREDENTIALS_FILE
    credentials.write_text(json.dumps({"jid": JID, "token": "t-1"}))
    original = credentials.read_bytes()
    (store / "simulator-credentials.tmp").write_text('{"jid": "half-writ')  # the simulator's partial write
    backup = backup_store(store, kept, "sim-1", T0)
    assert backup == Backup("sim-1", T0, kept / "sim-1", (CREDENTIALS_FILE,), len(original))
    assert sorted(p.name for p in backup.path.iterdir()) == [MANIFEST, CREDENTIALS_FILE]
    manifest = json.loads((backup.path / MANIFEST).read_text())
    assert manifest["id"] == "sim-1"
    assert manifest["takenAt"] == T0.isoformat()
    assert [(f["name"], f["kind"], f["size"]) for f in manifest["files"]] == [(CREDENTIALS_FILE, "file", len(original))]

    credentials.write_text(json.dumps({"jid": "4915112345601:54@s.whatsapp.net", "token": "t-2"}))
    assert restore_backup(kept, "sim-1", store) == backup
    assert files(store) == {CREDENTIALS_FILE: original}
    assert leftovers(store) == []


def test_restore_brings_back_the_exact_store_and_drops_the_old_journal_files(store: Path, kept: Path) -> None:
    db = store / STORE_FILE
    make_db(db, "wal", 10)
    store.chmod(0o750)
    backup = backup_store(store, kept, "before-repair", T0)
    saved = (backup.path / STORE_FILE).read_bytes()

    # The old store goes on, and is left with a real WAL that is not checkpointed (its writer was killed).
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA wal_autocheckpoint=0")
    writer.executemany("INSERT INTO rows (payload) VALUES (?)", ((b"new",) for _ in range(10)))
    journals = {s: (store / (STORE_FILE + s)).read_bytes() for s in ("-wal", "-shm")}
    writer.close()  # checkpoints and deletes them; a killed writer would not have: put them back
    for suffix, content in journals.items():
        (store / (STORE_FILE + suffix)).write_bytes(content)
    (store / (STORE_FILE + "-journal")).write_bytes(b"stale")
    assert read_db(db)[1] == list(range(1, 21))

    restore_backup(kept, "before-repair", store)
    assert files(store) == {STORE_FILE: saved}  # no -wal, -shm or -journal of the old store
    assert store.stat().st_mode & 0o777 == 0o750
    with contextlib.closing(sqlite3.connect(db)) as restored:
        assert restored.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert [r[0] for r in restored.execute("SELECT id FROM rows ORDER BY id")] == list(range(1, 11))
    assert leftovers(store) == []


def test_restore_into_a_store_that_was_erased(store: Path, kept: Path) -> None:
    (store / CREDENTIALS_FILE).write_text('{"jid": "x"}')
    backup_store(store, kept, "b1", T0)
    shutil.rmtree(store)
    restore_backup(kept, "b1", store)
    assert files(store) == {CREDENTIALS_FILE: b'{"jid": "x"}'}


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "missing file"])
def test_a_damaged_backup_is_refused_and_the_store_is_untouched(store: Path, kept: Path, damage: str) -> None:
    make_db(store / STORE_FILE, "delete", 20)
    (store / CREDENTIALS_FILE).write_text('{"jid": "x"}')
    backup = backup_store(store, kept, "b1", T0)
    copy = backup.path / STORE_FILE
    content = bytearray(copy.read_bytes())
    if damage == "flipped byte":
        content[len(content) // 2] ^= 0xFF
        copy.write_bytes(bytes(content))
    elif damage == "truncated":
        copy.write_bytes(bytes(content[:4096]))
    else:
        copy.unlink()
    make_db(store / "other.db", "delete", 1)  # the store moved on since the backup
    current = files(store)

    with pytest.raises(BackupError, match=rf"backup 'b1' is damaged: {STORE_FILE} (is missing|has \d+ bytes)"):
        restore_backup(kept, "b1", store)
    assert files(store) == current
    assert leftovers(store) == []


def test_missing_and_incomplete_backups_are_refused(store: Path, kept: Path) -> None:
    (store / CREDENTIALS_FILE).write_text("{}")
    with pytest.raises(BackupError, match=r"'nope'.*missing or incomplete"):
        restore_backup(kept, "nope", store)
    backup = backup_store(store, kept, "b1", T0)
    (backup.path / MANIFEST).write_text('{"id": "b1", "takenAt": ')  # a manifest that is not one
    with pytest.raises(BackupError, match=r"'b1'.*missing or incomplete"):
        restore_backup(kept, "b1", store)
    assert files(store) == {CREDENTIALS_FILE: b"{}"}


def test_a_manifest_cannot_name_files_outside_its_backup(store: Path, kept: Path) -> None:
    (store / CREDENTIALS_FILE).write_text("{}")
    backup = backup_store(store, kept, "b1", T0)
    manifest = json.loads((backup.path / MANIFEST).read_text())
    manifest["files"][0]["name"] = "../../escape"
    (backup.path / MANIFEST).write_text(json.dumps(manifest))
    assert list_backups(kept) == []
    with pytest.raises(BackupError, match="missing or incomplete"):
        restore_backup(kept, "b1", store)


def test_prune_keeps_the_newest_and_removes_incomplete_backups(store: Path, kept: Path) -> None:
    (store / CREDENTIALS_FILE).write_text("{}")
    for minutes, backup_id in enumerate(["c", "a", "d", "b", "e"]):  # names out of time order
        backup_store(store, kept, backup_id, T0 + timedelta(minutes=minutes))
    (kept / "half").mkdir()
    (kept / "half" / CREDENTIALS_FILE).write_text("{}")  # no manifest: an interrupted backup
    (kept / ".not-ours").mkdir()

    assert [b.id for b in list_backups(kept)] == ["c", "a", "d", "b", "e"]
    assert prune_backups(kept, keep=2) == ["half", "c", "a", "d"]
    assert [b.id for b in list_backups(kept)] == ["b", "e"]
    assert sorted(p.name for p in kept.iterdir()) == [".not-ours", "b", "e"]
    assert prune_backups(kept, keep=2) == []
    assert prune_backups(kept, keep=0) == ["b", "e"]
    assert list_backups(kept) == []
    with pytest.raises(ValueError, match="-1"):
        prune_backups(kept, keep=-1)
    assert list_backups(kept / "never") == []
    assert prune_backups(kept / "never", keep=1) == []


def test_an_interrupted_backup_is_ignored_removed_and_can_be_taken_again(
    store: Path, kept: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_db(store / STORE_FILE, "delete", 5)
    backup_store(store, kept, "b1", T0)

    def crash(*_: object) -> None:
        raise OSError("no space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(backups, "_write_manifest", crash)
        with pytest.raises(OSError, match="no space"):
            backup_store(store, kept, "b2", T0 + timedelta(minutes=1))
    assert (kept / "b2" / STORE_FILE).exists()
    assert [b.id for b in list_backups(kept)] == ["b1"]
    with pytest.raises(BackupError, match=r"'b2'.*missing or incomplete"):
        restore_backup(kept, "b2", store)

    retaken = backup_store(store, kept, "b2", T0 + timedelta(minutes=2))  # an incomplete one is replaced
    assert [b.id for b in list_backups(kept)] == ["b1", "b2"]
    with pytest.raises(FileExistsError, match="'b2'"):
        backup_store(store, kept, "b2", T0 + timedelta(minutes=3))
    assert list_backups(kept)[-1] == retaken

    with monkeypatch.context() as patch:
        patch.setattr(backups, "_write_manifest", crash)
        with pytest.raises(OSError, match="no space"):
            backup_store(store, kept, "b3", T0 + timedelta(minutes=4))
    assert prune_backups(kept, keep=5) == ["b3"]
    assert sorted(p.name for p in kept.iterdir()) == ["b1", "b2"]


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../evil", "a/b", "/abs", ".hidden", "-dash", "a b", "x\x00y", "é", "a" * 129]
)
def test_unsafe_backup_ids_are_refused(store: Path, kept: Path, bad: str) -> None:
    (store / CREDENTIALS_FILE).write_text("{}")
    with pytest.raises(ValueError, match="backup id") as refused:
        backup_store(store, kept, bad, T0)
    assert repr(bad) in str(refused.value)
    with pytest.raises(ValueError, match="backup id"):
        restore_backup(kept, bad, store)
    assert not kept.exists()
    assert files(store) == {CREDENTIALS_FILE: b"{}"}


def test_ids_naive_times_and_overlapping_directories(store: Path, kept: Path) -> None:
    for good in ("a", "2026-11-28T12.00.00Z", "repair-3_x", "A" * 128):
        backups.check_id(good)
    with pytest.raises(ValueError, match="time zone"):
        backup_store(store, kept, "b1", datetime(2026, 11, 28, 12, 0))
    with pytest.raises(ValueError, match="must not contain each other"):
        backup_store(store, store / "backups", "b1", T0)
    with pytest.raises(ValueError, match="must not contain each other"):
        restore_backup(store.parent, "b1", store)


def test_reset_removes_the_credentials_and_keeps_the_directory(store: Path, kept: Path) -> None:
    make_db(store / STORE_FILE, "delete", 1)
    for name in (STORE_FILE + "-wal", STORE_FILE + "-shm", STORE_FILE + ".pairing", CREDENTIALS_FILE, ".x.tmp"):
        (store / name).write_bytes(b"x")
    (store / "keep").mkdir()
    backup = backup_store(store, kept, "b1", T0)
    assert backup.files == (CREDENTIALS_FILE, STORE_FILE)  # journals, partial writes and a pairing attempt are not
    for name in (STORE_FILE + "-wal", STORE_FILE + "-shm"):  # SQLite dropped these junk ones when the backup opened it
        (store / name).write_bytes(b"x")

    removed = reset_store(store)
    assert removed == sorted([".x.tmp", CREDENTIALS_FILE, STORE_FILE, STORE_FILE + "-shm", STORE_FILE + "-wal",
                              STORE_FILE + ".pairing"])  # fmt: skip
    assert [p.name for p in store.iterdir()] == ["keep"]
    assert reset_store(store) == []
    assert reset_store(store.parent / "missing") == []

    with pytest.raises(ValueError, match=r"holds more than files \(keep\)"):  # the swap would lose it
        restore_backup(kept, "b1", store)
    (store / "keep").rmdir()
    restore_backup(kept, "b1", store)
    assert sorted(files(store)) == [CREDENTIALS_FILE, STORE_FILE]


def test_an_empty_store_gives_an_empty_backup_that_restores_to_an_empty_store(store: Path, kept: Path) -> None:
    backup = backup_store(store, kept, "empty", T0)
    assert (backup.files, backup.size) == ((), 0)
    (store / CREDENTIALS_FILE).write_text("{}")
    restore_backup(kept, "empty", store)
    assert list(store.iterdir()) == []
    assert backup_store(store.parent / "never", kept, "none", T0).files == ()


def test_restore_without_an_atomic_exchange_and_recovery_after_a_crash_between_renames(
    store: Path, kept: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (store / CREDENTIALS_FILE).write_text("backed up")
    backup_store(store, kept, "b1", T0)
    (store / CREDENTIALS_FILE).write_text("current")

    with monkeypatch.context() as patch:  # a filesystem without RENAME_EXCHANGE: two renames
        patch.setattr(backups, "_exchange", lambda a, b: False)
        restore_backup(kept, "b1", store)
    assert files(store) == {CREDENTIALS_FILE: b"backed up"}
    assert leftovers(store) == []

    # A crash between the two renames: the store was moved aside, the staged copy not yet in place.
    (store / CREDENTIALS_FILE).write_text("current")
    os.rename(store, store.parent / ".s1.old-0badf00d")
    (store.parent / ".s1.restore-0badf00d").mkdir()
    (store.parent / ".s1.restore-0badf00d" / CREDENTIALS_FILE).write_text("backed up")
    (store.parent / ".s2.old-0badf00d").mkdir()  # another session's: not touched
    (store.parent / ".s1.old-abc.restore-0badf00d").mkdir()  # nor one of session "s1.old-abc"
    recover_store(store)
    assert files(store) == {CREDENTIALS_FILE: b"current"}
    assert leftovers(store) == [".s1.old-abc.restore-0badf00d", ".s2.old-0badf00d"]

    # A crash before the swap: only the staged copy is left over, the store is whole.
    (store.parent / ".s1.restore-0badf00d").mkdir()
    reset_store(store)
    assert leftovers(store) == [".s1.old-abc.restore-0badf00d", ".s2.old-0badf00d"]


def test_the_exchange_is_atomic_on_this_filesystem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f").write_text("a")
    (tmp_path / "b").mkdir()
    assert backups._exchange(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b" / "f").read_text() == "a"
    assert list((tmp_path / "a").iterdir()) == []


def test_a_real_neonize_store_is_backed_up_reset_and_restored(store: Path, kept: Path) -> None:
    from neonize.aioze.client import ClientFactory

    from waso.session_runtime.neonize_transport import jid_text

    db = store / STORE_FILE
    assert ClientFactory.get_all_devices_from_db(str(db)) == []  # whatsmeow creates its schema
    with contextlib.closing(sqlite3.connect(db)) as writer, writer:  # what whatsmeow writes after pairing
        writer.execute(
            "INSERT INTO whatsmeow_device (jid, registration_id, noise_key, identity_key, signed_pre_key,"
            " signed_pre_key_id, signed_pre_key_sig, adv_key, adv_details, adv_account_sig,"
            " adv_account_sig_key, adv_device_sig) VALUES (?, 1, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)",
            (JID, b"k" * 32, b"i" * 32, b"s" * 32, b"g" * 64, b"a", b"d", b"x" * 64, b"y" * 32, b"z" * 64),
        )

    def dump() -> list[str]:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as reader:
            return list(reader.iterdump())

    before = dump()
    assert stored_jid(db) == JID
    backup = backup_store(store, kept, "repair-1", T0)
    assert backup.files == (STORE_FILE,)

    reset_store(store)
    assert stored_jid(db) is None
    assert ClientFactory.get_all_devices_from_db(str(db)) == []  # a fresh store, as for a new pairing

    restore_backup(kept, "repair-1", store)
    assert stored_jid(db) == JID
    assert dump() == before
    assert [jid_text(d.JID) for d in ClientFactory.get_all_devices_from_db(str(db))] == [JID]


def test_a_backup_gives_up_when_writers_keep_the_store_locked(
    store: Path, kept: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = store / STORE_FILE
    make_db(db, "delete", 10)
    monkeypatch.setattr(backups, "SQLITE_BUSY_TIMEOUT", 0.3)
    with contextlib.closing(sqlite3.connect(db, isolation_level=None)) as writer:
        writer.execute("BEGIN EXCLUSIVE")  # a commit that holds the lock longer than the backup waits
        with pytest.raises(TimeoutError, match="no read lock"):
            backup_store(store, kept, "b1", T0)
        writer.execute("ROLLBACK")
    assert list_backups(kept) == []
    assert sorted(p.name for p in (kept / "b1").iterdir()) == []  # incomplete: pruned later
    assert backup_store(store, kept, "b1", T0 + timedelta(minutes=1)).files == (STORE_FILE,)
