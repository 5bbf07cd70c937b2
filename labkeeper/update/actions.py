"""What an update does to the guest: protect it, run the update, gate on health, roll
back, and clean up old pre-update snapshots and archives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from labkeeper import compose, health
from labkeeper import proxmox as px
from labkeeper.errors import ConfigError, LabkeeperError
from labkeeper.inventory import App, Guest, Inventory
from labkeeper.secrets import redact
from labkeeper.update.plan import (
    APT_ENV,
    apply_steps,
    archive_notes,
    snapshot_name,
    stale_archives,
    stale_snapshots,
)
from labkeeper.update.records import (
    PREFIX,
    Protection,
    RollbackFailed,
    UpdateFailed,
    Versions,
    short_digest,
)
from labkeeper.update.session import (
    Session,
    ensure_images,
    exited,
    keep_images,
    record_versions,
    retag,
)
from labkeeper.update.state import spared_names

logger = logging.getLogger(__name__)

# --- protect ------------------------------------------------------------------------------


def vzdump_storage(inv: Inventory, app: App, guest: Guest) -> str:
    if app.vzdump_storage:
        return app.vzdump_storage
    if inv.proxmox is not None:
        for st in inv.proxmox.storages:
            if "backup" in st.content and st.available_on(guest.node):
                return st.name
    raise ConfigError(f"app {app.name}: no backup storage on node {guest.node} for the "
                      "pre-update vzdump (set vzdump_storage)")


def planned_protection(s: Session, run_id: str, versions: Versions) -> Protection:
    """The protection this run will take, named before it exists (the journal records
    it first, so a retry knows the snapshot is its own)."""
    g = s.guest
    prot = Protection(s.mode, g.node, g.vmid, g.type)
    if s.app.strategy == "compose":
        prot.images = dict(versions.image_ids)
        prot.refs = {k: v for k, v in versions.refs.items() if k in versions.image_ids}
        prot.digests = {k: v for k, v in versions.digests.items() if v}
    if prot.kind == "snapshot":
        prot.snapshot = snapshot_name(s.app.name, run_id)
    return prot


def protect(s: Session, run_id: str, versions: Versions, *, resume: bool = False
            ) -> Protection:
    """Take the protection the guest allows. A snapshot or archive of the same name
    that this run did not start (``resume``: the journal says it did) is refused,
    never reused."""
    g = s.guest
    prot = planned_protection(s, run_id, versions)
    if prot.kind == "snapshot":
        assert prot.snapshot is not None
        existing = {x.name for x in px.list_snapshots(s.api, g.node, g.vmid, g.type)}
        if prot.snapshot in existing and not resume:
            raise UpdateFailed(f"snapshot {prot.snapshot} of {g.type} {g.vmid} exists "
                               "already but this run did not take it: not reusing it")
        if prot.snapshot not in existing:
            logger.info("%s: snapshot %s of %s %s on %s", s.app.name, prot.snapshot, g.type,
                        g.vmid, g.node)
            s.wait(px.create_snapshot(s.api, g.node, g.vmid, g.type, prot.snapshot))
    elif prot.kind == "vzdump":
        prot.volid = _protect_vzdump(s, run_id, resume=resume)
    elif prot.kind == "compose-images":
        if not versions.image_ids:
            raise UpdateFailed(f"{s.app.name}: no running image IDs to pin for a "
                               "compose-images rollback")
        missing = [svc for svc in prot.images if not prot.refs.get(svc)]
        if missing:
            raise UpdateFailed(f"{s.app.name}: no image reference known for "
                               f"{', '.join(missing)}: a rollback could not re-tag them")
        ensure_images(s, prot)
        keep_images(s, prot)
    return prot


def _protect_vzdump(s: Session, run_id: str, *, resume: bool) -> str:
    """A vzdump of the guest, marked protected (no retention or prune removes it while
    the update depends on it; cleanup unprotects it)."""
    g = s.guest
    storage = vzdump_storage(s.inv, s.app, g)
    notes = archive_notes(s.app.name, run_id)
    volid = _find_archive(s, storage, notes)
    if volid is not None and not resume:
        raise UpdateFailed(f"a pre-update archive with notes {notes!r} exists already but "
                           "this run did not make it: not reusing it")
    if volid is None:
        logger.info("%s: vzdump of %s %s to %s (no snapshots on its storage), protected",
                    s.app.name, g.type, g.vmid, storage)
        s.wait(px.vzdump(s.api, g.node, vmids=[g.vmid], mode="snapshot", storage=storage,
                         notes_template=notes, protected=True))
        volid = _find_archive(s, storage, notes)
    if volid is None:
        raise LabkeeperError(f"the pre-update vzdump of {g.vmid} is not on {storage}",
                             transient=True)
    if not _archive_protected(s, storage, volid):
        px.set_volume_attributes(s.api, g.node, volid, protected=True)
    return volid


def _archive_protected(s: Session, storage: str, volid: str) -> bool:
    return any(v.volid == volid and v.protected
               for v in px.backups(s.api, s.guest.node, storage, vmid=s.guest.vmid))


def _find_archive(s: Session, storage: str, notes: str) -> str | None:
    for vol in px.backups(s.api, s.guest.node, storage, vmid=s.guest.vmid):
        if vol.notes.strip() == notes:
            return vol.volid
    return None


def protection_exists(s: Session, prot: Protection) -> bool:
    """Is the protection still there? compose-images: every image on the guest, or
    pulled back by its digest now."""
    if prot.kind == "snapshot":
        names = {x.name for x in px.list_snapshots(s.api, prot.node, prot.vmid, prot.gtype)}
        return prot.snapshot in names
    if prot.kind == "vzdump":
        if prot.volid is None:
            return False
        storage = px.storage_of(prot.volid)
        return any(v.volid == prot.volid
                   for v in px.backups(s.api, prot.node, storage, vmid=prot.vmid))
    if prot.kind == "compose-images":
        if not prot.images:
            return False
        try:
            ensure_images(s, prot)
        except UpdateFailed:
            return False
        return True
    return True


# --- update -------------------------------------------------------------------------------


def run_update(s: Session) -> list[str]:
    """Run the strategy's commands in order, streaming output; raise on the first failure."""
    env = APT_ENV if s.app.strategy == "apt" else None
    done: list[str] = []
    for argv in apply_steps(s.app):
        shown = " ".join(argv)
        logger.info("%s: $ %s", s.app.name, redact(shown))
        res = s.run(argv, env=env, stream=True)
        if res.returncode != 0:
            tail = redact((res.stderr or res.stdout).strip())[-400:]
            raise UpdateFailed(f"{argv[0]} exited {res.returncode}"
                               f"{' (' + res.meaning + ')' if res.meaning else ''}: {tail}")
        done.append(shown)
    return done


