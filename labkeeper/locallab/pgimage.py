"""A PostgreSQL 17 image built here from Debian 13 ("trixie") packages, cached.

No registry on the internet is reachable, but Debian's package mirror is: the
image's root filesystem is made with ``mmdebstrap --variant=minbase
--include=postgresql-17 --mode=root trixie OUT.tar MIRROR`` (measured: ~18 s,
524 MB) and imported with ``docker import``.

Cache (``/var/cache/labkeeper/images`` or ``$LABKEEPER_IMAGE_CACHE``):

- ``<name>.tar``: the root filesystem tarball, next to ``<name>.stamp.json`` that
  records the recipe (suite, packages, mirror, variant, :data:`RECIPE_VERSION`).
  A tarball whose stamp does not match the recipe is rebuilt; a matching one is
  used as is (a second run builds nothing). The tarball is written under a
  temporary name and renamed only when mmdebstrap exited 0, so an interrupted
  build leaves nothing that looks finished.
- ``<name>.root/``: the same tree unpacked (with its own stamp), for running the
  PostgreSQL 17 *client* under ``chroot`` on this host (:func:`client_wrappers`).

The image tag carries the recipe's key, so a changed recipe gets a new image; an
engine that already has the tag is not asked to import again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from labkeeper import process

RECIPE_VERSION = 1
DEFAULT_CACHE = Path("/var/cache/labkeeper/images")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
BUILD_TIMEOUT = 900.0
IMPORT_TIMEOUT = 300.0


@dataclass(frozen=True)
class Recipe:
    """What the root filesystem is made of."""

    name: str = "pg17-trixie"
    suite: str = "trixie"
    packages: tuple[str, ...] = ("postgresql-17",)
    mirror: str = DEFAULT_MIRROR
    variant: str = "minbase"
    major: int = 17

    @property
    def key(self) -> str:
        data = json.dumps({**asdict(self), "recipe_version": RECIPE_VERSION}, sort_keys=True)
        return hashlib.sha256(data.encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"labkeeper/{self.name}:{self.key}"

    def stamp(self) -> dict[str, object]:
        return {**asdict(self), "packages": list(self.packages),
                "recipe_version": RECIPE_VERSION, "key": self.key}


PG17 = Recipe()


def cache_dir() -> Path:
    return Path(os.environ.get("LABKEEPER_IMAGE_CACHE") or DEFAULT_CACHE)


# -- argv (pure) -------------------------------------------------------------------------

def mmdebstrap_argv(recipe: Recipe, out: Path) -> tuple[str, ...]:
    return ("mmdebstrap", f"--variant={recipe.variant}",
            f"--include={','.join(recipe.packages)}", "--mode=root", "--format=tar",
            recipe.suite, str(out), recipe.mirror)


def import_argv(docker: tuple[str, ...], tarball: Path, tag: str) -> tuple[str, ...]:
    return (*docker, "import", "--message", "labkeeper: built by mmdebstrap",
            str(tarball), tag)


def image_exists_argv(docker: tuple[str, ...], tag: str) -> tuple[str, ...]:
    return (*docker, "image", "inspect", "--format", "{{.Id}}", tag)


def unpack_argv(tarball: Path, dest: Path) -> tuple[str, ...]:
    return ("tar", "-x", "-p", "--numeric-owner", "-f", str(tarball), "-C", str(dest))


# -- cache -------------------------------------------------------------------------------

def _stamp_ok(stamp: Path, recipe: Recipe) -> bool:
    try:
        return bool(json.loads(stamp.read_text()) == recipe.stamp())
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Built:
    path: Path
    built: bool
    """False when the cached copy was used."""


def rootfs_tarball(recipe: Recipe = PG17, *, cache: Path | None = None,
                   log: process.LineCallback | None = None) -> Built:
    """The recipe's root filesystem tarball, built only when the cache lacks it."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    out = cache / f"{recipe.name}.tar"
    stamp = cache / f"{recipe.name}.stamp.json"
    if out.is_file() and _stamp_ok(stamp, recipe):
        return Built(out, built=False)
    stamp.unlink(missing_ok=True)
    partial = cache / f"{recipe.name}.tar.partial"
    partial.unlink(missing_ok=True)
    try:
        process.run(mmdebstrap_argv(recipe, partial), timeout=BUILD_TIMEOUT,
                    on_stderr_line=log)
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    stamp.write_text(json.dumps(recipe.stamp(), indent=2, sort_keys=True) + "\n")
    return Built(out, built=True)


