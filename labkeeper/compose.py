"""Docker Compose: argv builders and tolerant parsers for its JSON output.

Nothing here runs anything: the update code runs these argv over SSH on the app's
guest (``SshClient.run``) and hands the output to the parsers.

The parsers accept every shape real ``docker compose`` releases print: ``ps`` as one
JSON array or one object per line (or nothing), ``images`` as a list, a map keyed by
container or ``null``, a container's health in its own field or only inside
``Status``. Which release prints which: ``benchmarks/README.md`` (tool versions).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from labkeeper.inventory import AppCompose

COMPOSE = ("docker", "compose")
ROLLBACK_OVERRIDE = ".labkeeper-rollback.yaml"
"""The override file earlier versions wrote to pin services (never read again: a plain
``up -d`` undid the rollback). A rollback now re-tags the old images onto the
references the compose file names, and removes this file when it finds it."""

Health = Literal["", "starting", "healthy", "unhealthy"]


# --------------------------------------------------------------------------- argv


def docker_argv(docker_host: str | None = None) -> tuple[str, ...]:
    """``docker``, with ``--host H`` when the engine is not on the default socket."""
    return (COMPOSE[0], "--host", docker_host) if docker_host else (COMPOSE[0],)


def base_argv(cfg: AppCompose, *, extra_files: Sequence[str] = ()) -> tuple[str, ...]:
    """``docker [--host H] compose --project-directory DIR -f DIR/FILE [-f X...] [-p P]``."""
    argv: list[str] = [*docker_argv(cfg.docker_host), COMPOSE[1], "--project-directory",
                       str(cfg.dir), "-f", f"{cfg.dir}/{cfg.file}"]
    for extra in extra_files:
        argv += ["-f", extra if extra.startswith("/") else f"{cfg.dir}/{extra}"]
    if cfg.project:
        argv += ["-p", cfg.project]
    return tuple(argv)


def pull_argv(cfg: AppCompose) -> tuple[str, ...]:
    return (*base_argv(cfg), "pull", "--quiet")


def up_argv(cfg: AppCompose, *, extra_files: Sequence[str] = (),
            pull: Literal["missing", "never", "always"] | None = None) -> tuple[str, ...]:
    """``up -d --wait``-less start; ``--remove-orphans`` when the app asks for it."""
    argv = [*base_argv(cfg, extra_files=extra_files), "up", "-d"]
    if cfg.remove_orphans:
        argv.append("--remove-orphans")
    if pull is not None:
        argv += ["--pull", pull]
    return tuple(argv)


def ps_argv(cfg: AppCompose) -> tuple[str, ...]:
    """Every container of the project (also stopped ones), as JSON."""
    return (*base_argv(cfg), "ps", "--all", "--format", "json")


def images_argv(cfg: AppCompose) -> tuple[str, ...]:
    return (*base_argv(cfg), "images", "--format", "json")


def config_argv(cfg: AppCompose) -> tuple[str, ...]:
    """The resolved stack as JSON (the image reference each service names)."""
    return (*base_argv(cfg), "config", "--format", "json")


def parse_config_images(text: str) -> dict[str, str]:
    """``config --format json`` -> service → image reference (services without one,
    e.g. build-only, are left out). ``ps`` is no substitute: once a tag moves away from
    a running container's image, ``ps`` shows the image ID."""
    docs = _json_documents(text)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        raise ComposeOutputError("config: not one JSON object")
    services = docs[0].get("services") or {}
    if not isinstance(services, dict):
        raise ComposeOutputError("config: services is not an object")
    return {str(name): str(svc["image"]) for name, svc in services.items()
            if isinstance(svc, dict) and svc.get("image")}


def git_pull_argv(cfg: AppCompose) -> tuple[str, ...]:
    """Fast-forward the stack's git checkout (only for apps with ``git_url``)."""
    return ("git", "-C", str(cfg.dir), "pull", "--ff-only")


