"""Evaluating permissions.check from the structure file (pure)."""

from __future__ import annotations

import pytest

from labkeeper.pvesim.perms import PermissionDenied, Principal, check_permissions
from labkeeper.pvesim.schema import ApiSchema


@pytest.fixture(scope="module")
def schema() -> ApiSchema:
    return ApiSchema()


def perms(schema: ApiSchema, path: str, method: str) -> dict:
    return schema.endpoint(path, method)["permissions"]


def test_unlimited_principal_passes_everything(schema: ApiSchema) -> None:
    check_permissions(perms(schema, "/nodes/{node}/lxc/{vmid}", "DELETE"),
                      Principal("root@pam"), {"vmid": 101})


def test_missing_privilege_is_named_in_the_message(schema: ApiSchema) -> None:
    who = Principal("u@pve!t", frozenset({"VM.Audit"}))
    with pytest.raises(PermissionDenied, match=r"Permission check failed \(/vms/101, "
                                               r"VM.Allocate\)"):
        check_permissions(perms(schema, "/nodes/{node}/lxc/{vmid}", "DELETE"), who,
                          {"vmid": 101})


def test_any_of_privileges_is_enough_when_check_says_any(schema: ApiSchema) -> None:
    who = Principal("u@pve!t", frozenset({"VM.Snapshot.Rollback"}))
    check_permissions(perms(schema, "/nodes/{node}/lxc/{vmid}/snapshot/{snapname}/rollback",
                            "POST"), who, {"vmid": 101})


def test_and_or_with_require_param(schema: ApiSchema) -> None:
    clone = perms(schema, "/nodes/{node}/qemu/{vmid}/clone", "POST")
    who = Principal("u@pve!t", {"/vms/9000": frozenset({"VM.Clone"}),
                                "/pool/lab": frozenset({"VM.Allocate"})})
    check_permissions(clone, who, {"vmid": 9000, "newid": 120, "pool": "lab"})
    with pytest.raises(PermissionDenied):
        check_permissions(clone, who, {"vmid": 9000, "newid": 120})


def test_acl_path_grant_propagates_down() -> None:
    who = Principal("u@pve!t", {"/vms": frozenset({"VM.Audit"})})
    assert who.has("/vms/101", "VM.Audit") and not who.has("/storage/local", "VM.Audit")


def test_user_all_needs_only_authentication(schema: ApiSchema) -> None:
    check_permissions(perms(schema, "/version", "GET"), Principal("u@pve!t", frozenset()), {})


def test_world_needs_no_principal(schema: ApiSchema) -> None:
    check_permissions(perms(schema, "/access/ticket", "POST"), None, {})


def test_userid_param_self(schema: ApiSchema) -> None:
    who = Principal("alice@pve", frozenset())
    check_permissions(perms(schema, "/access/password", "PUT"), who, {"userid": "alice@pve"})
    with pytest.raises(PermissionDenied):
        check_permissions(perms(schema, "/access/password", "PUT"), who, {"userid": "bob@pve"})


def test_endpoint_without_permissions_is_root_only() -> None:
    with pytest.raises(PermissionDenied):
        check_permissions({}, Principal("u@pve!t", frozenset({"Sys.Audit"})), {})