def rootfs_dir(recipe: Recipe = PG17, *, cache: Path | None = None) -> Built:
    """The root filesystem unpacked (for ``chroot``), from the cached tarball."""
    cache = cache or cache_dir()
    tarball = rootfs_tarball(recipe, cache=cache).path
    root = cache / f"{recipe.name}.root"
    stamp = cache / f"{recipe.name}.root.stamp.json"
    if root.is_dir() and _stamp_ok(stamp, recipe):
        return Built(root, built=False)
    stamp.unlink(missing_ok=True)
    if root.exists():
        shutil.rmtree(root)
    partial = cache / f"{recipe.name}.root.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(mode=0o755)
    process.run(unpack_argv(tarball, partial), timeout=BUILD_TIMEOUT)
    partial.rename(root)
    stamp.write_text(json.dumps(recipe.stamp(), indent=2, sort_keys=True) + "\n")
    return Built(root, built=True)


def ensure_image(docker: tuple[str, ...], *, env: Mapping[str, str] | None = None,
                 recipe: Recipe = PG17, cache: Path | None = None) -> Built:
    """The recipe's image in the engine ``docker`` talks to (``env``: DOCKER_HOST...);
    imported from the cached tarball only when the engine lacks the tag.
    ``Built.path`` is the tarball; ``Built.built`` says whether anything was done."""
    tar = rootfs_tarball(recipe, cache=cache)
    have = process.run(image_exists_argv(docker, recipe.tag), timeout=60, env=env,
                       check=False)
    if have.returncode == 0:
        return Built(tar.path, built=tar.built)
    process.run(import_argv(docker, tar.path, recipe.tag), timeout=IMPORT_TIMEOUT, env=env)
    return Built(tar.path, built=True)


# -- a PostgreSQL client from the root filesystem, run with chroot ------------------------

CLIENT_TOOLS = ("pg_dump", "pg_dumpall", "pg_restore", "psql")


def wrapper_script(root: Path, major: int, tool: str) -> str:
    """A ``<major>/bin/<tool>`` that runs the root filesystem's client under chroot.

    The network namespace is shared, so 127.0.0.1 reaches the same servers; the
    environment (PGPASSWORD & co.) passes through ``env``, never argv. The working
    directory becomes ``/`` inside the root."""
    real = f"/usr/lib/postgresql/{major}/bin/{tool}"
    return ("#!/bin/sh\n"
            "# labkeeper test client: PostgreSQL " + str(major) + " from " + str(root) + "\n"
            f"exec chroot {root} {real} \"$@\"\n")


def client_wrappers(bin_root: Path, root: Path, major: int) -> Path:
    """Create ``bin_root/<major>/bin/{pg_dump,psql,...}`` wrappers (see
    :func:`wrapper_script`); returns the bin directory."""
    bindir = bin_root / str(major) / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    for tool in CLIENT_TOOLS:
        path = bindir / tool
        path.write_text(wrapper_script(root, major, tool))
        path.chmod(0o755)
    return bindir


def link_host_client(bin_root: Path, major: int,
                     system_root: Path = Path("/usr/lib/postgresql")) -> Path:
    """``bin_root/<major>/bin`` pointing at the host's own client of that major."""
    (bin_root / str(major)).mkdir(parents=True, exist_ok=True)
    link = bin_root / str(major) / "bin"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    link.symlink_to(system_root / str(major) / "bin")
    return link


# -- a PostgreSQL 17 server in a container (host networking, loopback port) -------------

SERVER_DATA = "/var/lib/postgresql/17/lab"
SERVER_SOCKDIR = "/var/lib/postgresql"
"""The container's socket directory (owned by ``postgres``, like Debian's
``/var/run/postgresql``, which an imported root filesystem does not have)."""