def update_steps(cfg: AppCompose) -> list[tuple[str, ...]]:
    """The compose update as a person would type it: (git pull), pull, up -d
    (--remove-orphans); labkeeper runs the first pull before protecting (see
    :func:`in_transaction_steps`)."""
    steps: list[tuple[str, ...]] = []
    if cfg.git_url:
        steps.append(git_pull_argv(cfg))
    if cfg.pull:
        steps.append(pull_argv(cfg))
    steps.append(up_argv(cfg))
    return steps


def in_transaction_steps(cfg: AppCompose) -> list[tuple[str, ...]]:
    """What the update runs once the images were fetched (:func:`pull_argv` runs
    first, before anything is protected or changed): ``up -d``; with ``git_url`` the
    checkout is fast-forwarded first and pulled again (its compose file may name new
    images)."""
    steps: list[tuple[str, ...]] = []
    if cfg.git_url:
        steps.append(git_pull_argv(cfg))
        if cfg.pull:
            steps.append(pull_argv(cfg))
    steps.append(up_argv(cfg))
    return steps


def rollback_up_argv(cfg: AppCompose) -> tuple[str, ...]:
    """``up -d`` without pulling: the references were re-tagged onto the old images."""
    return up_argv(cfg, pull="never")


# --- plain docker commands on the guest's engine (images, tags)


def image_inspect_argv(cfg: AppCompose, *refs: str) -> tuple[str, ...]:
    """``docker image inspect REF...`` (a JSON array of those found; exit 1 when one is
    absent)."""
    return (*docker_argv(cfg.docker_host), "image", "inspect", *refs)


def tag_argv(cfg: AppCompose, source: str, target: str) -> tuple[str, ...]:
    return (*docker_argv(cfg.docker_host), "tag", source, target)


def docker_pull_argv(cfg: AppCompose, ref: str) -> tuple[str, ...]:
    """``docker pull --quiet REF`` (e.g. ``repo@sha256:...``: an image by its digest)."""
    return (*docker_argv(cfg.docker_host), "pull", "--quiet", ref)


