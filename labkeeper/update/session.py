"""An update's session on the app's guest (Proxmox API + SSH), and what it reads there:
preflight, the versions that run, and the Compose images (fetch, inspect, re-tag, keep).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from labkeeper import compose, health
from labkeeper import proxmox as px
from labkeeper.errors import LabkeeperError
from labkeeper.inventory import App, AppApt, Guest, Inventory
from labkeeper.secrets import redact
from labkeeper.ssh import SshClient, SshPool, SshTarget
from labkeeper.update.plan import (
    APT_ENV,
    apt_simulate_argv,
    dpkg_query_argv,
    in_window,
    parse_apt_simulation,
    parse_dpkg_query,
)
from labkeeper.update.records import (
    Mode,
    Offer,
    Pin,
    Preflight,
    Protection,
    PullFailed,
    UpdateFailed,
    Versions,
    short_digest,
)

logger = logging.getLogger(__name__)


def exited(what: str, res: Any, *, tail: int = 300) -> str:
    """``<what> exited <code>: <the end of its stderr>`` (redacted)."""
    return f"{what} exited {res.returncode}: {redact(res.stderr.strip())[-tail:]}"


class Session:
    """The Proxmox API and the SSH connection to an app's guest, opened on first use."""

    def __init__(self, inv: Inventory, app: App | str, *, api: Any = None) -> None:
        self.inv = inv
        self.app = inv.app(app) if isinstance(app, str) else app
        self.guest: Guest = inv.guest(self.app.guest)
        self._api = api
        self._pool = SshPool()
        spec = inv.ssh_target(self.guest.name)
        self.target = SshTarget.from_spec(spec)
        self.command_timeout = float(spec.command_timeout)

    # -- resources
    @property
    def api(self) -> Any:
        if self._api is None:
            self._api = px.connect_lab(self.inv.proxmox)
        return self._api

    def ssh(self) -> SshClient:
        return self._pool.get(self.target)

    def close(self) -> None:
        self._pool.close()

    def reconnect(self) -> None:
        """Drop the SSH connections (the guest restarted); the next use opens new ones."""
        self._pool.close()
        self._pool = SshPool()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def task_timeout(self) -> float:
        return float(self.inv.proxmox.task_timeout) if self.inv.proxmox else 3600.0

    @property
    def mode(self) -> Mode:
        return self.inv.rollback_mode(self.app)

    def wait(self, upid: Any) -> px.TaskResult:
        return px.wait_for_task(self.api, upid, timeout=self.task_timeout)

    def run(self, argv: Sequence[str], *, timeout: float | None = None,
            env: Mapping[str, str] | None = None, stream: bool = False) -> Any:
        def line(text: str) -> None:
            logger.info("%s| %s", self.app.name, text)

        return self.ssh().run(argv, timeout=timeout or self.command_timeout, env=env,
                              check=False, on_stdout_line=line if stream else None,
                              on_stderr_line=line if stream else None)


def preflight(s: Session, *, now: datetime | None = None) -> Preflight:
    """One round of probes and the maintenance window (read-only)."""
    inside = in_window(s.app.maintenance_window, now or datetime.now(UTC), s.inv.lab.timezone)
    probes = health.run_round(s.app, inv=s.inv, ssh=s.ssh)
    ok = health.round_ok(probes)
    reasons = []
    if not inside:
        w = s.app.maintenance_window
        assert w is not None
        reasons.append(f"outside the maintenance window ({','.join(w.days)} "
                       f"{w.start}-{w.end} {w.timezone or s.inv.lab.timezone})")
    if not ok:
        reasons.append(f"unhealthy before the update: {health.summary(probes)}")
    return Preflight(ok, inside, probes, "; ".join(reasons))


def image_text(ref: str, digest: str, image_id: str) -> str:
    """``REF@sha256:<12>`` (the registry digest), else ``REF (id <12>)``."""
    if digest:
        return f"{ref}@{short_digest(digest)}"
    return f"{ref} (id {image_id.removeprefix('sha256:')[:12]})" if image_id else ref


def inspect_image(s: Session, ref: str) -> compose.ImageInfo | None:
    """``docker image inspect`` on the guest; None when the engine has no such image."""
    return inspect_images(s, [ref]).get(ref)