# --- gate ---------------------------------------------------------------------------------


def gate(s: Session, *, sleep: Callable[[float], None] = time.sleep,
         clock: Callable[[], float] = time.monotonic) -> health.GateOutcome:
    if not s.app.health:
        logger.info("%s: no health probes declared: the gate cannot prove anything",
                    s.app.name)
    return health.run_gate(lambda: health.run_round(s.app, inv=s.inv, ssh=s.ssh), s.app.gate,
                           clock=clock, sleep=sleep, label=s.app.name)


# --- rollback -----------------------------------------------------------------------------


def rollback(s: Session, prot: Protection) -> str:
    """Put the guest (or the Compose stack) back to the protection; start it."""
    node, vmid, gtype = prot.node, prot.vmid, prot.gtype
    if prot.kind == "snapshot":
        assert prot.snapshot is not None
        logger.info("%s: rolling %s %s back to snapshot %s", s.app.name, gtype, vmid,
                    prot.snapshot)
        s.wait(px.rollback_snapshot(s.api, node, vmid, gtype, prot.snapshot))
        _ensure_running(s, prot)
        s.reconnect()  # the guest restarted: old SSH connections are gone
        return f"rolled back to snapshot {prot.snapshot}" + _compose_after_guest_rollback(s, prot)
    if prot.kind == "vzdump":
        assert prot.volid is not None
        logger.info("%s: restoring %s %s from %s", s.app.name, gtype, vmid, prot.volid)
        status = px.guest_status(s.api, node, vmid, gtype)
        if status.status == "running":
            s.wait(px.stop_guest(s.api, node, vmid, gtype))
        storage = s.guest.resources.storage
        if gtype == "lxc":
            s.wait(px.restore_lxc(s.api, node, vmid, prot.volid, storage=storage, force=True))
        else:
            s.wait(px.restore_qemu(s.api, node, vmid, prot.volid, storage=storage, force=True))
        _ensure_running(s, prot)
        s.reconnect()
        return f"restored from {prot.volid}" + _compose_after_guest_rollback(s, prot)
    if prot.kind == "compose-images":
        return restore_images(s, prot)
    raise RollbackFailed(f"{s.app.name}: rollback is 'none': nothing to roll back to")


