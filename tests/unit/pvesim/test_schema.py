"""The structure-driven validator: paths, types, formats, property strings, returns."""

from __future__ import annotations

import pytest

from labkeeper.pvesim.schema import (
    MISSING,
    NOT_DEFINED,
    ApiSchema,
    check_returns,
    compile_pattern,
    load_structure,
    perl_to_python,
    validate_params,
)


@pytest.fixture(scope="module")
def schema() -> ApiSchema:
    return ApiSchema()


def params(schema: ApiSchema, path: str, method: str) -> dict:
    return schema.endpoint(path, method)["parameters"]


def test_vendored_structure_has_all_431_paths() -> None:
    assert len(load_structure()["paths"]) == 431


def test_every_pattern_in_the_structure_compiles(schema: ApiSchema) -> None:
    failures = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("pattern"), str) and compile_pattern(node["pattern"]) is None:
                failures.append(node["pattern"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema.paths)
    assert failures == []


def test_path_with_parameters_matches_its_template(schema: ApiSchema) -> None:
    assert schema.match("nodes/pve1/lxc/101/status/current".split("/")) == (
        "/nodes/{node}/lxc/{vmid}/status/current", {"node": "pve1", "vmid": "101"})


def test_literal_segment_wins_over_parameter(schema: ApiSchema) -> None:
    template, _ = schema.match(["cluster", "nextid"])
    assert template == "/cluster/nextid"


def test_unknown_path_does_not_match(schema: ApiSchema) -> None:
    assert schema.match(["nodes", "pve1", "nonsense"]) is None


def test_upid_with_colons_matches_one_segment(schema: ApiSchema) -> None:
    upid = "UPID:pve1:0001A2B1:0000D13E:6B021B9B:vzcreate:101:root@pam:"
    template, values = schema.match(["nodes", "pve1", "tasks", upid, "status"])
    assert template == "/nodes/{node}/tasks/{upid}/status" and values["upid"] == upid


def test_perl_default_flags_group_is_translated() -> None:
    assert perl_to_python("(?^:[a-z]+)") == "(?:[a-z]+)"
    regex = compile_pattern("(?^:\\d+(?:;\\d+)*)")
    assert regex.match("1;2;3") and not regex.match("1;x")


def test_pattern_is_anchored_to_whole_value() -> None:
    regex = compile_pattern("[a-z]+")
    assert regex.match("abc") and not regex.match("abc1")


def test_valid_lxc_create_passes_and_coerces(schema: ApiSchema) -> None:
    values, errors = validate_params(params(schema, "/nodes/{node}/lxc", "POST"), {
        "node": "pve1", "vmid": "101", "ostemplate": "local:vztmpl/x.tar.zst",
        "rootfs": "local-lvm:8", "net0": "name=eth0,bridge=vmbr0,ip=dhcp",
        "start": "yes", "memory": "1024", "tags": "web;prod"})
    assert errors == {}
    assert values["vmid"] == 101 and values["start"] == 1 and values["memory"] == 1024


def test_missing_required_parameter_is_reported(schema: ApiSchema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/lxc", "POST"),
                                {"node": "pve1", "vmid": "101"})
    assert errors == {"ostemplate": MISSING}


def test_unknown_parameter_is_rejected_when_additional_properties_is_0(schema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/lxc/{vmid}/status/start", "POST"),
                                {"node": "pve1", "vmid": "101", "bogus": "1"})
    assert errors == {"bogus": NOT_DEFINED}


@pytest.mark.parametrize(("name", "value", "message"), [
    ("memory", "lots", "type check ('integer') failed - got 'lots'"),
    ("start", "maybe", "type check ('boolean') failed - got 'maybe'"),
    ("cpulimit", "fast", "type check ('number') failed - got 'fast'"),
    ("arch", "sparc", "value 'sparc' does not have a value in the enumeration "
                      "'amd64, i386, arm64, armhf, riscv32, riscv64'"),
    ("memory", "8", "value must have a minimum value of 16"),
    ("cores", "9000", "value must have a maximum value of 8192"),
    ("password", "abc", "value must be at least 5 characters long"),
    ("hostname", "bad_name!", "invalid format - value does not look like a valid DNS name\n"),
])
def test_bad_value_gets_pve_error_text(schema, name: str, value: str, message: str) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/lxc", "POST"), {
        "node": "pve1", "vmid": "101", "ostemplate": "local:vztmpl/x", name: value})
    assert errors == {name: message}


def test_boolean_accepts_pve_spellings(schema: ApiSchema) -> None:
    p = params(schema, "/nodes/{node}/lxc", "POST")
    for text, expected in [("1", 1), ("true", 1), ("on", 1), ("Yes", 1), ("0", 0), ("no", 0),
                           ("off", 0), ("false", 0)]:
        values, errors = validate_params(p, {"node": "pve1", "vmid": "101",
                                             "ostemplate": "x", "start": text})
        assert errors == {} and values["start"] == expected


def test_vmid_out_of_range_is_invalid_format(schema: ApiSchema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/lxc", "POST"),
                                {"node": "pve1", "vmid": "99", "ostemplate": "x"})
    assert errors == {"vmid": "invalid format - value does not look like a valid VM ID\n"}


