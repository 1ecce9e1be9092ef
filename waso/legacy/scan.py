"""`waso legacy scan`: a tree of Baileys multi-file auth directories, judged per phone and counted per company.

The tree is ``<DIR>/<phone>/creds.json`` (plus the pre-key, session and app-state files Baileys
keeps next to it, which are not judged). Every entry of ``DIR`` whose name is a phone number
(digits, optionally with a leading ``+``) is one phone directory; hidden entries are skipped and
other names are listed as ignored. Each phone directory is healthy, suspicious or unreadable
(``waso.legacy.creds`` says why); a damaged or partial file is a finding, never a crash.
"""

from __future__ import annotations

import os
import re
import stat
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from waso.legacy.creds import MAX_CREDS_BYTES, Code, Finding, State, judge_creds, parse_creds, quote, state_of
from waso.legacy.mapping import CompanyMapping

_PHONE_DIR = re.compile(r"^\+?([0-9]+)$")
_E164_DIGITS = re.compile(r"^[1-9][0-9]{6,14}$")
"""waso.api.session.E164_PATTERN without its '+': what spec.phoneNumber accepts."""


class ScanError(Exception):
    """The tree cannot be scanned at all (the argument is wrong); per-phone problems are findings instead."""


@dataclass(frozen=True)
class Entry:
    directory: str
    """The entry's name in the scanned directory."""
    phone: str
    """Its digits."""
    company: str | None
    findings: tuple[Finding, ...]

    @property
    def state(self) -> State:
        return state_of(self.findings)


@dataclass(frozen=True)
class ScanReport:
    root: Path
    mapping: CompanyMapping
    entries: tuple[Entry, ...]
    """Sorted by phone, then directory name."""
    ignored: tuple[str, ...]
    """Entries whose names are not phone numbers, sorted."""

    @property
    def unmapped(self) -> list[str]:
        return sorted({e.phone for e in self.entries if e.company is None})

    @property
    def missing(self) -> list[str]:
        present = {e.phone for e in self.entries}
        return [phone for phone in self.mapping.by_phone if phone not in present]

    def counts(self) -> dict[str, dict[str, int]]:
        """Per company of the mapping (all of them, sorted), its entries by state."""
        tally: dict[str, Counter[State]] = {company: Counter() for company in self.mapping.companies}
        for entry in self.entries:
            if entry.company is not None:
                tally[entry.company][entry.state] += 1
        return {company: {state.value: counter[state] for state in State} for company, counter in tally.items()}

    def to_json(self) -> dict[str, Any]:
        """``companies`` and ``unmapped`` are the contract; ``missing``, ``findings`` and ``ignored`` add detail."""
        return {
            "companies": self.counts(),
            "unmapped": self.unmapped,
            "missing": self.missing,
            "findings": [
                {
                    "directory": entry.directory,
                    "phone": entry.phone,
                    "company": entry.company,
                    "state": entry.state.value,
                    "code": finding.code.value,
                    "message": finding.message,
                }
                for entry in self.entries
                for finding in entry.findings
            ],
            "ignored": list(self.ignored),
        }


def _reason(error: OSError) -> str:
    return error.strerror or type(error).__name__