def split_ref(ref: str) -> tuple[str, str]:
    """``registry:5000/repo:tag`` -> (``registry:5000/repo``, ``tag``); a digest
    reference ``repo@sha256:x`` -> (``repo``, ``sha256:x``); no tag -> (repo, "")."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    head, sep, tail = ref.rpartition(":")
    if sep and "/" not in tail:
        return head, tail
    return ref, ""


KEEP_TAG_PREFIX = "labkeeper-keep-"


def keep_ref(ref: str, app: str, service: str) -> str:
    """The tag that keeps the image a rollback needs from being pruned:
    ``REPO:labkeeper-keep-<app>-<service>`` (a valid tag: at most 128 letters, digits, `_.-`)."""
    repo, _ = split_ref(ref)
    tag = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{KEEP_TAG_PREFIX}{app}-{service}")[:128]
    return f"{repo}:{tag}"


def digest_ref(ref: str, digest: str) -> str:
    """``REPO@sha256:...``: the image by its registry digest."""
    return f"{split_ref(ref)[0]}@{digest}"


# --------------------------------------------------------------------------- models


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


def _none_to_empty(value: Any) -> Any:
    return "" if value is None else value


class Container(_Tolerant):
    """One container from ``docker compose ps --format json`` (any version)."""

    id: str = Field("", alias="ID")
    name: str = Field("", alias="Name")
    service: str = Field("", alias="Service")
    project: str = Field("", alias="Project")
    image: str = Field("", alias="Image")
    state: str = Field("", alias="State")
    status: str = Field("", alias="Status")
    health: str = Field("", alias="Health")
    exit_code: int = Field(0, alias="ExitCode")
    labels: dict[str, str] = Field(default_factory=dict, alias="Labels")

    @field_validator("id", "name", "service", "project", "image", "state", "status",
                     "health", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _none_to_empty(value)

    @field_validator("labels", mode="before")
    @classmethod
    def _labels(cls, value: Any) -> Any:
        return parse_labels(value)

    @property
    def health_state(self) -> Health:
        """Health from the ``Health`` field, else from ``Status`` text."""
        h = self.health.strip().lower()
        if h in ("starting", "healthy", "unhealthy"):
            return h  # type: ignore[return-value]
        status = self.status.lower()
        if "(health: starting)" in status:
            return "starting"
        if "(unhealthy)" in status:
            return "unhealthy"
        if "(healthy)" in status:
            return "healthy"
        return ""

    @property
    def image_id(self) -> str | None:
        """The image ID compose recorded on the container (≥2.21 labels)."""
        return self.labels.get("com.docker.compose.image") or None

    @property
    def service_name(self) -> str:
        return self.service or self.labels.get("com.docker.compose.service", "")


class ImageRow(_Tolerant):
    """One row of ``docker compose images --format json`` (any version)."""

    id: str = Field("", alias="ID")
    container: str = Field("", alias="ContainerName")
    repository: str = Field("", alias="Repository")
    tag: str = Field("", alias="Tag")
    platform: str = Field("", alias="Platform")
    size: int = Field(0, alias="Size")

    @field_validator("id", "container", "repository", "tag", "platform", mode="before")
    @classmethod
    def _text(cls, value: Any) -> Any:
        return _none_to_empty(value)

    @property
    def reference(self) -> str:
        if not self.repository or self.repository == "<none>":
            return self.id
        return f"{self.repository}:{self.tag}" if self.tag and self.tag != "<none>" \
            else self.repository


class ImageInfo(_Tolerant):
    """One entry of ``docker image inspect`` (the fields labkeeper reads)."""

    id: str = Field("", alias="Id")
    repo_tags: list[str] = Field(default_factory=list, alias="RepoTags")
    repo_digests: list[str] = Field(default_factory=list, alias="RepoDigests")

    @field_validator("repo_tags", "repo_digests", mode="before")
    @classmethod
    def _list(cls, value: Any) -> Any:
        return [] if value is None else value

    def digest_for(self, ref: str) -> str:
        """The registry digest (``sha256:...``) of this image in ``ref``'s repository,
        else the only one it has; "" when it never came from a registry."""
        repo, _ = split_ref(ref)
        digests = [split_ref(d) for d in self.repo_digests if "@" in d]
        for r, digest in digests:
            if r == repo:
                return digest
        return digests[0][1] if len(digests) == 1 else ""


def parse_image_inspect(text: str) -> list[ImageInfo]:
    """``docker image inspect`` output: a JSON array (``[]`` when nothing was found)."""
    return [ImageInfo.model_validate(row)
            for row in _flatten(_json_documents(text), "image inspect")]


def parse_labels(value: Any) -> dict[str, str]:
    """Labels as docker prints them: ``k=v,k2=v2`` (values may contain ``,``) or a map."""
    if value is None or value == "":
        return {}
    if isinstance(value, Mapping):
        return {str(k): str(v) for k, v in value.items()}
    text = str(value)
    out: dict[str, str] = {}
    # A new label starts at ",key=" where key looks like a label name; anything else
    # (a comma inside a value, e.g. depends_on=a:x:false,b:y:false) stays in the value.
    parts = re.split(r",(?=[A-Za-z0-9_.\-/]+=)", text)
    for part in parts:
        key, sep, val = part.partition("=")
        if sep:
            out[key] = val
    return out


# --------------------------------------------------------------------------- parsers


class ComposeOutputError(ValueError):
    """Output that no known compose version prints."""


def _json_documents(text: str) -> list[Any]:
    """One JSON document, or NDJSON (one per line)."""
    stripped = text.strip()
    if not stripped:
        return []
    try:
        return [json.loads(stripped)]
    except json.JSONDecodeError:
        pass
    docs = []
    for n, line in enumerate(stripped.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            docs.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ComposeOutputError(f"line {n} is not JSON: {exc.msg}") from None
    return docs


def _flatten(docs: Iterable[Any], what: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for doc in docs:
        if doc is None:
            continue
        if isinstance(doc, list):
            for item in doc:
                if not isinstance(item, dict):
                    raise ComposeOutputError(f"{what}: array item is not an object")
                rows.append(item)
        elif isinstance(doc, dict):
            rows.append(doc)
        else:
            raise ComposeOutputError(f"{what}: unexpected JSON {type(doc).__name__}")
    return rows


def parse_ps(text: str) -> list[Container]:
    """``docker compose ps --format json`` of any version: array, NDJSON, empty."""
    return [Container.model_validate(row) for row in _flatten(_json_documents(text), "ps")]


def parse_images(text: str) -> list[ImageRow]:
    """``docker compose images --format json``: list, 2.37.0's map, ``null``, empty."""
    rows: list[ImageRow] = []
    for doc in _json_documents(text):
        if isinstance(doc, dict) and not _looks_like_image(doc):
            # 2.37.0: {"<container>": {...image...}, ...}
            for container, item in doc.items():
                if not isinstance(item, dict):
                    raise ComposeOutputError("images: map value is not an object")
                row = ImageRow.model_validate(item)
                if not row.container:
                    row = row.model_copy(update={"container": str(container)})
                rows.append(row)
            continue
        rows.extend(ImageRow.model_validate(r) for r in _flatten([doc], "images"))
    return rows


