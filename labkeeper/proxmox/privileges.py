"""The least-privilege role of a labkeeper API token.

:data:`ADAPTER_CALLS` lists every (method, path) the adapter calls;
:func:`derive_privileges` reads the privileges they need from the PVE API structure
file; :data:`REQUIRED_PRIVILEGES` is that result, written out (a test keeps the two equal).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

# Every (method, template) the adapter calls. Tests check each against the structure
# file and derive REQUIRED_PRIVILEGES from it.
ADAPTER_CALLS: tuple[tuple[str, str], ...] = (
    ("GET", "/version"),
    ("GET", "/nodes"),
    ("GET", "/cluster/resources"),
    ("GET", "/cluster/nextid"),
    *((m, t.format(g=g)) for g in ("lxc", "qemu") for m, t in (
        ("GET", "/nodes/{{node}}/{g}/{{vmid}}/config"),
        ("PUT", "/nodes/{{node}}/{g}/{{vmid}}/config"),
        ("PUT", "/nodes/{{node}}/{g}/{{vmid}}/resize"),
        ("GET", "/nodes/{{node}}/{g}/{{vmid}}/status/current"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/status/start"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/status/stop"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/status/shutdown"),
        ("DELETE", "/nodes/{{node}}/{g}/{{vmid}}"),
        ("GET", "/nodes/{{node}}/{g}/{{vmid}}/snapshot"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/snapshot"),
        ("POST", "/nodes/{{node}}/{g}/{{vmid}}/snapshot/{{snapname}}/rollback"),
        ("DELETE", "/nodes/{{node}}/{g}/{{vmid}}/snapshot/{{snapname}}"),
    )),
    ("POST", "/nodes/{node}/lxc"),
    ("POST", "/nodes/{node}/qemu"),
    ("POST", "/nodes/{node}/qemu/{vmid}/clone"),
    ("POST", "/nodes/{node}/qemu/{vmid}/config"),
    ("POST", "/nodes/{node}/vzdump"),
    ("GET", "/nodes/{node}/storage/{storage}/content"),
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("PUT", "/nodes/{node}/storage/{storage}/content/{volume}"),
    ("GET", "/nodes/{node}/storage/{storage}/prunebackups"),
    ("DELETE", "/nodes/{node}/storage/{storage}/prunebackups"),
    ("GET", "/cluster/backup"),
    ("POST", "/cluster/backup"),
    ("GET", "/cluster/backup/{id}"),
    ("PUT", "/cluster/backup/{id}"),
    ("DELETE", "/cluster/backup/{id}"),
    ("GET", "/nodes/{node}/tasks"),
    ("GET", "/nodes/{node}/tasks/{upid}/status"),
    ("DELETE", "/nodes/{node}/tasks/{upid}"),
    ("GET", "/nodes/{node}/tasks/{upid}/log"),
)


# Endpoints whose structure entry says only ``user: all`` check inside the handler
# (PVE's API documentation states these checks in prose; the structure file drops
# prose). The privileges labkeeper's use of each needs:
HANDLER_PRIVILEGES: Mapping[tuple[str, str], frozenset[str]] = {
    # "VM.Allocate on /vms/{vmid} or the pool; Datastore.AllocateSpace on the storage"
    ("POST", "/nodes/{node}/lxc"): frozenset({"VM.Allocate", "Datastore.AllocateSpace"}),
    ("POST", "/nodes/{node}/qemu"): frozenset({"VM.Allocate", "Datastore.AllocateSpace"}),
    # "VM.Backup on the guests and Datastore.AllocateSpace on the backup storage"
    ("POST", "/nodes/{node}/vzdump"): frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # backup volumes: "Datastore.AllocateSpace if you have VM.Backup on the VM"
    ("DELETE", "/nodes/{node}/storage/{storage}/content/{volume}"):
        frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # updateattributes (protected, notes) checks like the deletion of a backup
    ("PUT", "/nodes/{node}/storage/{storage}/content/{volume}"):
        frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # with a vmid: "Datastore.AllocateSpace and VM.Backup for the VM"
    ("DELETE", "/nodes/{node}/storage/{storage}/prunebackups"):
        frozenset({"VM.Backup", "Datastore.AllocateSpace"}),
    # guests are listed only where the token has VM.Audit
    ("GET", "/cluster/resources"): frozenset({"VM.Audit"}),
    # other users' tasks (scheduled vzdump jobs run as root@pam) need Sys.Audit
    ("GET", "/nodes/{node}/tasks"): frozenset({"Sys.Audit"}),
}


def _check_privileges(expr: Sequence[Any]) -> set[str]:
    """Privileges that satisfy one ``permissions.check`` expression.

    ``perm`` with ``any``: every listed privilege (PVE then checks the specific one
    per changed option inside the handler, e.g. VM.Config.Memory for ``memory``);
    ``and``: all branches; ``or``: the first branch that needs no optional
    parameter (``require_param``), i.e. the path labkeeper takes.
    """
    kind = expr[0]
    if kind == "perm":
        opts = dict(zip(expr[3::2], expr[4::2], strict=False))
        if "require_param" in opts:
            raise LookupError("needs an optional parameter")
        return set(expr[2])
    if kind == "and":
        return set().union(*(_check_privileges(sub) for sub in expr[1:]))
    if kind == "or":
        for sub in expr[1:]:
            try:
                return _check_privileges(sub)
            except LookupError:
                continue
        raise LookupError("no branch without optional parameters")
    raise ValueError(f"unsupported permission check {kind!r}")


def derive_privileges(structure: Mapping[str, Any],
                      calls: Iterable[tuple[str, str]] = ADAPTER_CALLS) -> frozenset[str]:
    """The union of privileges that ``calls`` need, from the structure file's
    ``permissions`` plus :data:`HANDLER_PRIVILEGES` for ``user: all`` endpoints."""
    out: set[str] = set()
    for method, template in calls:
        endpoint = structure["paths"][template][method]
        perms = endpoint.get("permissions") or {}
        if perms.get("check"):
            out |= _check_privileges(perms["check"])
        out |= HANDLER_PRIVILEGES.get((method, template), frozenset())
    return frozenset(out)


REQUIRED_PRIVILEGES: tuple[str, ...] = (
    "Datastore.AllocateSpace",
    "Datastore.Audit",
    "Sys.Audit",
    "Sys.Modify",
    "VM.Allocate",
    "VM.Audit",
    "VM.Backup",
    "VM.Clone",
    "VM.Config.CDROM",
    "VM.Config.CPU",
    "VM.Config.Cloudinit",
    "VM.Config.Disk",
    "VM.Config.HWType",
    "VM.Config.Memory",
    "VM.Config.Network",
    "VM.Config.Options",
    "VM.PowerMgmt",
    "VM.Snapshot",
    "VM.Snapshot.Rollback",
)
"""The least-privilege role of a labkeeper API token (``pveum role add Labkeeper
-privs ...``), equal to ``derive_privileges(structure)`` (tested)."""