def inspect_images(s: Session, refs: Sequence[str]) -> dict[str, compose.ImageInfo | None]:
    """Several images in one ``docker image inspect`` (one SSH round trip); ref → info,
    None for each the engine does not have."""
    cfg = s.app.compose
    assert cfg is not None
    wanted = list(dict.fromkeys(r for r in refs if r))
    if not wanted:
        return {}
    res = s.run(compose.image_inspect_argv(cfg, *wanted), timeout=120)
    missing = "no such" in (res.stderr or "").lower()
    if res.returncode != 0 and not missing:
        raise LabkeeperError(exited("docker image inspect", res), transient=True)
    found = compose.parse_image_inspect(res.stdout) if res.stdout.strip() else []
    if res.returncode == 0 and len(found) == len(wanted):
        return dict(zip(wanted, found, strict=True))
    if len(wanted) == 1:
        return {wanted[0]: found[0] if found and res.returncode == 0 else None}
    by_id = {f.id: f for f in found}
    if all(r.startswith("sha256:") for r in wanted):
        return {r: by_id.get(r) for r in wanted}
    return {r: inspect_image(s, r) for r in wanted}  # some absent: one by one


def _config_refs(s: Session) -> dict[str, str]:
    """service → the image reference the compose file names now ({} when unreadable)."""
    cfg = s.app.compose
    assert cfg is not None
    res = s.run(compose.config_argv(cfg), timeout=120)
    if res.returncode != 0:
        logger.info("%s: %s", s.app.name, exited("docker compose config", res, tail=200))
        return {}
    try:
        return compose.parse_config_images(res.stdout)
    except compose.ComposeOutputError as exc:
        logger.info("%s: docker compose config: %s", s.app.name, exc)
        return {}


def compose_versions(s: Session, *, refs: Mapping[str, str] | None = None) -> Versions:
    """Per service: the image it runs (ID from the container's label), the reference
    the compose file names (``config``, unless ``refs`` are known) and the registry
    digest (one ``image inspect``)."""
    cfg = s.app.compose
    assert cfg is not None
    ps = s.run(compose.ps_argv(cfg), timeout=120)
    if ps.returncode != 0:
        raise UpdateFailed(exited("docker compose ps", ps))
    containers = compose.parse_ps(ps.stdout)
    rows: list[compose.ImageRow] = []
    if any(not c.image_id for c in containers):  # compose before 2.21: no image label
        images = s.run(compose.images_argv(cfg), timeout=120)
        rows = compose.parse_images(images.stdout) if images.returncode == 0 else []
    svc = compose.service_images(containers, rows)
    ids = {k: v.image_id for k, v in svc.items() if v.image_id}
    named = dict(refs) if refs is not None else _config_refs(s)
    all_refs = {k: v.image for k, v in svc.items() if v.image} | named
    infos = inspect_images(s, list(ids.values()))
    digests = {}
    for k, iid in ids.items():
        info = infos.get(iid)
        digests[k] = info.digest_for(all_refs.get(k, "")) if info else ""
    return Versions({k: image_text(all_refs.get(k, v.image), digests.get(k, ""), v.image_id)
                     for k, v in svc.items()}, ids, refs=all_refs, digests=digests)


def record_versions(s: Session) -> Versions:
    """What runs now (read-only)."""
    app = s.app
    if app.strategy == "compose":
        return compose_versions(s)
    if app.strategy == "apt":
        cfg = app.apt or AppApt()
        sim = s.run(apt_simulate_argv(cfg), timeout=600, env=APT_ENV)
        if sim.returncode != 0:
            raise UpdateFailed(exited("apt-get -s", sim))
        changes = parse_apt_simulation(sim.stdout)
        return Versions({p: old or "(new)" for p, (old, _n) in changes.items()},
                        planned={p: new for p, (_o, new) in changes.items()})
    assert app.commands is not None
    if app.commands.version is None:
        return Versions()
    res = s.run(app.commands.version, timeout=120)
    text = res.stdout.strip().splitlines()[-1].strip() if res.stdout.strip() else ""
    return Versions({"version": text if res.returncode == 0 else f"? (exit {res.returncode})"})


def versions_after(s: Session, before: Mapping[str, str]) -> dict[str, str]:
    """The versions now, for the same keys as before (apt: the same packages)."""
    if s.app.strategy == "apt":
        if not before:
            return {}
        res = s.run(dpkg_query_argv(sorted(before)), timeout=120)
        return parse_dpkg_query(res.stdout)
    return record_versions(s).values