def _read_creds(path: Path) -> bytes | Finding:
    creds = path / "creds.json"
    try:
        info = creds.lstat()
    except FileNotFoundError:
        return Finding(Code.MISSING_CREDS, "no creds.json in the directory: there are no credentials to judge")
    except OSError as error:
        return Finding(Code.UNREADABLE_FILE, f"cannot look into the directory: {_reason(error)}")
    if stat.S_ISLNK(info.st_mode):
        return Finding(Code.SYMLINK, "creds.json is a symbolic link: not followed")
    if not stat.S_ISREG(info.st_mode):
        return Finding(Code.UNREADABLE_FILE, "creds.json is not a regular file")
    if info.st_size > MAX_CREDS_BYTES:
        return Finding(Code.UNREADABLE_FILE, f"creds.json has {info.st_size} bytes: too large for Baileys credentials")
    try:
        fd = os.open(creds, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as file:
            return file.read(MAX_CREDS_BYTES + 1)
    except OSError as error:
        return Finding(Code.UNREADABLE_FILE, f"cannot read creds.json: {_reason(error)}")


def judge_directory(path: Path, phone: str) -> list[Finding]:
    """Every finding about one phone directory (``phone``: the digits of its name)."""
    findings: list[Finding] = []
    if not _E164_DIGITS.match(phone):
        findings.append(
            Finding(Code.INVALID_PHONE, f"{phone} is not an E.164 number (7 to 15 digits, not starting with 0)")
        )
    try:
        info = path.lstat()
    except OSError as error:
        return [*findings, Finding(Code.UNREADABLE_FILE, f"cannot read the entry: {_reason(error)}")]
    if stat.S_ISLNK(info.st_mode):
        return [*findings, Finding(Code.SYMLINK, "the phone directory is a symbolic link: not followed")]
    if not stat.S_ISDIR(info.st_mode):
        return [*findings, Finding(Code.NOT_A_DIRECTORY, "not a directory: a Baileys auth directory was expected")]
    raw = _read_creds(path)
    if isinstance(raw, Finding):
        return [*findings, raw]
    parsed = parse_creds(raw)
    if isinstance(parsed, Finding):
        return [*findings, parsed]
    return [*findings, *judge_creds(parsed, phone)]


def scan_tree(root: Path, mapping: CompanyMapping) -> ScanReport:
    """Judge every phone directory under ``root``; ScanError only when ``root`` itself cannot be listed."""
    if not root.is_dir():
        raise ScanError(f"{root}: not a directory" if root.exists() else f"{root}: no such directory")
    try:
        names = sorted(os.listdir(root))
    except OSError as error:
        raise ScanError(f"{root}: cannot list the directory: {_reason(error)}") from error
    phones: list[tuple[str, str]] = []
    ignored: list[str] = []
    for name in names:
        if name.startswith("."):
            continue
        match = _PHONE_DIR.match(name)
        if match is None:
            ignored.append(name)
        else:
            phones.append((match[1], name))
    directories: defaultdict[str, list[str]] = defaultdict(list)
    for phone, name in phones:
        directories[phone].append(name)
    entries: list[Entry] = []
    for phone, name in sorted(phones):
        findings = judge_directory(root / name, phone)
        others = [other for other in directories[phone] if other != name]
        if others:
            findings.append(
                Finding(
                    Code.DUPLICATE_PHONE,
                    f"{', '.join(others)} also holds phone {phone}: only one linked device can be imported",
                )
            )
        entries.append(Entry(name, phone, mapping.company_of(phone), tuple(findings)))
    return ScanReport(root=root, mapping=mapping, entries=tuple(entries), ignored=tuple(ignored))


def _table(rows: Sequence[tuple[str, ...]], right: int = 1) -> list[str]:
    """Columns from index ``right`` on are right-aligned (the counts)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(widths[i]) if i >= right else cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in rows
    ]


def _phones(entries: list[Entry]) -> list[str]:
    """A company's phone directories as a table, then the finding of every non-healthy one in words."""
    if not entries:
        return []
    lines = _table(
        [
            ("  PHONE", "STATE", "FINDINGS"),
            *[(f"  {e.directory}", e.state.value, ", ".join(f.code.value for f in e.findings) or "-") for e in entries],
        ],
        right=3,
    )
    problems = [
        f"    {entry.directory}  {finding.code.value}: {finding.message}"
        for entry in entries
        if entry.state is not State.HEALTHY
        for finding in entry.findings
    ]
    return [*lines, "  Findings:", *problems] if problems else lines


def render_text(report: ScanReport) -> str:
    counts = report.counts()
    mapped = sum(1 for e in report.entries if e.company is not None)
    lines = [
        f"Legacy scan of {report.root}: {len(report.entries)} phone directories, "
        f"{mapped} of them mapped to {len(counts)} companies.",
        "",
    ]
    header = ("COMPANY", "HEALTHY", "SUSPICIOUS", "UNREADABLE")
    rows = [header] + [
        (company, str(c["healthy"]), str(c["suspicious"]), str(c["unreadable"])) for company, c in counts.items()
    ]
    lines += [*_table(rows), ""]
    all_missing = set(report.missing)
    for company, c in counts.items():
        missing = [p for p in report.mapping.companies[company] if p in all_missing]
        lines.append(
            f"{company}: {c['healthy']} healthy, {c['suspicious']} suspicious, {c['unreadable']} unreadable"
            + (f", {len(missing)} without a directory" if missing else "")
        )
        lines += _phones([e for e in report.entries if e.company == company])
        if missing:
            lines.append(f"  Mapped but without a directory: {', '.join(missing)}")
        lines.append("")
    unmapped = [e for e in report.entries if e.company is None]
    if unmapped:
        lines += [f"Unmapped phone directories (no company in the mapping): {len(unmapped)}", *_phones(unmapped), ""]
    if report.ignored:
        lines += [f"Ignored (not phone numbers): {', '.join(quote(name) for name in report.ignored)}", ""]
    return "\n".join(lines)