def _looks_like_image(doc: Mapping[str, Any]) -> bool:
    return "ID" in doc or "Repository" in doc


# --------------------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class ServiceImage:
    service: str
    container: str
    image: str
    """What the service runs: ``repo:tag`` as compose shows it."""
    image_id: str
    """The content address (``sha256:...``), or "" when unknown."""

    def text(self) -> str:
        short = self.image_id.removeprefix("sha256:")[:12]
        return f"{self.image}@{short}" if short else self.image


def service_images(containers: Sequence[Container],
                   images: Sequence[ImageRow] = ()) -> dict[str, ServiceImage]:
    """Per service: the image it runs and its ID (labels first, then the images list)."""
    by_container = {i.container: i for i in images if i.container}
    by_ref = {i.reference: i for i in images}
    out: dict[str, ServiceImage] = {}
    for c in sorted(containers, key=lambda c: c.name):
        svc = c.service_name
        if not svc or svc in out:
            continue
        image_id = c.image_id or ""
        row = by_container.get(c.name) or by_ref.get(c.image)
        if not image_id and row is not None:
            image_id = row.id
        out[svc] = ServiceImage(svc, c.name, c.image or (row.reference if row else ""),
                                image_id)
    if not containers:  # images alone (ContainerName is <project>-<service>-<n>)
        for row in images:
            key = re.sub(r"-\d+$", "", row.container) or row.reference
            out.setdefault(key, ServiceImage(key, row.container, row.reference, row.id))
    return out


@dataclass(frozen=True)
class ContainerVerdict:
    ok: bool
    detail: str
    waiting: bool = False
    """True when a container is still ``starting`` (worth waiting for)."""


def container_health(containers: Sequence[Container],
                     services: Sequence[str] = ()) -> ContainerVerdict:
    """Are the services healthy? Named services must each have a running container
    that is ``healthy`` (or has no healthcheck); with no names, every container with
    a healthcheck must be healthy and none may be exited or restarting."""
    problems: list[str] = []
    waiting = False
    by_service: dict[str, list[Container]] = {}
    for c in containers:
        by_service.setdefault(c.service_name, []).append(c)
    wanted = list(services) or sorted(by_service)
    if not wanted:
        return ContainerVerdict(False, "no containers")
    for svc in wanted:
        cs = by_service.get(svc, [])
        if not cs:
            problems.append(f"{svc}: no container")
            continue
        for c in cs:
            state = c.state.lower()
            health = c.health_state
            if state != "running":
                if not services and state == "exited" and c.exit_code == 0 and not health:
                    continue  # a one-shot init container that finished fine
                problems.append(f"{c.name or svc}: {state or 'unknown state'}")
            elif health == "unhealthy":
                problems.append(f"{c.name or svc}: unhealthy")
            elif health == "starting":
                waiting = True
                problems.append(f"{c.name or svc}: health starting")
    if problems:
        return ContainerVerdict(False, "; ".join(problems), waiting)
    return ContainerVerdict(True, f"{len(wanted)} service(s) up")