def fetch(s: Session, versions: Versions, *, pin: Pin | None = None,
          retry_bad: bool = False) -> Offer:
    """``docker compose pull``, then compare what the references name with what runs.

    A failed pull raises :class:`PullFailed` (transient) after putting back any tag it
    moved: nothing changed. Digests the app's pin remembers as bad are put back too
    (``held``): the app stays on its good images unless ``retry_bad``."""
    cfg = s.app.compose
    assert cfg is not None
    logger.info("%s: $ %s", s.app.name, redact(" ".join(compose.pull_argv(cfg))))
    res = s.run(compose.pull_argv(cfg), stream=True)
    if res.returncode != 0:
        put_back = _retag_quietly(s, versions.image_ids, versions.refs)
        tail = redact((res.stderr or res.stdout).strip())[-400:]
        raise PullFailed(f"docker compose pull exited {res.returncode}: {tail} — nothing "
                         f"changed (the containers run as before{put_back})")
    offer = Offer()
    infos = inspect_images(s, list(versions.refs.values()))
    for svc, ref in sorted(versions.refs.items()):
        info = infos.get(ref)
        if info is None:
            continue
        offer.ids[svc] = info.id
        offer.digests[svc] = info.digest_for(ref)
        offer.values[svc] = image_text(ref, offer.digests[svc], info.id)
        if info.id != versions.image_ids.get(svc):
            offer.changed.append(svc)
    if not versions.refs:  # nothing runs yet: nothing to compare, deploy what was pulled
        offer.changed.append("*")
    bad = pin.bad_digests() if pin and not retry_bad else set()
    offer.held = {svc: offer.digests[svc] for svc in offer.changed
                  if offer.digests.get(svc) in bad}
    if offer.held:
        retag(s, versions.image_ids, versions.refs)
    return offer


def retag(s: Session, images: Mapping[str, str], refs: Mapping[str, str]) -> list[str]:
    """``docker tag IMAGE_ID REF`` per service: the reference names the image again."""
    cfg = s.app.compose
    assert cfg is not None
    done = []
    for svc, ref in sorted(refs.items()):
        iid = images.get(svc)
        if not iid or compose.split_ref(ref)[1].startswith("sha256:"):
            continue  # nothing recorded, or a reference by digest (it cannot move)
        res = s.run(compose.tag_argv(cfg, iid, ref), timeout=120)
        if res.returncode != 0:
            raise LabkeeperError(exited(f"docker tag {iid[:19]} {ref}", res), transient=True)
        done.append(ref)
    return done


def _retag_quietly(s: Session, images: Mapping[str, str], refs: Mapping[str, str]) -> str:
    try:
        done = retag(s, images, refs)
    except LabkeeperError as exc:
        logger.info("%s: could not put the tags back: %s", s.app.name, exc)
        return "; some tags could not be put back: a plain `up -d` may start new images"
    return f"; {len(done)} tag(s) put back" if done else ""


def ensure_images(s: Session, prot: Protection) -> list[str]:
    """Make sure every image the protection names is on the guest: when one was
    pruned, pull it by its registry digest. Raises when one cannot be had."""
    cfg = s.app.compose
    assert cfg is not None
    pulled = []
    present = inspect_images(s, list(prot.images.values()))
    for svc, iid in sorted(prot.images.items()):
        if present.get(iid) is not None:
            continue
        digest, ref = prot.digests.get(svc, ""), prot.refs.get(svc, "")
        if not digest or not ref:
            raise UpdateFailed(f"{s.app.name}: the image {svc} ran ({iid[:19]}) is gone "
                               "from the guest and has no registry digest to pull it by")
        by_digest = compose.digest_ref(ref, digest)
        logger.info("%s: %s's image %s is not on the guest: pulling %s", s.app.name, svc,
                    iid[:19], by_digest)
        res = s.run(compose.docker_pull_argv(cfg, by_digest), stream=True)
        found = inspect_image(s, iid) if res.returncode == 0 else None
        if found is None:
            raise LabkeeperError(f"{s.app.name}: {svc}'s previous image {by_digest} could "
                                 f"not be pulled (exit {res.returncode}): "
                                 f"{redact(res.stderr.strip())[-300:]}", transient=True)
        pulled.append(by_digest)
    return pulled


def keep_images(s: Session, prot: Protection) -> None:
    """Tag the images a rollback needs (``REPO:labkeeper-keep-<app>-<service>``): an
    image that is tagged is not removed by ``docker image prune``."""
    cfg = s.app.compose
    assert cfg is not None
    for svc, iid in sorted(prot.images.items()):
        ref = prot.refs.get(svc)
        if not ref:
            continue
        res = s.run(compose.tag_argv(cfg, iid, compose.keep_ref(ref, s.app.name, svc)),
                    timeout=120)
        if res.returncode != 0:
            raise LabkeeperError(exited(f"docker tag (keep {svc})", res), transient=True)
