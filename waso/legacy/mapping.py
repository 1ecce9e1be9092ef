"""The phone→company mapping of the legacy gateway, from CSV or YAML (chosen by the file's extension).

CSV: a header row naming the columns ``phone`` and ``company`` (in any order, other columns
ignored), then one row per phone. YAML: either ``company: [phone, ...]`` or ``phone: company``
for the whole file. Phones are written in international form with or without ``+``; spaces,
dashes, dots and parentheses are ignored; they are compared as digits. A phone mapped to two
companies is an error, not a guess.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

CSV_SUFFIXES = (".csv",)
YAML_SUFFIXES = (".yaml", ".yml")
_SEPARATORS = re.compile(r"[\s\-().]")
_PHONE = re.compile(r"^\+?([0-9]+)$")


class MappingError(Exception):
    """The mapping file cannot be used; the message says why and where."""


@dataclass(frozen=True)
class CompanyMapping:
    companies: dict[str, tuple[str, ...]]
    """Company → its phones (digits), both sorted."""
    by_phone: dict[str, str] = field(default_factory=dict)

    def company_of(self, phone: str) -> str | None:
        return self.by_phone.get(phone)


def normalize_phone(value: object) -> str | None:
    """The digits of a phone number as written in a mapping (``+51 949 376 824``, ``51949376824``), or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value) if value > 0 else None
    if not isinstance(value, str):
        return None
    match = _PHONE.match(_SEPARATORS.sub("", value))
    return match[1] if match else None


def build_mapping(pairs: Iterable[tuple[str, str, str]], companies: Iterable[str] = ()) -> CompanyMapping:
    """From (phone digits, company, where) triples; ``companies`` may name companies without phones."""
    by_phone: dict[str, str] = {}
    where_of: dict[str, str] = {}
    phones: dict[str, set[str]] = {company: set() for company in companies}
    for phone, company, where in pairs:
        known = by_phone.get(phone)
        if known is not None and known != company:
            raise MappingError(
                f"phone {phone} is mapped to two companies: {known!r} ({where_of[phone]}) and {company!r} ({where})"
            )
        by_phone[phone] = company
        where_of.setdefault(phone, where)
        phones.setdefault(company, set()).add(phone)
    if not phones:
        raise MappingError("the mapping names no phone and no company")
    return CompanyMapping(
        companies={company: tuple(sorted(phones[company])) for company in sorted(phones)},
        by_phone=dict(sorted(by_phone.items())),
    )


def _company(value: object, where: str) -> str:
    if isinstance(value, int | str) and not isinstance(value, bool) and str(value).strip():
        return str(value).strip()
    raise MappingError(f"{where}: {value!r} is not a company name")


def _phone(value: object, where: str) -> str:
    phone = normalize_phone(value)
    if phone is None:
        raise MappingError(f"{where}: {value!r} is not a phone number (digits, optionally with a leading +)")
    return phone


def parse_csv(text: str) -> CompanyMapping:
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff")))
    header: list[str] | None = None
    pairs: list[tuple[str, str, str]] = []
    phone_col = company_col = 0
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"line {reader.line_num}"
            if header is None:
                header = [cell.strip().lower() for cell in row]
                if "phone" not in header or "company" not in header:
                    raise MappingError(f"{where}: the header must name the columns phone and company, not {row!r}")
                phone_col, company_col = header.index("phone"), header.index("company")
                continue
            if len(row) <= max(phone_col, company_col):
                raise MappingError(f"{where}: expected the columns {', '.join(header)}, got {row!r}")
            pairs.append((_phone(row[phone_col].strip(), where), _company(row[company_col], where), where))
    except csv.Error as error:
        raise MappingError(f"line {reader.line_num}: {error}") from error
    if header is None:
        raise MappingError("the CSV file is empty: it needs a header row phone,company")
    return build_mapping(pairs)


def parse_yaml(text: str) -> CompanyMapping:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise MappingError(f"not valid YAML: {error}") from error
    if not isinstance(data, dict) or not data:
        raise MappingError("the YAML file must be a mapping: company: [phone, ...] or phone: company")
    lists = [isinstance(value, list) for value in data.values()]
    if all(lists):
        companies = [_company(key, f"company {key!r}") for key in data]
        pairs = [
            (_phone(phone, f"company {company!r}"), company, f"company {company!r}")
            for company, phones in zip(companies, data.values(), strict=True)
            for phone in phones
        ]
        return build_mapping(pairs, companies)
    if not any(lists):
        return build_mapping(
            (_phone(key, f"entry {key!r}"), _company(value, f"phone {key!r}"), f"entry {key!r}")
            for key, value in data.items()
        )
    raise MappingError("the YAML file mixes company: [phone, ...] and phone: company entries; use one form")


def load_mapping(path: Path) -> CompanyMapping:
    """The mapping in ``path``; MappingError names the file and the problem."""
    suffix = path.suffix.lower()
    if suffix not in CSV_SUFFIXES + YAML_SUFFIXES:
        raise MappingError(f"{path}: unknown mapping format {suffix or '(no extension)'!r}; use .csv, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise MappingError(f"{path}: cannot read the mapping: {error}") from error
    try:
        return parse_csv(text) if suffix in CSV_SUFFIXES else parse_yaml(text)
    except MappingError as error:
        raise MappingError(f"{path}: {error}") from error
