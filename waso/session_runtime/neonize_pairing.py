"""Pairing a neonize session in a child process that can be killed.

whatsmeow's QR loop keeps polling after its timeout and neonize cannot end the thread
that runs it, so an abandoned pairing in the runtime's own process would hold a thread
until the process exits. Pairing (the phase without credentials: QR codes or a phone
pair code) therefore runs in a child, ``python -m waso.session_runtime.neonize_pairing
TEMP_STORE ...``, which the runtime can always end: SIGTERM, then SIGKILL after
``KILL_GRACE``, then reaped. Once paired, the child exits; the runtime moves the store
into place and connects in its own process from the stored credentials, which costs no
extra process per connected session.

Protocol: one JSON object per line. The child writes events to its stdout (its other
output goes to stderr): ``started`` (``pid``, ``pdeathsig``), ``qr`` (``code``),
``paired`` (``jid``), ``pair-code`` (``code``) or ``pair-code-error`` (``error``) in
answer to a request, ``error`` (``error``) before it exits without having paired. The
parent writes requests to its stdin: ``{"op": "pair-code"}``. The child exits 0 once
paired (after whatsmeow's first connection with the new credentials, so the prekeys
it uploads are stored, or ``POST_PAIR_GRACE`` after pairing), 1 on an error, 2 when its
stdin closes (the parent is gone), and never later than its ``--deadline``.

The child dies with its parent: ``PR_SET_PDEATHSIG`` (SIGKILL) and, as a second way, the
end of its stdin. Nothing the child writes is taken before it is reaped: it pairs into a
temporary store next to the real one, and the parent renames that into place only when
the child reported ``paired`` and the file holds a device (``finalize_store``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, Protocol

from waso import logs

log = logging.getLogger("waso.runtime")

EXIT_PAIRED, EXIT_FAILED, EXIT_PARENT_GONE = 0, 1, 2
KILL_GRACE = 2.0
"""Seconds between SIGTERM and SIGKILL when the parent ends a child."""
POST_PAIR_GRACE = 30.0
"""After pairing, how long the child waits for whatsmeow's reconnection with the new credentials."""
PAIR_CODE_TIMEOUT = 30.0
SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")
_PR_SET_PDEATHSIG, _PR_GET_PDEATHSIG = 1, 2


# -- the child ------------------------------------------------------------------------------


class PairingEvents(Protocol):
    """What a pairing client reports (from any thread)."""

    def qr(self, code: str) -> None: ...

    def paired(self, jid: str) -> None: ...

    def pairing_failed(self, error: str) -> None: ...

    def connected(self) -> None: ...


class PairingClient(Protocol):
    def run(self, events: PairingEvents) -> None:
        """Connect and pair; blocks while the connection lasts and raises with the reason it ended."""

    def pair_code(self, phone: str) -> str:
        """An 8-character code to type on the phone (Link with phone number)."""


ClientFactory = Callable[[Path, str, str], PairingClient]
"""(store, device name, uuid) -> a client; called in the child's main thread."""


class NeonizePairingClient:
    """neonize's synchronous client on the temporary store."""

    def __init__(self, store: Path, device_name: str, uuid: str) -> None:
        from neonize.client import NewClient
        from neonize.proto.waCompanionReg.WAWebProtobufsCompanionReg_pb2 import DeviceProps

        props = DeviceProps(os=device_name, platformType=DeviceProps.DESKTOP)
        self.client = NewClient(str(store), props=props, uuid=uuid)

    def run(self, events: PairingEvents) -> None:
        from neonize.events import ConnectedEv, PairStatusEv

        from waso.session_runtime.neonize_transport import jid_text

        def on_qr(_: Any, code: bytes) -> None:
            events.qr(code.decode())

        def on_pair(_: Any, event: Any) -> None:
            if event.Error:
                events.pairing_failed(str(event.Error))
            else:
                events.paired(jid_text(event.ID))

        def on_connected(_: Any, __: Any) -> None:
            events.connected()

        self.client.qr(on_qr)
        self.client.event(PairStatusEv)(on_pair)
        self.client.event(ConnectedEv)(on_connected)
        self.client.connect()  # returns when the connection ends; raises NeonizeError with whatsmeow's error

    def pair_code(self, phone: str) -> str:
        return str(self.client.PairPhone(phone, True))


