"""Container images built here with no internet: a busybox base and a tiny web app.

- :func:`busybox_rootfs_tar` writes a root filesystem tarball from Debian's
  ``busybox-static`` (``/bin/busybox`` plus one link per applet, ``/etc/passwd``,
  ``/tmp``) and caches it under :data:`IMAGE_CACHE` (keyed by busybox's digest), so
  a second run only reads it.
- :func:`import_base` imports it (``docker import``) as :data:`BASE_REF`.
- :func:`build_app` builds one version of the web app (``docker build`` with the
  legacy builder, on a shared layer :data:`APP_BASE_REF` built once): busybox
  ``httpd`` on ``$BIND:$PORT`` (default 127.0.0.1:8080; host networking) serving
  ``/health`` and ``/version``, with a container ``HEALTHCHECK`` and a shell PID 1
  that exits on SIGTERM (quick stops).
  :data:`APP_VERSIONS` are:

  ``1``, ``2``: healthy, ``/version`` says ``1`` / ``2``;
  ``2-bad``: ``/health`` missing (404) and the HEALTHCHECK fails (unhealthy);
  ``2-badhttp``: the HEALTHCHECK passes but ``/health`` is missing (only an HTTP
  probe notices);
  ``2-crash``: the container exits 3 right after starting.
- :func:`build_app_images` builds them all and pushes them to a loopback registry
  as ``REGISTRY/labapp:VERSION``; the returned :class:`AppImages` has
  :meth:`AppImages.point` to make a moving tag (``latest``, ``stable``) name any of
  them (re-tag + push: "the registry now offers a new version"),
  :meth:`AppImages.ref` and :meth:`AppImages.digest`.
- :func:`import_rootfs` imports any root filesystem tarball (cached by the caller).
- :func:`app_compose_yaml` is a Compose file for the app: host networking, the image
  from the registry, its HEALTHCHECK (or another), a quick stop.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkeeper.errors import ServiceError
from labkeeper.locallab.docker import LocalDocker, LocalRegistry

BUSYBOX = Path("/bin/busybox")
IMAGE_CACHE = Path(os.environ.get("LABKEEPER_IMAGE_CACHE", "/var/cache/labkeeper/images"))
BASE_REF = "labkeeper/busybox:base"
APP_BASE_REF = "labkeeper/labapp-base:1"
APP_REPO = "labapp"
APP_VERSIONS = ("1", "2", "2-bad", "2-badhttp", "2-crash")
DEFAULT_PORT = 8080

SERVE_SH = """#!/bin/sh
# PID 1 of the lab's web app: busybox httpd, stopped quickly on SIGTERM.
trap 'kill "$pid" 2>/dev/null; exit 0' TERM INT
if [ -n "$CRASH" ]; then sleep 0.3; echo "crashing on purpose" >&2; exit 3; fi
httpd -f -p "${BIND:-127.0.0.1}:${PORT:-8080}" -h /www &
pid=$!
wait "$pid"
"""


def _busybox_applets(busybox: Path) -> list[str]:
    from labkeeper import process

    out = process.run((str(busybox), "--list"), timeout=30).stdout
    return sorted({a for a in out.split() if a and a != "busybox" and "/" not in a})


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, 0
    tar.addfile(info)


def write_busybox_tar(path: Path, busybox: Path = BUSYBOX) -> Path:
    """Write a busybox root filesystem tarball at ``path`` (atomically)."""
    applets = _busybox_applets(busybox)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".busybox-", dir=path.parent)
    os.close(fd)
    try:
        with tarfile.open(tmp, "w") as tar:
            for d, mode in (("bin", 0o755), ("etc", 0o755), ("tmp", 0o1777), ("www", 0o755),
                            ("var", 0o755), ("root", 0o700)):
                _add_dir(tar, d, mode)
            _add_bytes(tar, "bin/busybox", busybox.read_bytes(), 0o755)
            for applet in applets:
                info = tarfile.TarInfo(f"bin/{applet}")
                info.type, info.linkname, info.mode, info.mtime = \
                    tarfile.SYMTYPE, "busybox", 0o777, 0
                tar.addfile(info)
            _add_bytes(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                       b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
            _add_bytes(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def busybox_rootfs_tar(cache: Path = IMAGE_CACHE, busybox: Path = BUSYBOX) -> Path:
    """The cached busybox root filesystem tarball (made when missing)."""
    if not busybox.exists():
        raise ServiceError(f"{busybox} not found: install Debian's busybox-static "
                           "(`make setup`)", service="images")
    digest = hashlib.sha256(busybox.read_bytes()).hexdigest()[:16]
    path = cache / f"busybox-rootfs-{digest}.tar"
    if not path.exists():
        write_busybox_tar(path, busybox)
    return path


def image_id(engine: LocalDocker, ref: str) -> str | None:
    """The local image ID of ``ref`` (None when the engine does not have it)."""
    res = engine.docker("image", "inspect", "--format", "{{.Id}}", ref, timeout=60, check=False)
    return (res.stdout.strip() or None) if res.ok else None


def import_rootfs(engine: LocalDocker, tar: Path, ref: str) -> str:
    """``docker import TAR REF`` unless the engine has ``ref``; returns the image ID."""
    known = image_id(engine, ref)
    if known:
        return known
    engine.docker("import", str(tar), ref, timeout=600)
    found = image_id(engine, ref)
    if not found:
        raise ServiceError(f"docker import of {tar} left no image {ref}", service="images")
    return found


def import_base(engine: LocalDocker, cache: Path = IMAGE_CACHE) -> str:
    """The busybox base image in ``engine`` (:data:`BASE_REF`); returns its ID."""
    return import_rootfs(engine, busybox_rootfs_tar(cache), BASE_REF)


def base_dockerfile(*, base: str = BASE_REF) -> str:
    """The app's shared layer (pure): PID 1 script, defaults, HEALTHCHECK on
    ``$HEALTH_PATH``, CMD. Built once; each version adds only its pages."""
    return (
        f"FROM {base}\n"
        "COPY serve.sh /serve.sh\n"
        f"ENV PORT={DEFAULT_PORT} BIND=127.0.0.1 HEALTH_PATH=health\n"
        "HEALTHCHECK --interval=1s --timeout=3s --retries=2 "
        'CMD wget -q -O /dev/null "http://127.0.0.1:$PORT/$HEALTH_PATH" || exit 1\n'
        'CMD ["/bin/sh", "/serve.sh"]\n'
    )


def dockerfile(version: str, *, base: str = APP_BASE_REF) -> str:
    """The Dockerfile of one app version on the shared layer (pure)."""
    probe = "alive" if version == "2-badhttp" else "health"
    crash = " CRASH=1" if version == "2-crash" else ""
    return (f"FROM {base}\n"
            "COPY www /www\n"
            f"ENV APP_VERSION={version} HEALTH_PATH={probe}{crash}\n")


def www_files(version: str) -> dict[str, str]:
    """The pages the app serves in ``version`` (pure): name -> content."""
    pages = {"version": f"{version}\n", "alive": "alive\n", "index.html": f"labapp {version}\n"}
    if version not in ("2-bad", "2-badhttp"):
        pages["health"] = "ok\n"
    return pages


def build_app(engine: LocalDocker, version: str, ref: str, *, workdir: Path) -> str:
    """Build one app version as ``ref``; returns the image ID."""
    if version not in APP_VERSIONS:
        raise ValueError(f"unknown app version {version!r} (known: {', '.join(APP_VERSIONS)})")
    if image_id(engine, APP_BASE_REF) is None:
        base = workdir / "ctx-base"
        base.mkdir(parents=True, exist_ok=True)
        (base / "serve.sh").write_text(SERVE_SH)
        (base / "Dockerfile").write_text(base_dockerfile())
        engine.docker("build", "-q", "-t", APP_BASE_REF, str(base), timeout=600)
    ctx = workdir / f"ctx-{version}"
    (ctx / "www").mkdir(parents=True, exist_ok=True)
    for name, text in www_files(version).items():
        (ctx / "www" / name).write_text(text)
    (ctx / "Dockerfile").write_text(dockerfile(version))
    engine.docker("build", "-q", "-t", ref, str(ctx), timeout=600)
    found = image_id(engine, ref)
    if not found:
        raise ServiceError(f"docker build left no image {ref}", service="images")
    return found


@dataclass
class AppImages:
    """The app's versions in a registry, and moving tags pointed at them."""

    engine: LocalDocker
    registry: str
    """``127.0.0.1:PORT``"""
    repo: str = APP_REPO
    ids: dict[str, str] = field(default_factory=dict)
    """version or moving tag -> local image ID"""
    digests: dict[str, str] = field(default_factory=dict)
    """version or moving tag -> registry manifest digest (``sha256:...``)"""
    seconds: dict[str, float] = field(default_factory=dict)
    """How long the build took: ``rootfs``, ``base``, ``build``, ``push``."""

    @property
    def name(self) -> str:
        """``127.0.0.1:PORT/labapp``: the repository as Compose files name it."""
        return f"{self.registry}/{self.repo}"

    def ref(self, tag: str) -> str:
        return f"{self.name}:{tag}"

    def digest(self, tag: str) -> str:
        return self.digests[tag]

    def version_of(self, tag: str) -> str | None:
        """Which version a moving tag points at now (by image ID)."""
        target = self.ids.get(tag)
        return next((v for v in APP_VERSIONS if self.ids.get(v) == target), None)

    def push(self, tag: str) -> str:
        """Push ``REGISTRY/labapp:TAG``; returns the manifest digest."""
        res = self.engine.docker("push", self.ref(tag), timeout=300)
        digest = _push_digest(res.stdout)
        if not digest:
            raise ServiceError(f"docker push {self.ref(tag)} printed no digest:\n"
                               f"{res.stdout[-500:]}", service="images")
        self.digests[tag] = digest
        return digest

    def point(self, tag: str, version: str) -> str:
        """Make ``tag`` (e.g. ``latest``) name ``version`` in the registry; returns the
        digest. Only the registry changes: the engine's local ``tag`` keeps naming what
        it named before (or stays absent), as on a guest that has not pulled yet, so a
        ``docker compose pull`` really fetches the new version. ``ids[tag]`` is what the
        registry offers."""
        if version not in self.ids:
            raise ValueError(f"unknown version {version!r} (built: {', '.join(self.ids)})")
        before = image_id(self.engine, self.ref(tag))
        self.engine.docker("tag", self.ref(version), self.ref(tag), timeout=60)
        try:
            digest = self.push(tag)
        finally:
            if before is None:
                self.engine.docker("image", "rm", self.ref(tag), timeout=60)  # untag only
            elif before != self.ids[version]:
                self.engine.docker("tag", before, self.ref(tag), timeout=60)
        self.ids[tag] = self.ids[version]
        return digest

    def forget(self, tag: str) -> None:
        """Remove the local tag (the registry keeps it): the next pull fetches it."""
        self.engine.docker("image", "rm", self.ref(tag), timeout=60, check=False)