def restore_images(s: Session, prot: Protection) -> str:
    """Compose back on the protection's images, lastingly: each image (pulled by digest
    when it was pruned) re-tagged onto the reference the compose file names, then
    ``up -d --pull never``. A plain ``up -d`` later keeps them."""
    cfg = s.app.compose
    assert cfg is not None
    refs = dict(prot.refs) or record_versions(s).refs  # journals of earlier versions
    ensure_images(s, prot)
    logger.info("%s: re-tagging %d service(s) onto their old images", s.app.name,
                len(prot.images))
    retag(s, prot.images, refs)
    s.run(("rm", "-f", "--", f"{cfg.dir}/{compose.ROLLBACK_OVERRIDE}"), timeout=60)
    res = s.run(compose.rollback_up_argv(cfg), stream=True)
    if res.returncode != 0:
        raise LabkeeperError(exited("docker compose up with the old images", res),
                             transient=True)
    return "compose services back on their previous images (re-tagged: " + \
        ", ".join(f"{svc}={short_digest(prot.digests.get(svc) or iid)}"
                  for svc, iid in sorted(prot.images.items())) + ")"


def _compose_after_guest_rollback(s: Session, prot: Protection) -> str:
    """The guest is back, but the images were pulled before it was protected: the
    references may name the new images. Re-tag the old ones (a later ``up -d`` keeps
    them)."""
    if s.app.strategy != "compose" or not prot.images:
        return ""
    deadline = time.monotonic() + ENGINE_WAIT
    while True:  # the guest just started: its engine (or sshd) may not answer yet
        try:
            return "; " + restore_images(s, prot)
        except LabkeeperError as exc:
            if not exc.transient or time.monotonic() >= deadline:
                raise
            logger.info("%s: the guest's engine is not ready (%s); trying again", s.app.name,
                        exc)
            s.reconnect()
            time.sleep(2)


ENGINE_WAIT = 120.0
"""Seconds a restarted guest's Docker engine gets to answer after a guest rollback."""


def _ensure_running(s: Session, prot: Protection) -> None:
    status = px.guest_status(s.api, prot.node, prot.vmid, prot.gtype)
    if status.status != "running":
        s.wait(px.start_guest(s.api, prot.node, prot.vmid, prot.gtype))


# --- cleanup ------------------------------------------------------------------------------


def cleanup(s: Session, keep: int | None = None) -> list[str]:
    """Delete pre-update snapshots / archives of this guest beyond ``keep``; never one
    that another app's open journal names. The app's update is over: its archives no
    longer need to be protected from retention (they are unprotected)."""
    keep = s.app.keep_snapshots if keep is None else keep
    g = s.guest
    removed: list[str] = []
    if s.inv.proxmox is None or s.mode in ("compose-images", "none"):
        return removed  # nothing of this app's on Proxmox
    spare = sorted(spared_names(s.inv, but=s.app.name))
    snaps = px.list_snapshots(s.api, g.node, g.vmid, g.type)
    for name in stale_snapshots(snaps, keep, spare=spare):
        logger.info("%s: deleting old snapshot %s", s.app.name, name)
        s.wait(px.delete_snapshot(s.api, g.node, g.vmid, g.type, name))
        removed.append(name)
    if s.mode == "vzdump":
        storage = vzdump_storage(s.inv, s.app, g)
        vols = px.backups(s.api, g.node, storage, vmid=g.vmid)
        for vol in vols:
            if vol.protected and vol.notes.startswith(PREFIX) and vol.volid not in spare:
                px.set_volume_attributes(s.api, g.node, vol.volid, protected=False)
        for volid in stale_archives(vols, keep, spare=spare):
            logger.info("%s: deleting old pre-update archive %s", s.app.name, volid)
            upid = px.delete_volume(s.api, g.node, volid)
            if upid is not None:
                s.wait(upid)
            removed.append(volid)
    return removed
