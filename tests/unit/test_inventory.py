"""The inventory: models, YAML loading with file:line problems, cross-references."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from labkeeper.errors import ConfigError
from labkeeper.inventory import (
    Inventory,
    Problem,
    check_cron,
    load_inventory,
    parse_inventory,
    problems_report,
    validate_file,
    validate_text,
)
from labkeeper.secrets import check_reference

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "lab.example.yaml"

# A small valid inventory. Line numbers matter to several tests: keep it stable.
BASE = """\
version: 1
lab: {name: homelab}
proxmox:
  host: pve1.home.arpa
  token_id: labkeeper@pve!automation
  token_secret: env:PVE_TOKEN_SECRET
  nodes:
    - {name: pve1}
    - {name: pve2}
  storages:
    - {name: local, type: dir, content: [vztmpl, backup]}
    - {name: local-lvm, type: lvmthin, content: [images, rootdir]}
ssh:
  key: file:/etc/labkeeper/id_ed25519
hosts:
  - {name: nas, address: 10.0.0.5, user: backup}
guests:
  - name: db1
    vmid: 110
    type: lxc
    node: pve1
    template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
    resources: {cores: 2, memory_mb: 2048, disk_gb: 16, storage: local-lvm}
    network: [{ip: 10.0.0.30/24, gateway: 10.0.0.1}]
    ssh: {}
    roles: [postgres]
  - name: app1
    vmid: 120
    type: lxc
    node: pve2
    template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst
    resources: {storage: local-lvm}
    network: [{ip: 10.0.0.31/24}]
    ssh: {user: admin}
roles:
  postgres: {packages: [postgresql]}
databases:
  - name: immich
    guest: db1
    password: env:PG_IMMICH_PASSWORD
    repository: b2-main
    drill: {enabled: true, server: local, smoke_queries: [{sql: "SELECT 1", equals: 1}]}
repositories:
  - name: b2-main
    url: s3:https://s3.example.com/bucket1/restic
    password: file:/etc/labkeeper/restic-password
    s3:
      endpoint: https://s3.example.com
      bucket: bucket1
      access_key_id: env:B2_KEY_ID
      secret_access_key: env:B2_APP_KEY
vzdump_jobs:
  - name: weekly
    selection: {all: true, exclude: [110]}
    storage: local
    retention: {keep_weekly: 4}
    schedule: "0 1 * * 6"
    offsite: {repository: b2-main}
apps:
  - name: immich
    guest: app1
    compose: {dir: /opt/immich}
    health: [{http: {url: "http://10.0.0.31:2283/api/server/ping"}}]
    databases: [immich]
path_backups:
  - {name: photos, host: nas, paths: [/volume1/photos]}
notifications:
  apprise: [env:APPRISE_URL]
  on: [failure]
