"""UPIDs and the generated certificate."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509

from labkeeper.pvesim.tasks import make_upid, parse_upid
from labkeeper.pvesim.tls import format_fingerprint, generate_cert


def test_upid_has_pve_format_and_round_trips() -> None:
    upid = make_upid("pve1", 0x20C066, 0x042DF204, 0x69C26EB0, "vzdump", "", "root@pam")
    # same layout as ../shared/fixtures/pve/node-tasks-list-pve9.1.ha.json
    assert upid == "UPID:pve1:0020C066:042DF204:69C26EB0:vzdump::root@pam:"
    parsed = parse_upid(upid)
    assert parsed == {"node": "pve1", "pid": 0x20C066, "pstart": 0x042DF204,
                      "starttime": 0x69C26EB0, "type": "vzdump", "id": "", "user": "root@pam"}


def test_upid_of_token_user_parses() -> None:
    upid = make_upid("pve1", 1, 2, 3, "vzcreate", "101", "labkeeper@pve!ci")
    assert parse_upid(upid)["user"] == "labkeeper@pve!ci"


def test_garbage_is_not_a_upid() -> None:
    assert parse_upid("UPID:nope") is None


def test_generated_cert_has_loopback_san_and_matching_fingerprint(tmp_path: Path) -> None:
    files = generate_cert(tmp_path)
    cert = x509.load_pem_x509_certificate(files.cert_file.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    from cryptography.hazmat.primitives.serialization import Encoding

    assert files.fingerprint == format_fingerprint(cert.public_bytes(Encoding.DER))
    assert len(files.fingerprint.split(":")) == 32 and files.fingerprint.isupper() is True
    assert files.key_file.stat().st_mode & 0o777 == 0o600