class Worker:
    """The child's state: writes events, and decides once how the child exits."""

    def __init__(self, out: IO[str]) -> None:
        self.out = out
        self.write_lock = threading.Lock()
        self.end_lock = threading.RLock()  # emit() may end the child while finish() writes
        self.done = threading.Event()
        self.exit_code = EXIT_FAILED
        self.jid: str | None = None

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **fields})
        try:
            with self.write_lock:
                self.out.write(line + "\n")
                self.out.flush()
        except (BrokenPipeError, ValueError):  # the parent is gone
            self.finish(EXIT_PARENT_GONE)

    def finish(self, code: int, error: str | None = None) -> None:
        with self.end_lock:
            if self.done.is_set():
                return
            if error is not None:
                self.emit("error", error=error)
            self.exit_code = code
            self.done.set()

    # PairingEvents
    def qr(self, code: str) -> None:
        self.emit("qr", code=code)

    def paired(self, jid: str) -> None:
        self.jid = jid
        self.emit("paired", jid=jid)
        _daemon_timer(POST_PAIR_GRACE, lambda: self.finish(EXIT_PAIRED))

    def pairing_failed(self, error: str) -> None:
        self.finish(EXIT_FAILED, f"pairing failed: {error}")

    def connected(self) -> None:
        if self.jid is not None:  # whatsmeow reconnected with the new credentials and stored its prekeys
            self.finish(EXIT_PAIRED)

    # the threads
    def run_client(self, client: PairingClient) -> None:
        try:
            client.run(self)
            error = "connection ended"
        except Exception as exc:
            error = str(exc) or type(exc).__name__
        if self.jid is not None:
            self.finish(EXIT_PAIRED)
        else:
            self.finish(EXIT_FAILED, error)

    def serve_requests(self, requests: IO[str], client: PairingClient, phone: str) -> None:
        for line in requests:
            try:
                op = json.loads(line).get("op")
            except (ValueError, AttributeError):
                op = None
            if op != "pair-code":
                log.warning("unknown request: %s", line.strip()[:200])
                continue
            try:
                self.emit("pair-code", code=client.pair_code(phone))
            except Exception as exc:
                self.emit("pair-code-error", error=str(exc) or type(exc).__name__)
        self.finish(EXIT_PARENT_GONE)


def _daemon_timer(seconds: float, action: Callable[[], None]) -> None:
    timer = threading.Timer(seconds, action)
    timer.daemon = True
    timer.start()


def _daemon_thread(target: Callable[..., None], *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True).start()