"""


def base() -> dict[str, Any]:
    return yaml.safe_load(BASE.replace("  on: [failure]", "  'on': [failure]"))


def dump(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)


def line_of(text: str, needle: str, occurrence: int = 1) -> int:
    seen = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if needle in line:
            seen += 1
            if seen == occurrence:
                return n
    raise AssertionError(f"{needle!r} not in text")


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def by_path(problems: list[Problem], path: str) -> Problem:
    found = [p for p in problems if p.path == path]
    assert found, f"no problem at {path}: {[str(p) for p in problems]}"
    return found[0]


# ---- the example and the base ---------------------------------------------------------


def test_example_inventory_is_valid_and_complete():
    assert validate_file(EXAMPLE) == []
    inv = load_inventory(EXAMPLE)
    assert inv.proxmox is not None
    assert len(inv.proxmox.nodes) == 3
    assert len(inv.guests) >= 12
    assert {g.type for g in inv.guests} == {"lxc", "qemu"}
    # immich and nextcloud on the shared server, n8n inside its stack's container
    assert [d.name for d in inv.databases] == ["immich", "nextcloud", "n8n"]
    assert [d.name for d in inv.databases if d.container is not None] == ["n8n"]
    assert [r.name for r in inv.repositories] == ["b2-main"]
    assert len(inv.vzdump_jobs) >= 2
    assert {a.name for a in inv.apps} >= {"immich", "nextcloud", "n8n", "vaultwarden"}
    assert all(a.health for a in inv.apps)
    assert inv.path_backups and inv.notifications.apprise


def test_example_secret_refs_are_all_references():
    inv = load_inventory(EXAMPLE)
    refs = inv.secret_refs()
    assert "env:PVE_TOKEN_SECRET" in refs
    assert "file:/etc/labkeeper/restic-password" in refs
    assert "env:B2_APP_KEY" in refs
    assert "env:WEBAPP_DJANGO_SECRET" in refs  # nested in a role's compose secrets dict
    assert "env:HC_PG_BACKUP_UUID" in refs  # a dict of pings
    assert "file:/etc/labkeeper/apprise-discord-url" in refs  # a list of apprise URLs
    assert len(refs) == len(set(refs))
    for ref in refs:
        assert check_reference(ref) == ref


def test_base_inventory_is_valid():
    assert validate_text(BASE, "lab.yaml") == []


def test_ssh_targets_merge_defaults_for_hosts_and_guests():
    inv = parse_inventory(BASE, "lab.yaml")
    targets = inv.ssh_targets()
    assert set(targets) == {"nas", "db1", "app1"}
    nas = targets["nas"]
    assert (nas.kind, nas.address, nas.port, nas.user) == ("host", "10.0.0.5", 22, "backup")
    assert nas.key == "file:/etc/labkeeper/id_ed25519"
    assert nas.known_hosts == Path("/etc/labkeeper/known_hosts")
    assert nas.trust_on_first_use is False and nas.connect_timeout == 10
    db1 = targets["db1"]
    assert (db1.kind, db1.address, db1.user, db1.vmid) == ("guest", "10.0.0.30", "root", 110)
    assert targets["app1"].user == "admin"


def test_lookups_by_name_and_vmid():
    inv = parse_inventory(BASE, "lab.yaml")
    assert inv.guest("db1").vmid == 110
    assert inv.guest(120).name == "app1"
    assert inv.guest("120").name == "app1"
    assert inv.database("immich").effective_dbname == "immich"
    assert inv.repository("b2-main").s3 is not None
    assert inv.database_address("immich") == ("10.0.0.30", 5432)
    assert inv.repository_for(inv.path_backup("photos")).name == "b2-main"
    assert inv.drill_server("local").host is None
    assert inv.rollback_mode("immich") == "snapshot"  # lvmthin has snapshots


def test_unknown_lookup_raises_config_error_with_hint():
    inv = parse_inventory(BASE, "lab.yaml")
    with pytest.raises(ConfigError, match=r"did you mean 'immich'"):
        inv.database("imich")


def test_retention_renders_restic_and_pve_arguments():
    inv = parse_inventory(BASE, "lab.yaml")
    assert inv.repository("b2-main").retention.restic_args() == (
        "--keep-daily", "7", "--keep-weekly", "4", "--keep-monthly", "12",
    )
    assert inv.vzdump_job("weekly").retention.as_pve() == "keep-weekly=4"


# ---- schema errors: file, line, path ---------------------------------------------------


def test_bad_vmid_names_file_line_and_path():
    text = BASE.replace("vmid: 120", "vmid: 42")
    p = only(validate_text(text, "lab.yaml"))
    assert p.line == line_of(text, "vmid: 42")
    assert p.path == "guests[1].vmid"
    assert str(p) == f"lab.yaml:{p.line} guests[1].vmid: must be ≥ 100"


def test_unknown_key_is_an_error_with_did_you_mean():
    text = BASE.replace("    vmid: 120", "    vmdi: 120")
    problems = validate_text(text, "lab.yaml")
    unknown = by_path(problems, "guests[1].vmdi")
    assert unknown.line == line_of(text, "vmdi: 120")
    assert "unknown key 'vmdi'" in unknown.message
    assert "did you mean 'vmid'?" in unknown.message
    missing = by_path(problems, "guests[1].vmid")
    assert "required" in missing.message


def test_unknown_key_without_a_close_match_has_no_hint():
    text = BASE.replace("lab: {name: homelab}", "lab: {name: homelab, colour: blue}")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "lab.colour" and p.line == 2
    assert p.message == "unknown key 'colour'"


def test_unknown_top_level_key_suggests_the_section():
    text = BASE + "repositorys: []\n"
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "repositorys"
    assert "did you mean 'repositories'?" in p.message


def test_yaml_syntax_error_names_the_line():
    text = BASE.replace("    type: lxc\n    node: pve2", "    type: lxc\n   node: [pve2")
    p = only(validate_text(text, "lab.yaml"))
    assert p.file == "lab.yaml" and p.line is not None
    assert abs(p.line - line_of(text, "node: [pve2")) <= 2
    assert "YAML syntax error" in p.message
    assert str(p).startswith(f"lab.yaml:{p.line}: YAML syntax error")


def test_duplicate_key_is_an_error_with_both_lines():
    text = BASE.replace("    vmid: 120\n", "    vmid: 120\n    vmid: 121\n")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "guests[1].vmid"
    assert p.line == line_of(text, "vmid: 121")
    assert f"first defined at line {line_of(text, 'vmid: 120')}" in p.message


def test_merge_keys_may_override_without_being_duplicates():
    text = BASE.replace(
        "    resources: {storage: local-lvm}\n",
        "    resources:\n      <<: {cores: 1, storage: local-lvm}\n      cores: 4\n",
    )
    inv = parse_inventory(text, "lab.yaml")
    assert inv.guest("app1").resources.cores == 4


def test_yaml_dialect_keeps_on_no_and_times_as_strings():
    text = BASE.replace(
        "    databases: [immich]\n",
        "    databases: [immich]\n"
        "    maintenance_window: {days: [sat], start: 22:00, end: 05:30}\n",
    )
    inv = parse_inventory(text, "lab.yaml")
    window = inv.app("immich").maintenance_window
    assert window is not None and (window.start, window.end) == ("22:00", "05:30")
    assert inv.notifications.on == ["failure"]
    bad = BASE.replace("    roles: [postgres]", "    roles: [postgres]\n    onboot: maybe")
    assert "true or false" in only(validate_text(bad, "lab.yaml")).message


def test_scalar_that_does_not_fit_its_tag_is_a_problem_with_its_line():
    text = BASE.replace("vmid: 120", "vmid: !!int abc")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "guests[1].vmid" and p.line == line_of(text, "!!int abc")


def test_empty_file_and_non_mapping_are_problems():
    assert "empty" in only(validate_text("", "lab.yaml")).message
    assert "mapping" in only(validate_text("- 1\n- 2\n", "lab.yaml")).message


def test_invalid_cron_names_the_field():
    text = BASE.replace('schedule: "0 1 * * 6"', 'schedule: "0 25 * * 6"')
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "vzdump_jobs[0].schedule"
    assert p.line == line_of(text, "0 25 * * 6")
    assert "hour" in p.message and "0-23" in p.message


@pytest.mark.parametrize(
    "expr",
    ["0 2 * * *", "*/15 * * * *", "0 1-5/2 1,15 jan-mar mon-fri", "30 4 * * 0", "0 0 * * 7"],
)
def test_valid_cron_expressions_are_accepted(expr):
    assert check_cron(expr) == expr


@pytest.mark.parametrize(
    "expr", ["0 2 * *", "60 * * * *", "* * 0 * *", "0 0 * 13 *", "0 0 * * 8", "5-1 * * * *",
             "*/0 * * * *", "x * * * *"],
)
def test_invalid_cron_expressions_are_rejected(expr):
    with pytest.raises(ValueError):
        check_cron(expr)


def test_tls_verify_false_needs_a_pinned_fingerprint():
    text = BASE.replace("  token_secret: env:PVE_TOKEN_SECRET\n",
                        "  token_secret: env:PVE_TOKEN_SECRET\n  tls: {verify: false}\n")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "proxmox.tls" and "fingerprint" in p.message
    pinned = text.replace("tls: {verify: false}",
                          "tls: {verify: false, fingerprint: '" + ":".join(["ab"] * 32) + "'}")
    inv = parse_inventory(pinned, "lab.yaml")
    assert inv.proxmox is not None and inv.proxmox.tls.fingerprint == ":".join(["AB"] * 32)


def test_token_id_must_be_user_realm_token():
    text = BASE.replace("labkeeper@pve!automation", "labkeeper@pve")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "proxmox.token_id" and "USER@REALM!TOKENNAME" in p.message


def test_gateway_outside_the_subnet_is_rejected():
    text = BASE.replace("gateway: 10.0.0.1", "gateway: 10.9.0.1")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "guests[0].network[0]" and "outside" in p.message


def test_qemu_guest_needs_a_template_vmid_and_lxc_a_volid():
    text = BASE.replace("    type: lxc\n    node: pve2", "    type: qemu\n    node: pve2")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "guests[1]" and "template" in p.message


def test_private_key_given_as_cloud_init_key_is_rejected_without_echo():
    marker = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7"
    text = BASE.replace(
        "    template: local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst\n"
        "    resources: {storage: local-lvm}",
        "    template: 9000\n    resources: {storage: local-lvm}\n"
        f"    cloud_init: {{ssh_keys: ['-----BEGIN PRIVATE KEY----- {marker}']}}",
    ).replace("    type: lxc\n    node: pve2", "    type: qemu\n    node: pve2")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "guests[1].cloud_init.ssh_keys[0]"
    assert "PRIVATE key" in p.message and marker not in str(p)


# ---- secrets -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "path"),
    [
        ("token_secret: env:PVE_TOKEN_SECRET", "proxmox.token_secret"),
        ("password: env:PG_IMMICH_PASSWORD", "databases[0].password"),
        ("secret_access_key: env:B2_APP_KEY", "repositories[0].s3.secret_access_key"),
        ("apprise: [env:APPRISE_URL]", "notifications.apprise[0]"),
    ],
)
def test_secret_value_pasted_for_a_reference_is_rejected_without_echo(old, path):
    secret = "Sup3r-S3cret-Value-Xy9"
    key = old.split(":")[0]
    new = f"{key}: [{secret}]" if "[" in old else f"{key}: {secret}"
    text = BASE.replace(old, new)
    problems = validate_text(text, "lab.yaml")
    p = by_path(problems, path)
    assert "secret reference" in p.message
    assert p.line == line_of(text, secret)
    assert all(secret not in str(q) for q in problems)
    with pytest.raises(ConfigError) as err:
        parse_inventory(text, "lab.yaml")
    assert secret not in str(err.value) and all(secret not in s for s in err.value.problems)


def test_secret_with_a_scheme_but_bad_body_is_not_echoed():
    text = BASE.replace("password: env:PG_IMMICH_PASSWORD", "password: 'env:hunter2 hunter2'")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "databases[0].password" and "hunter2" not in str(p)


def test_direct_model_validation_does_not_echo_inputs():
    data = base()
    data["proxmox"]["token_secret"] = "Sup3r-S3cret-Value-Xy9"
    with pytest.raises(ValidationError) as err:
        Inventory.model_validate(data)
    assert "Sup3r-S3cret-Value-Xy9" not in str(err.value)


# ---- cross-references ---------------------------------------------------------------------


def _xref(mutate: Any) -> tuple[str, list[Problem]]:
    data = base()
    mutate(data)
    text = dump(data)
    return text, validate_text(text, "lab.yaml")


def _set(path: tuple[Any, ...], value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        node = data
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return mutate


def _append(section: str, item: dict[str, Any], *, src: int | None = None) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        new = copy.deepcopy(data[section][src]) if src is not None else {}
        new.update(item)
        data[section].append(new)
    return mutate


XREF_CASES = [
    ("database-unknown-repository", _set(("databases", 0, "repository"), "b2-mian"),
     "databases[0].repository", "unknown repository 'b2-mian'", "did you mean 'b2-main'?"),
    ("duplicate-vmid", _append("guests", {"name": "db2", "network": [{"ip": "10.0.0.40/24"}]},
                                       src=0),
     "guests[2].vmid", "duplicate vmid 110", "guests[0]"),
    ("duplicate-guest-name", _append("guests", {"vmid": 130, "network": [{"ip": "10.0.0.41/24"}]},
                                             src=0),
     "guests[2].name", "duplicate guest name 'db1'", "guests[0]"),
    ("guest-named-like-a-host", _append("hosts", {"name": "db1", "address": "10.0.0.9"}),
     "guests[0].name", "also used by hosts[1]", ""),
    ("unknown-node", _set(("guests", 0, "node"), "pve9"),
     "guests[0].node", "unknown node 'pve9'", "did you mean"),
    ("undeclared-storage", _set(("guests", 1, "resources", "storage"), "fast"),
     "guests[1].resources.storage", "unknown storage 'fast'", ""),
    ("storage-without-right-content", _set(("vzdump_jobs", 0, "storage"), "local-lvm"),
     "vzdump_jobs[0].storage", "cannot hold vzdump archives", "'backup'"),
    ("app-unknown-guest", _set(("apps", 0, "guest"), "app2"),
     "apps[0].guest", "unknown guest 'app2'", "did you mean 'app1'?"),
    ("app-unknown-database", _set(("apps", 0, "databases"), ["immich", "paperless"]),
     "apps[0].databases[1]", "unknown database 'paperless'", ""),
    ("vzdump-unknown-vmid", _set(("vzdump_jobs", 0, "selection"), {"vmids": [110, 999]}),
     "vzdump_jobs[0].selection.vmids[1]", "vmid 999 is not a guest", ""),
    ("vzdump-unknown-exclude", _set(("vzdump_jobs", 0, "selection", "exclude"), [121]),
     "vzdump_jobs[0].selection.exclude[0]", "vmid 121 is not a guest", ""),
    ("offsite-unknown-repository", _set(("vzdump_jobs", 0, "offsite"), {"repository": "b3"}),
     "vzdump_jobs[0].offsite.repository", "unknown repository 'b3'", ""),
    ("offsite-unknown-host",
     _set(("vzdump_jobs", 0, "offsite"), {"host": "nas2", "path": "/backup"}),
     "vzdump_jobs[0].offsite.host", "unknown SSH host 'nas2'", "did you mean 'nas'?"),
    ("drill-server-unknown", _set(("databases", 0, "drill", "server"), "scratch"),
     "databases[0].drill.server", "unknown drill server 'scratch'", ""),
    ("role-unknown", _set(("guests", 0, "roles"), ["postgress"]),
     "guests[0].roles[0]", "unknown role 'postgress'", "did you mean 'postgres'?"),
    ("path-backup-unknown-host", _set(("path_backups", 0, "host"), "files"),
     "path_backups[0].host", "unknown SSH host 'files'", ""),
    ("depends-on-unknown", _set(("guests", 1, "depends_on"), ["db9"]),
     "guests[1].depends_on[0]", "unknown guest or host 'db9'", ""),
    ("duplicate-static-ip", _set(("guests", 1, "network"), [{"ip": "10.0.0.30/24"}]),
     "guests[1].network[0].ip", "10.0.0.30 is already used by guests[0]", ""),
    ("vmid-in-drill-scratch-range", _set(("guests", 1, "vmid"), 9950),
     "guests[1].vmid", "inside drills.guests.scratch_vmids", ""),
]


@pytest.mark.parametrize(
    ("mutate", "path", "text1", "text2"),
    [case[1:] for case in XREF_CASES],
    ids=[case[0] for case in XREF_CASES],
)
def test_cross_reference_error_names_file_line_and_path(mutate, path, text1, text2):
    text, problems = _xref(mutate)
    p = only(problems)
    assert p.path == path
    assert text1 in p.message and text2 in p.message
    assert p.file == "lab.yaml" and p.line is not None
    # the line is the one holding the offending key or list item
    last = path.rsplit(".", 1)[-1].split("[")[0]
    assert last in text.splitlines()[p.line - 1] or "- " in text.splitlines()[p.line - 1]


def test_dependency_cycle_is_reported():
    def mutate(data: dict[str, Any]) -> None:
        data["guests"][0]["depends_on"] = ["app1"]
        data["guests"][1]["depends_on"] = ["db1"]
    _, problems = _xref(mutate)
    assert "dependency cycle" in only(problems).message


def test_offsite_repository_without_s3_is_rejected():
    def mutate(data: dict[str, Any]) -> None:
        repo = data["repositories"][0]
        repo["url"] = "/srv/restic"
        del repo["s3"]
    _, problems = _xref(mutate)
    p = only(problems)
    assert p.path == "vzdump_jobs[0].offsite.repository" and "no s3 section" in p.message


def test_direct_model_validation_checks_cross_references_too():
    data = base()
    data["apps"][0]["guest"] = "ghost"
    with pytest.raises(ValidationError, match=r"apps\[0\]\.guest: unknown guest 'ghost'"):
        Inventory.model_validate(data)


# ---- all at once --------------------------------------------------------------------------


def test_all_problems_are_reported_at_once():
    text = (
        BASE.replace("vmid: 120", "vmid: 12")                    # schema: bad value
        .replace("    type: lxc\n    node: pve1", "    type: lxc\n    nod: pve1")  # unknown key
        .replace("repository: b2-main\n    drill", "repository: b2-mian\n    drill")  # xref
        .replace("    guest: app1", "    guest: ghost")           # xref
        .replace('schedule: "0 1 * * 6"', 'schedule: "0 1 * *"')  # cron
    )
    problems = validate_text(text, "lab.yaml")
    paths = {p.path for p in problems}
    assert {
        "guests[1].vmid", "guests[0].nod", "guests[0].node", "databases[0].repository",
        "apps[0].guest", "vzdump_jobs[0].schedule",
    } <= paths
    lines = [p.line for p in problems]
    assert lines == sorted(lines)  # in document order
    with pytest.raises(ConfigError) as err:
        parse_inventory(text, "lab.yaml")
    assert len(err.value.problems) == len(problems)
    assert err.value.problems == [str(p) for p in problems]


def test_an_invalid_item_is_still_cross_referenced():
    # guests[1] fails the schema (vmid) but its unknown node is reported in the same run,
    # and nothing that names it is reported as unknown.
    text = BASE.replace("vmid: 120", "vmid: 1").replace("    node: pve2", "    node: pve7")
    problems = validate_text(text, "lab.yaml")
    assert {p.path for p in problems} == {"guests[1].vmid", "guests[1].node"}


def test_load_inventory_raises_config_error_with_every_problem(tmp_path):
    path = tmp_path / "lab.yaml"
    path.write_text(BASE.replace("vmid: 120", "vmid: 12").replace("guest: app1", "guest: x"))
    with pytest.raises(ConfigError) as err:
        load_inventory(path)
    assert len(err.value.problems) == 2
    assert err.value.problems[0].startswith(f"{path}:")
    assert not err.value.transient


def test_missing_file_is_a_problem(tmp_path):
    p = only(validate_file(tmp_path / "nope.yaml"))
    assert "cannot read" in p.message
    with pytest.raises(ConfigError):
        load_inventory(tmp_path / "nope.yaml")


def test_problems_report_lists_every_problem_under_a_count():
    problems = [
        Problem("lab.yaml", 3, "guests[0].vmid", "must be ≥ 100"),
        Problem("lab.yaml", 9, "apps[0].guest", "unknown guest 'x'"),
    ]
    report = problems_report(problems)
    assert report.splitlines() == [
        "lab.yaml: 2 problems",
        "  lab.yaml:3 guests[0].vmid: must be ≥ 100",
        "  lab.yaml:9 apps[0].guest: unknown guest 'x'",
    ]
    assert problems_report([], source="lab.yaml") == "lab.yaml: valid"


# ---- properties ---------------------------------------------------------------------------


def _with_vmid(vmid: int) -> str:
    return BASE.replace("vmid: 120", f"vmid: {vmid}")


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=100, max_value=999_999_999).filter(
    lambda v: v != 110 and not 9900 <= v <= 9999))
def test_any_valid_vmid_round_trips(vmid):
    inv = parse_inventory(_with_vmid(vmid), "lab.yaml")
    assert inv.guest(vmid).name == "app1"
    assert inv.ssh_targets()["app1"].vmid == vmid


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.integers(max_value=99), st.integers(min_value=1_000_000_000)))
def test_any_out_of_range_vmid_is_rejected_at_its_path_and_line(vmid):
    text = _with_vmid(vmid)
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "guests[1].vmid"
    assert p.line == line_of(text, f"vmid: {vmid}")
    assert p.message in ("must be ≥ 100", "must be ≤ 999999999")


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=8, max_size=30))
def test_any_bare_string_in_a_secret_field_is_rejected_and_never_echoed(value):
    value = "Q9" + value  # a marker so the value cannot be a word of the message itself
    text = BASE.replace("password: env:PG_IMMICH_PASSWORD", f"password: '{value}'")
    p = only(validate_text(text, "lab.yaml"))
    assert p.path == "databases[0].password"
    assert value not in str(p)