def server_script(*, port: int, data: str = SERVER_DATA, sockdir: str = SERVER_SOCKDIR,
                  major: int = 17) -> str:
    """The container's command (pure): initdb once (local trust, scram-sha-256 on
    TCP), then postgres on 127.0.0.1:``port`` with its socket in ``sockdir``. A
    restarted container keeps its data (initdb only when there is none)."""
    bindir = f"/usr/lib/postgresql/{major}/bin"
    return (f"[ -f {data}/PG_VERSION ] || {bindir}/initdb -D {data} -U postgres "
            "--auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 "
            f"|| exit 1; "
            f"exec {bindir}/postgres -D {data} -p {port} -k {sockdir} "
            "-c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off")


def run_argv(docker: tuple[str, ...], *, name: str, image: str, port: int) -> tuple[str, ...]:
    return (*docker, "run", "-d", "--name", name, "--network", "host", "-u", "postgres",
            "--stop-timeout", "5", image, "sh", "-c", server_script(port=port))


class Pg17Container:
    """PostgreSQL 17 in a container of a local engine, on 127.0.0.1:``port`` (host
    networking, so nothing is published), the way an app's ``*_postgres`` runs.

    Inside the container: socket in ``/tmp``, ``postgres`` trusted on the socket
    (``docker exec -u postgres``), passwords (SCRAM) on TCP. Passwords are set over
    psql's stdin, never in an argv."""

    def __init__(self, docker: tuple[str, ...], *, name: str, port: int,
                 recipe: Recipe = PG17, env: Mapping[str, str] | None = None) -> None:
        self.docker = docker
        self.env = dict(env or {})
        self.name = name
        self.port = port
        self.recipe = recipe
        self.sockdir = SERVER_SOCKDIR

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            input: str | bytes | None = None) -> process.CommandResult:
        return process.run((*self.docker, *args), timeout=timeout, check=check, input=input,
                           env=self.env)

    def start(self, *, timeout: float = 120) -> Pg17Container:
        ensure_image(self.docker, env=self.env, recipe=self.recipe)
        self.run("rm", "-f", self.name, check=False)
        process.run(run_argv(self.docker, name=self.name, image=self.recipe.tag,
                             port=self.port), timeout=120, env=self.env)
        self.wait_ready(timeout=timeout)
        return self

    def psql(self, sql: str, *, db: str = "postgres", timeout: float = 300) -> str:
        """SQL through ``docker exec -i -u postgres psql`` on the socket (stdin)."""
        return self.run("exec", "-i", "-u", "postgres", self.name, "psql", "-X", "-q", "-A",
                        "-t", "-v", "ON_ERROR_STOP=1", "-h", self.sockdir, "-p",
                        str(self.port), "-d", db, "-f", "-", input=sql, timeout=timeout).stdout

    def wait_ready(self, *, timeout: float = 120) -> None:
        import time

        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            res = self.run("exec", "-u", "postgres", self.name, "pg_isready", "-q", "-h",
                           self.sockdir, "-p", str(self.port), check=False, timeout=30)
            if res.returncode == 0:
                return
            last = res.stderr_tail(2)
            state = self.run("inspect", "-f", "{{.State.Running}}", self.name, check=False)
            if state.stdout.strip() == "false":
                logs = self.run("logs", "--tail", "20", self.name, check=False)
                why = self.run("inspect", "-f", "exit {{.State.ExitCode}} {{.State.Error}} "
                               "{{.State.StartedAt}}", self.name, check=False)
                raise RuntimeError(f"container {self.name} exited ({why.stdout.strip()}): "
                                   f"{logs.stdout}{logs.stderr}")
            time.sleep(0.2)
        raise RuntimeError(f"PostgreSQL in {self.name} not ready after {timeout:g}s: {last}")

    def restart(self, *, timeout: float = 120) -> None:
        """Start the container again once it has stopped (data kept)."""
        import time

        deadline = time.monotonic() + timeout
        while self.run("inspect", "-f", "{{.State.Running}}", self.name,
                       check=False).stdout.strip() == "true":
            if time.monotonic() > deadline:
                raise RuntimeError(f"container {self.name} did not stop within {timeout:g}s")
            time.sleep(0.2)
        self.run("start", self.name)
        self.wait_ready(timeout=timeout)

    def stop(self) -> None:
        self.run("rm", "-f", "-v", self.name, check=False)