def die_with_parent(parent_pid: int) -> int:
    """SIGKILL this process when its parent ends; exit now if it already has. Returns the death signal set."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(EXIT_PARENT_GONE)
    return death_signal()


def death_signal() -> int:
    if sys.platform != "linux":
        return 0
    value = ctypes.c_int(0)
    ctypes.CDLL(None, use_errno=True).prctl(_PR_GET_PDEATHSIG, ctypes.byref(value), 0, 0, 0)
    return value.value


def _protocol_output() -> IO[str]:
    """The events go to the real stdout; anything else printed (by neonize or Go) goes to stderr."""
    events = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(events, "w", encoding="utf-8")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m waso.session_runtime.neonize_pairing")
    parser.add_argument("store", type=Path, help="the temporary store to pair into (absolute path)")
    parser.add_argument("--phone", required=True, help="E.164 number, for pair codes")
    parser.add_argument("--device-name", required=True)
    parser.add_argument("--uuid", required=True)
    parser.add_argument("--deadline", type=float, required=True, help="seconds after which the child gives up")
    parser.add_argument("--parent-pid", type=int, required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None, client_factory: ClientFactory = NeonizePairingClient) -> NoReturn:
    args = parse_args(argv)
    pdeathsig = die_with_parent(args.parent_pid)
    worker = Worker(_protocol_output())
    # The runtime's environment names the tenant; the child's lines join the runtime's.
    log_format: logs.LogFormat = "json" if os.environ.get("WASO_LOG_FORMAT") == "json" else "text"
    logs.configure(logging.WARNING, tenant=os.environ.get("WASO_NAMESPACE"), log_format=log_format)
    worker.emit("started", pid=os.getpid(), pdeathsig=pdeathsig)
    _daemon_timer(args.deadline, lambda: worker.finish(EXIT_FAILED, "pairing timed out in the pairing worker"))
    try:
        client = client_factory(args.store, args.device_name, args.uuid)
    except Exception as exc:
        worker.finish(EXIT_FAILED, f"cannot create the neonize client: {exc}")
    else:
        _daemon_thread(worker.run_client, client)
        _daemon_thread(worker.serve_requests, sys.stdin, client, args.phone.removeprefix("+"))
    worker.done.wait()
    # Not a normal exit: neonize's Go threads and its non-daemon connect thread would hold it.
    # Every store write that whatsmeow committed is on disk; an open transaction rolls back.
    os._exit(worker.exit_code)


# -- the parent -----------------------------------------------------------------------------


def default_command() -> list[str]:
    return [sys.executable, "-m", "waso.session_runtime.neonize_pairing"]


EventHandler = Callable[[dict[str, Any]], None]


class PairingWorker:
    """The runtime's handle on one pairing child."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.pid = process.pid
        self.started: dict[str, Any] | None = None
        self.paired_jid: str | None = None
        self.error: str | None = None
        self._pair_code: asyncio.Future[str] | None = None
        self._pair_code_lock = asyncio.Lock()

    @classmethod
    async def spawn(
        cls,
        command: Sequence[str],
        store: Path,
        *,
        phone: str,
        device_name: str,
        uuid: str,
        deadline: float,
    ) -> PairingWorker:
        process = await asyncio.create_subprocess_exec(
            *command,
            str(store),
            f"--phone={phone}",
            f"--device-name={device_name}",
            f"--uuid={uuid}",
            f"--deadline={deadline}",
            f"--parent-pid={os.getpid()}",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=None,  # the child's logs join the runtime's
        )
        return cls(process)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def follow(self, handle: EventHandler) -> int:
        """Read the child's events until it closes its output; hand the others to ``handle``; returns its exit code."""
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            try:
                event = json.loads(line)
                kind = event["event"]
            except (ValueError, KeyError, TypeError):
                log.warning("pairing worker %d wrote %r", self.pid, line[:200])
                continue
            if kind == "started":
                self.started = event
            elif kind == "paired":
                self.paired_jid = str(event["jid"])
            elif kind == "error":
                self.error = str(event.get("error"))
            if kind in ("pair-code", "pair-code-error"):
                self._answer(event)
            else:
                handle(event)
        code = await self.process.wait()
        self._answer({"event": "pair-code-error", "error": "the pairing worker ended"})
        return code

    def _answer(self, event: dict[str, Any]) -> None:
        waiter, self._pair_code = self._pair_code, None
        if waiter is None or waiter.done():
            return
        if event["event"] == "pair-code":
            waiter.set_result(str(event["code"]))
        else:
            waiter.set_exception(RuntimeError(str(event.get("error"))))

    async def request_pair_code(self) -> str:
        """Raises RuntimeError when the child refuses or ends; bound the wait with ``asyncio.timeout``."""
        async with self._pair_code_lock:
            stdin = self.process.stdin
            if stdin is None or stdin.is_closing() or self.returncode is not None:
                raise RuntimeError("the pairing worker ended")
            waiter: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self._pair_code = waiter
            try:
                stdin.write(b'{"op": "pair-code"}\n')
                await stdin.drain()
            except (ConnectionError, RuntimeError) as error:
                raise RuntimeError(f"the pairing worker ended: {error}") from None
            return await waiter

    async def end(self, grace: float = KILL_GRACE) -> int:
        """SIGTERM, SIGKILL after ``grace`` seconds, reap; returns the exit status (negative: the signal)."""
        process = self.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            try:
                await asyncio.wait_for(process.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        if process.stdin is not None:
            process.stdin.close()
        return process.returncode if process.returncode is not None else await process.wait()


def side_files(store: Path) -> list[Path]:
    return [store, *(store.with_name(store.name + suffix) for suffix in SQLITE_SIDE_FILES)]


def remove_store(store: Path) -> None:
    """Delete a store and its journal files (only when no process has it open)."""
    for path in side_files(store):
        path.unlink(missing_ok=True)


def finalize_store(paired: Path, store: Path) -> str | None:
    """Move the store a finished child paired into place; returns its JID, None when it holds no device.

    Called only after the child was reaped, so no one writes the file. Opening it
    read-write rolls back a transaction the child was killed in and checkpoints a WAL;
    then one rename replaces the store: a reader sees the old file or the new one,
    never a half-written one.
    """
    if not paired.exists():
        return None
    try:
        with contextlib.closing(sqlite3.connect(paired, timeout=2)) as db:
            if db.execute("PRAGMA quick_check").fetchone() != ("ok",):
                return None
            row = db.execute("SELECT jid FROM whatsmeow_device LIMIT 1").fetchone()
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as error:
        log.warning("%s: not a usable store: %s", paired, error)
        return None
    if not row or not row[0]:
        return None
    for stale in side_files(store)[1:]:  # journals of the old (never paired) store must not meet the new one
        stale.unlink(missing_ok=True)
    os.replace(paired, store)
    directory = os.open(store.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    remove_store(paired)
    return str(row[0])


if __name__ == "__main__":
    main()
