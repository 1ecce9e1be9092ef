"""`waso legacy scan`: Baileys auth directories judged per phone, counted per company, turned into manifests."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import run_waso
from waso.api.session import WhatsAppSession
from waso.legacy.command import scan_command
from waso.legacy.creds import Code, decode_buffer, judge_creds, parse_creds
from waso.legacy.manifests import ManifestError, namespace_for, namespaces, write_manifests
from waso.legacy.mapping import MappingError, load_mapping, normalize_phone, parse_csv, parse_yaml
from waso.legacy.scan import scan_tree

REPO = Path(__file__).resolve().parent.parent


def buffer(size: int, seed: int) -> dict[str, str]:
    """A BufferJSON value as Baileys writes it."""
    return {"type": "Buffer", "data": base64.b64encode(bytes((seed + i) % 256 for i in range(size))).decode()}


def key_pair(seed: int) -> dict[str, Any]:
    return {"private": buffer(32, seed), "public": buffer(32, seed + 1)}


def creds(me_id: str | None, **changes: Any) -> dict[str, Any]:
    """A creds.json of a device linked by QR code (registered stays false then), as Baileys writes it."""
    data: dict[str, Any] = {
        "noiseKey": key_pair(1),
        "pairingEphemeralKeyPair": key_pair(3),
        "signedIdentityKey": key_pair(5),
        "signedPreKey": {"keyPair": key_pair(7), "signature": buffer(64, 9), "keyId": 1},
        "registrationId": 4711,
        "advSecretKey": base64.b64encode(bytes(range(32))).decode(),
        "processedHistoryMessages": [],
        "nextPreKeyId": 31,
        "firstUnuploadedPreKeyId": 31,
        "accountSyncCounter": 0,
        "accountSettings": {"unarchiveChats": False},
        "registered": False,
    }
    if me_id is not None:
        data["me"] = {"id": me_id, "name": "Legacy", "lid": "123456789012345:3@lid"}
        data["account"] = {
            "details": buffer(40, 11),
            "accountSignatureKey": buffer(32, 13),
            "accountSignature": buffer(64, 15),
            "deviceSignature": buffer(64, 17),
        }
        data["platform"] = "android"
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def auth_dir(root: Path, name: str, content: dict[str, Any] | list[Any] | str | None) -> Path:
    """A Baileys multi-file auth directory; content None: no creds.json; a str: written as is."""
    directory = root / name
    directory.mkdir()
    (directory / "pre-key-1.json").write_text(json.dumps({"private": buffer(32, 1), "public": buffer(32, 2)}))
    (directory / "app-state-sync-key-AAAAAAAA.json").write_text("{}")
    if content is not None:
        text = content if isinstance(content, str) else json.dumps(content)
        (directory / "creds.json").write_text(text)
    return directory


MAPPING_CSV = """\
phone,company
+51 949 376 824,Acme
51949376825,Acme
+51949376826,Globex Corporation
51949376827,Acme
51949376828,Globex Corporation
51949376829,Acme
51949376830,Globex Corporation
51949376831,Globex Corporation
51949376833,Acme
51949376834,Initech
51949376835,Initech
51949376836,Initech
51949376837,Initech
"""


@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path]:
    """The legacy tree and its mapping (CSV)."""
    root = tmp_path / "auth"
    root.mkdir()
    auth_dir(root, "51949376824", creds("51949376824:3@s.whatsapp.net"))  # good
    auth_dir(root, "51949376825", creds("51949376825:47@s.whatsapp.net"))  # high device: normal
    auth_dir(root, "+51949376826", creds("51949376826.0:5@s.whatsapp.net"))  # '+' directory, agent part
    auth_dir(root, "51949376827", creds("51949376827-3@whatsapp"))  # malformed me.id
    full = json.dumps(creds("51949376828:2@s.whatsapp.net"))
    auth_dir(root, "51949376828", full[: len(full) // 2])  # truncated
    auth_dir(root, "51949376829", creds("51949376829@s.whatsapp.net"))  # no device number
    auth_dir(root, "51949376830", None)  # no creds.json
    auth_dir(root, "51949376831", creds("51949376899:2@s.whatsapp.net"))  # another phone's device
    auth_dir(root, "51949376832", creds("51949376832:9@s.whatsapp.net"))  # no company
    # 51949376833: mapped, no directory
    auth_dir(root, "51949376834", creds("51949376834:4@s.whatsapp.net", advSecretKey=None, account=None))
    (root / "51949376835").symlink_to(root / "51949376824")  # symlinks are not followed
    auth_dir(root, "51949376836", [])  # JSON, not an object
    auth_dir(root, "51949376837", None)
    (root / "51949376837" / "creds.json").mkdir()  # not a readable file
    (root / "notes.txt").write_text("exported 2025\n")
    (root / ".DS_Store").write_text("")
    mapping = tmp_path / "mapping.csv"
    mapping.write_text(MAPPING_CSV)
    return root, mapping


EXPECTED_COUNTS = {
    "Acme": {"healthy": 2, "suspicious": 2, "unreadable": 0},
    "Globex Corporation": {"healthy": 1, "suspicious": 1, "unreadable": 2},
    "Initech": {"healthy": 0, "suspicious": 1, "unreadable": 3},
}
EXPECTED_FINDINGS = [
    ("51949376827", "Acme", "suspicious", "MalformedJid"),
    ("51949376828", "Globex Corporation", "unreadable", "InvalidJson"),
    ("51949376829", "Acme", "suspicious", "NoDeviceNumber"),
    ("51949376830", "Globex Corporation", "unreadable", "MissingCreds"),
    ("51949376831", "Globex Corporation", "suspicious", "IdentityMismatch"),
    ("51949376834", "Initech", "suspicious", "MissingKeys"),
    ("51949376835", "Initech", "unreadable", "Symlink"),
    ("51949376836", "Initech", "unreadable", "NotAnObject"),
    ("51949376837", "Initech", "unreadable", "UnreadableFile"),
]


def test_scan_report(tree: tuple[Path, Path]) -> None:
    root, mapping = tree
    report = scan_tree(root, load_mapping(mapping)).to_json()
    assert {key: report[key] for key in ("companies", "unmapped")} == {
        "companies": EXPECTED_COUNTS,
        "unmapped": ["51949376832"],
    }
    assert report["missing"] == ["51949376833"]
    assert report["ignored"] == ["notes.txt"]
    assert [(f["directory"], f["company"], f["state"], f["code"]) for f in report["findings"]] == EXPECTED_FINDINGS
    messages = {f["directory"]: f["message"] for f in report["findings"]}
    assert "belongs to 51949376899, not to the directory's phone 51949376831" in messages["51949376831"]
    assert "truncated" in messages["51949376828"]
    assert messages["51949376834"] == ("creds.json lacks advSecretKey, account: the device cannot connect as itself")
    assert set(report) == {"companies", "unmapped", "missing", "findings", "ignored"}


def test_text_report_names_every_finding(tree: tuple[Path, Path]) -> None:
    root, mapping = tree
    from waso.legacy.scan import render_text

    text = render_text(scan_tree(root, load_mapping(mapping)))
    lines = text.splitlines()
    assert lines[2].split() == ["COMPANY", "HEALTHY", "SUSPICIOUS", "UNREADABLE"]
    assert lines[3].split() == ["Acme", "2", "2", "0"]
    assert lines[4].split() == ["Globex", "Corporation", "1", "1", "2"]
    for directory, _, state, code in EXPECTED_FINDINGS:
        assert [directory, state, code] in [line.split() for line in lines], directory  # the company's table
        assert any(line.split()[:2] == [directory, f"{code}:"] for line in lines if line.strip()), directory
    assert "Mapped but without a directory: 51949376833" in text
    assert "Unmapped phone directories (no company in the mapping): 1" in text
    assert 'Ignored (not phone numbers): "notes.txt"' in text


def test_cli_subprocess(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, mapping = tree

    def waso(*args: str) -> subprocess.CompletedProcess[str]:
        return run_waso("legacy", "scan", *args, timeout=60)

    done = waso(str(root), "--mapping", str(mapping), "-o", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == scan_tree(root, load_mapping(mapping)).to_json()

    text = waso(str(root), "--mapping", str(mapping))
    assert text.returncode == 0
    assert "IdentityMismatch" in text.stdout

    missing = waso(str(tmp_path / "nowhere"), "--mapping", str(mapping))
    assert missing.returncode == 2
    assert "nowhere: no such directory" in missing.stderr
    bad_mapping = tmp_path / "mapping.json"
    bad_mapping.write_text("{}")
    wrong = waso(str(root), "--mapping", str(bad_mapping))
    assert wrong.returncode == 2
    assert "unknown mapping format '.json'" in wrong.stderr
    unreadable = waso(str(root), "--mapping", str(tmp_path / "absent.csv"))
    assert unreadable.returncode == 2
    assert "cannot read the mapping" in unreadable.stderr
    assert waso(str(root)).returncode == 2  # --mapping is required


def test_write_manifests(tree: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, mapping = tree
    out = tmp_path / "manifests"
    assert scan_command(str(root), str(mapping), "json", str(out)) == 0
    assert json.loads(capsys.readouterr().out)["companies"] == EXPECTED_COUNTS
    files = sorted(p.name for p in out.iterdir())
    assert files == ["acme.yaml", "globex-corporation.yaml", "initech.yaml"]

    documents = {name: list(yaml.safe_load_all((out / name).read_text())) for name in files}
    sessions: dict[str, list[str]] = {}
    for name, docs in documents.items():
        namespace = docs[0]
        assert namespace == {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name.removesuffix(".yaml"),
                "labels": {"pod-security.kubernetes.io/enforce": "restricted"},
            },
        }
        for doc in docs[1:]:
            session = WhatsAppSession.model_validate(doc)
            assert session.metadata.namespace == namespace["metadata"]["name"]
            assert session.metadata.name == "s-" + session.spec.phone_number.removeprefix("+")
        sessions[name] = [doc["spec"]["phoneNumber"] for doc in docs[1:]]
    assert sessions == {
        "acme.yaml": ["+51949376824", "+51949376825", "+51949376827", "+51949376829"],
        "globex-corporation.yaml": ["+51949376826", "+51949376831"],
        "initech.yaml": ["+51949376834"],
    }
    acme = (out / "acme.yaml").read_text()
    assert "#   51949376833: mapped, but no directory in the scan" in acme
    assert "# suspicious legacy credentials: NoDeviceNumber:" in acme
    initech = (out / "initech.yaml").read_text()
    for phone, code in [("51949376835", "Symlink"), ("51949376836", "NotAnObject"), ("51949376837", "UnreadableFile")]:
        assert f"#   {phone}: unreadable: {code}:" in initech
    assert "s-51949376835" not in initech

    before = {name: (out / name).read_bytes() for name in files}
    write_manifests(scan_tree(root, load_mapping(mapping)), out)
    assert {name: (out / name).read_bytes() for name in files} == before  # deterministic


def test_manifests_refuse_unusable_company_names(tree: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = tree
    clash = tmp_path / "clash.yaml"
    clash.write_text("Acme Inc: ['+51949376824']\nACME inc.: ['+51949376825']\n")
    assert scan_command(str(root), str(clash), "json", str(tmp_path / "out")) == 2
    assert not (tmp_path / "out").exists()
    with pytest.raises(ManifestError, match="share a namespace"):
        namespaces(load_mapping(clash))
    assert namespace_for("Société Générale") == "societe-generale"
    for name in ("Default", "kube system", "!!!"):
        with pytest.raises(ManifestError):
            namespace_for(name)


def test_mapping_formats(tmp_path: Path) -> None:
    by_company = parse_yaml("acme:\n  - '+51949376824'\n  - 51949376825\nglobex: ['+1 415 555 0101']\nempty: []\n")
    assert by_company.companies == {
        "acme": ("51949376824", "51949376825"),
        "empty": (),
        "globex": ("14155550101",),
    }
    by_phone = parse_yaml("'+51949376824': acme\n51949376825: acme\n+14155550101: globex\n")
    assert by_phone.by_phone == {"14155550101": "globex", "51949376824": "acme", "51949376825": "acme"}
    reordered = parse_csv("\ufeffcompany , Phone,notes\nacme,+51949376824,x\n\nglobex,(1) 415-555-0101,\n")
    assert reordered.by_phone == {"14155550101": "globex", "51949376824": "acme"}
    assert normalize_phone("+51 949-376.824") == "51949376824"
    assert normalize_phone("51949376824x") is None
    assert normalize_phone(True) is None

    for text, problem in [
        ("acme: ['+51949376824']\n'+51949376825': globex\n", "mixes"),
        ("'+51949376824': acme\n'51949376824': globex\n", "two companies"),
        ("acme: [hello]\n", "not a phone number"),
        ("- 51949376824\n", "must be a mapping"),
        ("acme: [\n", "not valid YAML"),
    ]:
        with pytest.raises(MappingError, match=problem):
            parse_yaml(text)
    for text, problem in [
        ("number,name\n1,acme\n", "header must name"),
        ("phone,company\n51949376824\n", "line 2: expected the columns"),
        ("phone,company\n51949376824,\n", "not a company name"),
        ("", "empty"),
    ]:
        with pytest.raises(MappingError, match=problem):
            parse_csv(text)
    yml = tmp_path / "m.yml"
    yml.write_text("acme: ['+51949376824']\n")
    assert load_mapping(yml).company_of("51949376824") == "acme"


@pytest.mark.parametrize(
    ("me_id", "codes"),
    [
        ("51949376824:1@s.whatsapp.net", []),
        ("51949376824:53@s.whatsapp.net", []),
        ("51949376824.0:3@s.whatsapp.net", []),
        ("51949376824.1:3@s.whatsapp.net", [Code.MALFORMED_JID]),
        ("51949376824:0@s.whatsapp.net", [Code.PRIMARY_DEVICE]),
        ("51949376824@s.whatsapp.net", [Code.NO_DEVICE_NUMBER]),
        ("51949376899@s.whatsapp.net", [Code.NO_DEVICE_NUMBER, Code.IDENTITY_MISMATCH]),
        ("123456789012345:3@lid", [Code.MALFORMED_JID]),
        ("", [Code.MALFORMED_JID]),
    ],
)
def test_identity_rules(me_id: str, codes: list[Code]) -> None:
    assert [f.code for f in judge_creds(creds(me_id), "51949376824")] == codes


def test_key_material_rules() -> None:
    phone = "51949376824"
    me = f"{phone}:3@s.whatsapp.net"
    assert judge_creds(creds(me, registered=True), phone) == []
    assert [f.code for f in judge_creds(creds(None), phone)] == [Code.NOT_PAIRED]  # no account expected yet
    assert [f.code for f in judge_creds(creds(me, me={"name": "x"}), phone)] == [Code.MALFORMED_JID]
    short = creds(me, noiseKey={"private": buffer(31, 1), "public": buffer(32, 2)})
    (finding,) = judge_creds(short, phone)
    assert finding.code == Code.INVALID_KEYS
    assert "noiseKey.private has 31 bytes, not 32" in finding.message
    broken = creds(me, registrationId="4711", advSecretKey="%%%", signedPreKey={"keyPair": key_pair(1)})
    (finding,) = judge_creds(broken, phone)
    assert "registrationId" in finding.message
    assert "advSecretKey" in finding.message
    assert "signedPreKey.signature is not a BufferJSON byte string" in finding.message
    # Node's own Buffer.toJSON (a list of byte values) is read too.
    as_list = creds(me, noiseKey={"private": {"type": "Buffer", "data": list(range(32))}, "public": buffer(32, 1)})
    assert judge_creds(as_list, phone) == []
    assert decode_buffer({"type": "Buffer", "data": "not base64!"}) is None
    assert decode_buffer({"buffer": True, "value": "AAE="}) == b"\x00\x01"
    # Baileys writes the protobuf fields of account (the signed device identity) as plain base64 text.
    text = {name: value["data"] for name, value in creds(me)["account"].items()}
    assert judge_creds(creds(me, account=text), phone) == []
    (finding,) = judge_creds(creds(me, account={**text, "deviceSignature": "%%%"}), phone)
    assert "account.deviceSignature is not BufferJSON or base64 bytes" in finding.message


def test_parse_creds_never_raises() -> None:
    for raw, code in [
        (b"", Code.INVALID_JSON),
        (b'{"me": {"id": "519', Code.INVALID_JSON),
        (b"\xff\xfe{}", Code.INVALID_JSON),
        (b"[" * 100000, Code.INVALID_JSON),
        (b'{"registrationId": ' + b"1" * 5000 + b"}", Code.INVALID_JSON),  # too long for int()
        (b'"creds"', Code.NOT_AN_OBJECT),
        (b"null", Code.NOT_AN_OBJECT),
    ]:
        result = parse_creds(raw)
        assert not isinstance(result, dict)
        assert result.code == code, raw[:20]
    assert parse_creds(b'{"me": {"id": "519').message.endswith("truncated")


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = st.sampled_from(
    ["me", "noiseKey", "signedIdentityKey", "signedPreKey", "registrationId", "advSecretKey", "account"]
)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=200), changes=st.dictionaries(FIELDS, JSON, max_size=4))
def test_any_content_is_a_finding_never_a_crash(raw: bytes, changes: dict[str, Any]) -> None:
    result = parse_creds(raw)
    if isinstance(result, dict):
        judge_creds(result, "51949376824")
    findings = judge_creds(creds("51949376824:3@s.whatsapp.net", **changes), "51949376824")
    for finding in findings:
        assert "\n" not in finding.message


def test_duplicate_and_invalid_phone_directories(tmp_path: Path) -> None:
    root = tmp_path / "auth"
    root.mkdir()
    auth_dir(root, "51949376824", creds("51949376824:3@s.whatsapp.net"))
    auth_dir(root, "+51949376824", creds("51949376824:4@s.whatsapp.net"))
    auth_dir(root, "0123", creds("0123:4@s.whatsapp.net"))
    (root / "51949376825").write_text("{}")  # a file, not a directory
    mapping = parse_csv("phone,company\n51949376824,acme\n0123,acme\n51949376825,acme\n")
    report = scan_tree(root, mapping)
    assert [(e.directory, e.state.value, [f.code.value for f in e.findings]) for e in report.entries] == [
        ("0123", "suspicious", ["InvalidPhone", "MalformedJid"]),
        ("+51949376824", "suspicious", ["DuplicatePhone"]),
        ("51949376824", "suspicious", ["DuplicatePhone"]),
        ("51949376825", "unreadable", ["NotADirectory"]),
    ]
    out = tmp_path / "out"
    write_manifests(report, out)
    docs = list(yaml.safe_load_all((out / "acme.yaml").read_text()))
    assert [d["metadata"]["name"] for d in docs] == ["acme", "s-51949376824"]  # one session per phone
    assert "0123: refused by the WhatsAppSession schema" in (out / "acme.yaml").read_text()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_permissions(tmp_path: Path) -> None:
    root = tmp_path / "auth"
    root.mkdir()
    directory = auth_dir(root, "51949376824", creds("51949376824:3@s.whatsapp.net"))
    (directory / "creds.json").chmod(0)
    closed = auth_dir(root, "51949376825", creds("51949376825:3@s.whatsapp.net"))
    closed.chmod(0)
    try:
        report = scan_tree(root, parse_csv("phone,company\n51949376824,acme\n"))
    finally:
        closed.chmod(0o755)
    assert [(e.directory, [f.code for f in e.findings]) for e in report.entries] == [
        ("51949376824", [Code.UNREADABLE_FILE]),
        ("51949376825", [Code.UNREADABLE_FILE]),
    ]


def test_permission_denied_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same as above for root, who reads every file: os.open refuses as it would for another user."""
    root = tmp_path / "auth"
    root.mkdir()
    auth_dir(root, "51949376824", creds("51949376824:3@s.whatsapp.net"))
    auth_dir(root, "51949376825", creds("51949376825:3@s.whatsapp.net"))
    real_open = os.open

    def refusing_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if "51949376824" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr("waso.legacy.scan.os.open", refusing_open)
    report = scan_tree(root, parse_csv("phone,company\n51949376824,acme\n51949376825,acme\n"))
    assert report.to_json()["companies"] == {"acme": {"healthy": 1, "suspicious": 0, "unreadable": 1}}
    assert report.entries[0].findings[0].message == "cannot read creds.json: Permission denied"
