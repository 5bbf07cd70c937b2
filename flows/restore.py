"""Restore flows (used by the restore-database and restore-guest runbooks)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from labkeeper import restore
from labkeeper.inventory import load_inventory
from tasks.common import lab_path
from tasks.hooks import hooks


@flow(name="restore-database", log_prints=False, timeout_seconds=12 * 3600,
      **hooks("restore"))
def restore_database_flow(database: str, snapshot: str = "latest", into: str | None = None,
                          lab: str | None = None) -> dict[str, Any]:
    """Restore a database's backup (``latest`` or a snapshot id) into a NEW database
    (``<dbname>_restored_<stamp>``) and verify it against the backup's manifest. The
    original is not touched; an unverified copy is dropped again.

    Args:
        database: The database whose backup to restore (its name in the inventory).
        snapshot: latest, or the restic snapshot id of the dump (or of its manifest).
        into: Name of the new database (empty: <dbname>_restored_<stamp>); it must not
            exist.
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    res = restore.restore_database(inv, database, snapshot=snapshot, into=into)
    create_markdown_artifact(
        key=f"restore-db-{database}".lower().replace("_", "-"),
        markdown=(f"# Restore of `{database}`\n\nbackup `{res.backup_id}` (snapshot "
                  f"`{res.snapshot}`) restored into `{res.restored}`: {res.tables} tables "
                  f"verified against the manifest, {res.bytes} bytes in {res.seconds:.1f} s."),
        description=f"restore of {database}")
    return {"restored": res.restored, "snapshot": res.snapshot, "backup_id": res.backup_id,
            "tables": res.tables, "bytes": res.bytes, "seconds": round(res.seconds, 2)}


@flow(name="restore-guest", log_prints=False, timeout_seconds=12 * 3600, **hooks("restore"))
def restore_guest_flow(guest: str, archive: str = "latest", vmid: int = 0,
                       over_original: bool = False, start: bool | None = None,
                       lab: str | None = None) -> dict[str, Any]:
    """Restore a guest from a vzdump archive (``latest`` or a volume id) to a new VMID
    (``vmid`` 0: the next free one) or, with ``over_original``, over the original.

    A copy on a new VMID is isolated (NICs unplugged, host mounts and passthrough
    devices removed, ``onboot=0``) and left stopped unless ``start`` is true; over the
    original, the guest is started again unless ``start`` is false.

    Args:
        guest: The guest to restore (its name in the inventory).
        archive: latest, or the vzdump archive's volume id
            (e.g. local:backup/vzdump-lxc-101-2026_12_01-01_30_00.tar.zst).
        vmid: The new guest's VMID (0: the next free one). Ignored over the original.
        over_original: Replace the original guest (it is stopped and overwritten)
            instead of restoring a copy beside it.
        start: Start the restored guest (empty: a copy stays stopped, the original is
            started again).
        lab: Inventory file on the machine that runs the job (empty: $LABKEEPER_LAB,
            else lab.yaml).
    """
    inv = load_inventory(lab_path(lab))
    res = restore.restore_guest(inv, guest, archive=archive, vmid=vmid,
                                over_original=over_original, start=start)
    return {"vmid": res.vmid, "node": res.node, "archive": res.archive,
            "over_original": res.over_original, "started": res.started,
            "isolation": res.isolation, "seconds": round(res.seconds, 2)}
