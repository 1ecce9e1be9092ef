"""WhatsAppSession manifests from a legacy scan, one YAML file per company, for a GitOps import.

Each file holds the company's Namespace (a DNS-1123 label derived from the company name, with
PodSecurity ``restricted`` enforced, as every waso tenant namespace) and one WhatsAppSession per
phone whose credentials are healthy or suspicious, named ``s-<digits>`` with spec.phoneNumber
``+<digits>`` and nothing else (defaults apply). Every session is validated with the API model
before it is written. Unreadable phones, mapped phones without a directory and phones the API
would refuse are listed as YAML comments, not as sessions. The output depends only on the scan:
no timestamps, no paths, sorted throughout.
"""

from __future__ import annotations

import os
import re
import tempfile
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from waso.api.base import API_VERSION
from waso.api.session import WhatsAppSession
from waso.legacy.creds import State
from waso.legacy.mapping import CompanyMapping
from waso.legacy.scan import Entry, ScanReport

POD_SECURITY_LABELS = {"pod-security.kubernetes.io/enforce": "restricted"}
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_RESERVED = ("default",)
_RESERVED_PREFIX = "kube-"


class ManifestError(Exception):
    """Manifests cannot be written as asked (company names, output directory); nothing was written."""


def namespace_for(company: str) -> str:
    """The tenant namespace of a company: lowercase ASCII letters and digits, other runs turned into '-'."""
    ascii_text = unicodedata.normalize("NFKD", company).encode("ascii", "ignore").decode("ascii").lower()
    name = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")[:63].rstrip("-")
    if not _DNS_LABEL.match(name):
        raise ManifestError(f"company {company!r} gives no usable namespace name: rename it in the mapping")
    if name in _RESERVED or name.startswith(_RESERVED_PREFIX):
        raise ManifestError(f"company {company!r} would use the reserved namespace {name!r}: rename it in the mapping")
    return name


def namespaces(mapping: CompanyMapping) -> dict[str, str]:
    """Company → namespace for every company of the mapping; two companies may not share one."""
    result = {company: namespace_for(company) for company in mapping.companies}
    owners: defaultdict[str, list[str]] = defaultdict(list)
    for company, namespace in result.items():
        owners[namespace].append(company)
    clashes = [f"{', '.join(map(repr, names))} -> {ns}" for ns, names in sorted(owners.items()) if len(names) > 1]
    if clashes:
        raise ManifestError(f"companies would share a namespace ({'; '.join(clashes)}): rename them in the mapping")
    return result


def session_name(phone: str) -> str:
    return f"s-{phone}"


def namespace_manifest(namespace: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace, "labels": POD_SECURITY_LABELS}}


def session_manifest(namespace: str, phone: str) -> dict[str, Any]:
    """The WhatsAppSession of a phone, validated with the API model (ValidationError when the API would refuse)."""
    manifest: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": WhatsAppSession.KIND,
        "metadata": {"name": session_name(phone), "namespace": namespace},
        "spec": {"phoneNumber": f"+{phone}"},
    }
    WhatsAppSession.model_validate(manifest)
    return manifest


def _comment(text: str) -> str:
    """A one-line YAML comment, whatever ``text`` holds."""
    return "# " + re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]+", " ", text)


def _findings(entries: list[Entry]) -> str:
    return "; ".join(f"{f.code.value}: {f.message}" for e in entries for f in e.findings)


def company_manifests(report: ScanReport, company: str, namespace: str) -> str:
    """The YAML text of one company's file."""
    by_phone: defaultdict[str, list[Entry]] = defaultdict(list)
    for entry in report.entries:
        if entry.company == company:
            by_phone[entry.phone].append(entry)
    documents: list[tuple[list[str], dict[str, Any]]] = [([], namespace_manifest(namespace))]
    skipped: list[str] = []
    for phone, entries in sorted(by_phone.items()):
        if all(e.state is State.UNREADABLE for e in entries):
            skipped.append(f"{phone}: unreadable: {_findings(entries)}")
            continue
        try:
            manifest = session_manifest(namespace, phone)
        except ValidationError as error:
            reasons = "; ".join(str(e["msg"]) for e in error.errors())
            skipped.append(f"{phone}: refused by the WhatsAppSession schema: {reasons}")
            continue
        notes = []
        if any(e.state is State.SUSPICIOUS for e in entries):
            notes.append(_comment(f"suspicious legacy credentials: {_findings(entries)}"))
        documents.append((notes, manifest))
    skipped += [
        f"{phone}: mapped, but no directory in the scan"
        for phone in report.mapping.companies[company]
        if phone not in by_phone
    ]
    header = [
        _comment(f"Company {company!r}: namespace {namespace}, from `waso legacy scan`."),
        "# Sessions pair afresh (a new QR scan) unless their Baileys credentials are imported.",
    ]
    if skipped:
        header.append("# Not imported as sessions:")
        header += [_comment(f"  {line}") for line in skipped]
    parts = ["\n".join(header)]
    for notes, document in documents:
        text = yaml.safe_dump(document, sort_keys=False, default_flow_style=False, allow_unicode=False)
        parts.append("\n".join(["---", *notes, text.rstrip("\n")]))
    return "\n".join(parts) + "\n"


def check_output(out: Path) -> None:
    """Create the output directory, or say why it cannot be used (before any scanning)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ManifestError(f"{out}: cannot create the output directory: {error.strerror or error}") from error
    if not os.access(out, os.W_OK | os.X_OK):
        raise ManifestError(f"{out}: the output directory is not writable")


def write_manifests(report: ScanReport, out: Path) -> list[Path]:
    """One ``<namespace>.yaml`` per company in ``out``, each replaced atomically; the files written, sorted."""
    names = namespaces(report.mapping)
    check_output(out)
    written: list[Path] = []
    for company, namespace in sorted(names.items(), key=lambda item: item[1]):
        target = out / f"{namespace}.yaml"
        text = company_manifests(report, company, namespace)
        temporary: str | None = None
        try:
            with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=out, suffix=".tmp", delete=False) as file:
                temporary = file.name
                file.write(text)
            os.chmod(temporary, 0o644)  # manifests are not secrets; the temporary file was 0600
            os.replace(temporary, target)
        except OSError as error:
            if temporary is not None:
                Path(temporary).unlink(missing_ok=True)
            raise ManifestError(f"{target}: cannot write: {error.strerror or error}") from error
        written.append(target)
    return written