def test_indexed_family_accepts_within_cap_and_rejects_beyond(schema: ApiSchema) -> None:
    p = params(schema, "/nodes/{node}/lxc", "POST")
    base = {"node": "pve1", "vmid": "101", "ostemplate": "x"}
    assert validate_params(p, {**base, "net31": "name=eth31"})[1] == {}
    assert validate_params(p, {**base, "net32": "name=eth32"})[1] == {"net32": NOT_DEFINED}


def test_property_string_default_key_and_unknown_key(schema: ApiSchema) -> None:
    p = params(schema, "/nodes/{node}/lxc", "POST")
    base = {"node": "pve1", "vmid": "101", "ostemplate": "x"}
    assert validate_params(p, {**base, "rootfs": "local-lvm:8,size=8G"})[1] == {}
    _, errors = validate_params(p, {**base, "rootfs": "local-lvm:8,colour=blue"})
    assert errors["rootfs"] == (
        f"invalid format - format error\nrootfs.colour: {NOT_DEFINED}\n\n")


def test_property_string_missing_required_key(schema: ApiSchema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/lxc", "POST"), {
        "node": "pve1", "vmid": "101", "ostemplate": "x", "net0": "bridge=vmbr0"})
    assert errors["net0"] == f"invalid format - format error\nnet0.name: {MISSING}\n\n"


def test_named_property_string_ipconfig_matches_pve_fixture(schema: ApiSchema) -> None:
    # wording from ../shared/fixtures/pve/error-400-parameter-verification.body.json
    _, errors = validate_params(params(schema, "/nodes/{node}/qemu", "POST"), {
        "node": "pve1", "vmid": "100", "ipconfig0": "ip=10.0.0.2/24,gw=10.0.0.300"})
    assert errors == {"ipconfig0": "invalid format - format error\nipconfig0.gw: invalid "
                      "format - value does not look like a valid IPv4 address\n\n"}


def test_qemu_net_key_alias_model_is_accepted(schema: ApiSchema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/qemu", "POST"), {
        "node": "pve1", "vmid": "100", "net0": "virtio=BC:24:11:00:00:01,bridge=vmbr0"})
    assert errors == {}


def test_prune_backups_format_is_checked(schema: ApiSchema) -> None:
    p = params(schema, "/nodes/{node}/vzdump", "POST")
    assert validate_params(p, {"node": "pve1", "prune-backups": "keep-last=3"})[1] == {}
    _, errors = validate_params(p, {"node": "pve1", "prune-backups": "keep-last=x"})
    assert "prune-backups.keep-last: type check ('integer') failed" in errors["prune-backups"]


def test_calendar_format_rejects_garbage(schema: ApiSchema) -> None:
    p = params(schema, "/cluster/backup", "POST")
    assert validate_params(p, {"schedule": "sun 01:00", "all": "1"})[1] == {}
    _, errors = validate_params(p, {"schedule": "whenever", "all": "1"})
    assert errors == {"schedule": "invalid format - unable to parse calendar event "
                                  "'whenever'\n"}


def test_repeated_form_key_for_scalar_is_a_type_error(schema: ApiSchema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/lxc/{vmid}/status/start", "POST"),
                                {"node": "pve1", "vmid": ["101", "102"]})
    assert errors == {"vmid": "type check ('integer') failed - got ARRAY"}


def test_array_parameter_accepts_repeated_values(schema: ApiSchema) -> None:
    values, errors = validate_params(params(schema, "/nodes/{node}/vzdump", "POST"),
                                     {"node": "pve1", "exclude-path": ["/tmp", "/var/tmp"]})
    assert errors == {} and values["exclude-path"] == ["/tmp", "/var/tmp"]


def test_requires_names_the_missing_companion(schema: ApiSchema) -> None:
    _, errors = validate_params(params(schema, "/nodes/{node}/vzdump", "POST"),
                                {"node": "pve1", "notes-template": "{{guestname}}"})
    assert errors == {"storage": "missing property - 'notes-template' requires this property"}


def test_returns_checker_accepts_conforming_and_reports_problems(schema: ApiSchema) -> None:
    returns = schema.endpoint("/nodes/{node}/tasks/{upid}/status", "GET")["returns"]
    good = {"upid": "U", "node": "pve1", "pid": 1, "pstart": 2, "starttime": 3,
            "type": "vzdump", "id": "", "user": "root@pam", "status": "stopped",
            "exitstatus": "OK"}
    assert check_returns(returns, good) == []
    bad = {**good, "status": "done", "pid": "1"}
    del bad["user"]
    problems = check_returns(returns, bad)
    assert any("status" in p for p in problems) and any("pid" in p for p in problems)
    assert any("user: missing" in p for p in problems)


def test_description_parameters_lost_by_the_shared_file_are_restored(schema: ApiSchema) -> None:
    p = params(schema, "/nodes/{node}/lxc", "POST")
    assert p["properties"]["description"]["maxLength"] == 8192
    _, errors = validate_params(p, {"node": "pve1", "vmid": "120",
                                    "ostemplate": "local:vztmpl/x.tar.zst",
                                    "description": "db server"})
    assert "description" not in errors
    _, errors = validate_params(p, {"node": "pve1", "vmid": "120",
                                    "ostemplate": "local:vztmpl/x.tar.zst",
                                    "description": "x" * 9000})
    assert "description" in errors