def _push_digest(out: str) -> str | None:
    """The ``digest: sha256:...`` that ``docker push`` prints last."""
    for line in reversed(out.splitlines()):
        for word in line.replace(",", " ").split():
            if word.startswith("sha256:") and len(word) == 71:
                return word
    return None


def build_app_images(engine: LocalDocker, registry: LocalRegistry | str, *, workdir: Path,
                     versions: tuple[str, ...] = APP_VERSIONS,
                     cache: Path = IMAGE_CACHE) -> AppImages:
    """Build every app version on the busybox base and push them to ``registry``."""
    address = registry if isinstance(registry, str) else registry.address
    images = AppImages(engine, address)
    t0 = time.monotonic()
    tar = busybox_rootfs_tar(cache)
    t1 = time.monotonic()
    import_base(engine, cache)
    t2 = time.monotonic()
    for version in versions:
        images.ids[version] = build_app(engine, version, images.ref(version), workdir=workdir)
    t3 = time.monotonic()
    for version in versions:
        images.push(version)
    t4 = time.monotonic()
    images.seconds = {"rootfs": t1 - t0, "base": t2 - t1, "build": t3 - t2, "push": t4 - t3,
                      "rootfs_bytes": float(tar.stat().st_size)}
    return images


def app_compose_yaml(*, image: str, port: int, service: str = "web",
                     healthcheck: dict[str, Any] | None = None) -> str:
    """A Compose file for the app (pure; JSON is valid YAML): host networking, the
    image, ``PORT``, a quick stop; the image's own HEALTHCHECK (1 s) unless
    ``healthcheck`` replaces it."""
    svc: dict[str, Any] = {"image": image, "network_mode": "host",
                           "restart": "unless-stopped", "environment": {"PORT": str(port)},
                           "stop_grace_period": "3s"}
    if healthcheck is not None:
        svc["healthcheck"] = healthcheck
    return json.dumps({"services": {service: svc}}, indent=2) + "\n"
