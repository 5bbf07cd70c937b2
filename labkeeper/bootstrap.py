"""Bootstrap a guest over SSH from its inventory roles: packages, files, commands, Compose.

Steps are built by pure functions (:func:`role_steps`) as data — what to check and
what to change — and run by :func:`run_step` through an :class:`~labkeeper.ssh.SshClient`
with one shape: *check*, and *change only when the check says so*. Each step
reports ``changed`` or ``unchanged``; a rerun after a crash converges:

* ``packages``: ``dpkg-query`` lists what is installed; ``apt-get install`` only the
  missing ones;
* ``file``: ``sha256sum`` + ``stat`` compare content, mode and owner; the file is
  written atomically (SFTP, temp name, rename) with its mode set before any byte;
* ``dir``: ``stat``, then ``install -d``;
* ``commands``: the role's idempotent setup commands run when the role's digest
  (its definition and the content of its files) differs from the marker written on
  the guest after their last successful run — so a crash before the marker is
  written reruns them;
* ``compose-git``: clone, or fetch and check out ``git_ref``;
* ``compose-deploy``: ``docker compose up -d`` when the compose file or ``.env``
  changed since the last deploy (marker) or no container runs. A guest without
  Docker fails with "docker not found on <host>".

Templates: ``{{ guest.name }}``, ``{{ guest.vmid }}``, ``{{ guest.address }}``,
``{{ guest.node }}``, ``{{ lab.name }}``, ``{{ lab.domain }}``, ``{{ lab.timezone }}``
and ``{{ secret:REF }}`` (a secret reference, resolved at run time; a file using
one is a secret file: written 0600 unless ``mode`` says otherwise, never shown).
The ``.env`` of a Compose stack is always written 0600, its secrets by reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from labkeeper import compose
from labkeeper.errors import CommandError, ConfigError, LabkeeperError, ServiceError
from labkeeper.inventory import ComposeStack, Guest, Inventory, Role, RoleFile, check_git_ref
from labkeeper.provision import StepResult
from labkeeper.secrets import redact, resolve

logger = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/labkeeper"
"""Where markers live on the guest (``roles/<role>.sha256``, ``compose/<project>.sha256``)."""
APT_ENV = {"DEBIAN_FRONTEND": "noninteractive"}
COMMAND_TIMEOUT = 1800.0
CHECK_TIMEOUT = 60.0

class BootstrapError(LabkeeperError):
    """A bootstrap command failed (transient when the command's failure was)."""


Kind = Literal["packages", "dir", "file", "commands", "compose-git", "compose-deploy"]


@dataclass(frozen=True)
class Step:
    """One bootstrap step (data only; :func:`run_step` interprets it)."""

    kind: Kind
    name: str
    path: str = ""
    packages: tuple[str, ...] = ()
    content: bytes = b""
    mode: int = 0o644
    owner: str = "root"
    group: str = "root"
    secret: bool = False
    argvs: tuple[tuple[str, ...], ...] = ()
    marker: str = ""
    digest: str = ""
    url: str = ""
    ref: str | None = None
    project: str = ""
    compose_file: str = ""
    env_digest: str = ""
    docker_host: str | None = None

    def __repr__(self) -> str:  # never show content (may be a secret)
        return f"Step({self.kind}, {self.name!r})"


# ====================================================================== templating

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z0-9_.:/@!+-]+)\s*\}\}")


def template_context(inv: Inventory, guest: Guest) -> dict[str, str]:
    return {
        "guest.name": guest.name, "guest.vmid": str(guest.vmid),
        "guest.address": guest.address or "", "guest.node": guest.node,
        "lab.name": inv.lab.name, "lab.domain": inv.lab.domain or "",
        "lab.timezone": inv.lab.timezone,
    }


def render(text: str, context: Mapping[str, str], *, where: str = "template",
           resolve_secret: Callable[[str], str] | None = None) -> tuple[str, bool]:
    """Fill ``{{ name }}`` placeholders; returns (text, used a secret). Unknown → ConfigError."""
    used_secret = False
    unknown: list[str] = []

    def repl(match: re.Match[str]) -> str:
        nonlocal used_secret
        name = match.group(1)
        if name.startswith("secret:"):
            used_secret = True
            ref = name[len("secret:"):]
            return (resolve_secret or _resolve)(ref)
        if name not in context:
            unknown.append(name)
            return match.group(0)
        return context[name]

    out = _PLACEHOLDER.sub(repl, text)
    if unknown:
        raise ConfigError(f"{where}: unknown placeholder(s) {', '.join(sorted(set(unknown)))}; "
                          f"known: {', '.join(sorted(context))} and secret:REF")
    return out, used_secret


def _resolve(ref: str) -> str:
    return resolve(ref).get_secret_value()


# ====================================================================== pure step builders


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_package(spec: str) -> str:
    """``nginx=1.22-1`` → ``nginx``; ``libc6:amd64`` stays (dpkg-query knows it)."""
    return spec.split("=", 1)[0]


def packages_check_argv(packages: Sequence[str]) -> tuple[str, ...]:
    return ("dpkg-query", "-W", "-f=${Package}\t${db:Status-Abbrev}\n",
            *(base_package(p) for p in packages))


def parse_dpkg_query(output: str) -> set[str]:
    """Names of installed packages in ``dpkg-query -W -f='${Package}\\t${db:Status-Abbrev}'``."""
    installed = set()
    for line in output.splitlines():
        name, _, status = line.partition("\t")
        if status.strip().startswith("ii"):
            installed.add(name.strip())
    return installed


def missing_packages(packages: Sequence[str], installed: set[str]) -> list[str]:
    """Wanted packages that are not installed (``libc6`` is satisfied by ``libc6:amd64``)."""
    names = installed | {name.split(":", 1)[0] for name in installed}
    return [p for p in packages if base_package(p) not in names]


def install_argvs(missing: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    return (("apt-get", "update", "-q"),
            ("apt-get", "install", "-y", "-q", "--no-install-recommends", *missing))


def file_steps_of(role_name: str, rf: RoleFile, *, base_dir: Path, context: Mapping[str, str],
                  resolve_secret: Callable[[str], str] | None = None) -> Step:
    where = f"roles.{role_name} file {rf.path}"
    secret = rf.secret is not None
    if rf.secret is not None:
        data = (resolve_secret or _resolve)(rf.secret)
    else:
        if rf.source is not None:
            src = base_dir / rf.source
            try:
                raw = src.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{where}: cannot read source {src}: {exc.strerror}") \
                    from None
        else:
            raw = rf.content or ""
        data, secret = render(raw, context, where=where, resolve_secret=resolve_secret)
    mode = rf.mode if rf.mode is not None else (0o600 if secret else 0o644)
    return Step("file", f"file {rf.path}", path=str(rf.path), content=data.encode("utf-8"),
                mode=mode, owner=rf.owner, group=rf.group, secret=secret)


def env_file_content(stack: ComposeStack,
                     resolve_secret: Callable[[str], str] | None = None) -> str:
    """The stack's ``.env``: plain entries, then secrets resolved from their references."""
    lines = []
    for name, value in sorted(stack.environment.items()):
        lines.append(f"{name}={_env_value(name, value)}")
    for name, ref in sorted(stack.secrets.items()):
        lines.append(f"{name}={_env_value(name, (resolve_secret or _resolve)(ref))}")
    return "\n".join(lines) + ("\n" if lines else "")


def _env_value(name: str, value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ConfigError(f".env {name}: values cannot hold newlines")
    return value


def compose_project(stack: ComposeStack) -> str:
    return stack.project or posixpath.basename(str(stack.dir).rstrip("/"))


def _compose_argv(stack: ComposeStack) -> tuple[str, ...]:
    d = str(stack.dir)
    return (*compose.docker_argv(stack.docker_host), "compose", "--project-directory", d,
            "-p", compose_project(stack), "-f", posixpath.join(d, stack.file))


def compose_up_argv(stack: ComposeStack) -> tuple[str, ...]:
    """``up -d --wait``: deployed means running and healthy (where a healthcheck exists)."""
    return (*_compose_argv(stack), "up", "-d", "--remove-orphans", "--wait")


def compose_ps_argv(stack: ComposeStack) -> tuple[str, ...]:
    return (*_compose_argv(stack), "ps", "--all", "--format", "json")


def compose_services_argv(stack: ComposeStack) -> tuple[str, ...]:
    return (*_compose_argv(stack), "config", "--services")


def engine_argv(docker_host: str | None) -> tuple[str, ...]:
    """Asks the engine (not only the client) for its version."""
    return (*compose.docker_argv(docker_host), "version", "--format", "{{.Server.Version}}")


def git_argvs(stack: ComposeStack) -> dict[str, tuple[str, ...]]:
    """The git commands of a compose checkout. ``--`` ends the options wherever a URL
    or ref follows, and the ref is checked again here (it must never read as an
    option such as ``--upload-pack=...``)."""
    d, url = str(stack.dir), stack.git_url or ""
    ref = stack.git_ref or "HEAD"
    try:
        check_git_ref(ref)
    except ValueError as exc:
        raise ConfigError(f"compose git_ref {ref!r}: {exc}") from None
    return {
        "head": ("git", "-C", d, "rev-parse", "HEAD"),
        "origin": ("git", "-C", d, "remote", "get-url", "origin"),
        "remote": ("git", "ls-remote", "--", url, ref),
        "clone": ("git", "clone", "--quiet", *(("--branch", stack.git_ref)
                                                if stack.git_ref else ()), "--", url, d),
        "fetch": ("git", "-C", d, "fetch", "--quiet", "--", "origin", ref),
        "checkout": ("git", "-C", d, "checkout", "--quiet", "--detach", "FETCH_HEAD"),
    }


def role_digest(role: Role, files: Sequence[Step]) -> str:
    """What the role's commands were last run for: its definition and its files' content."""
    payload = json.dumps({"role": role.model_dump(mode="json"),
                          "files": {s.path: _sha(s.content) for s in files}}, sort_keys=True)
    return _sha(payload.encode())


def role_steps(inv: Inventory, guest: Guest, role_name: str, *, base_dir: Path,
               state_dir: str = DEFAULT_STATE_DIR,
               resolve_secret: Callable[[str], str] | None = None) -> list[Step]:
    """Every step of one role on one guest, in order (pure apart from reading sources
    and resolving secret references)."""
    role = inv.role(role_name)
    ctx = template_context(inv, guest)
    steps: list[Step] = []
    if role.packages:
        steps.append(Step("packages", "packages", packages=tuple(role.packages)))
    files = [file_steps_of(role_name, rf, base_dir=base_dir, context=ctx,
                           resolve_secret=resolve_secret) for rf in role.files]
    steps += files
    stack = role.compose
    if stack is not None:
        d = str(stack.dir)
        steps.append(Step("dir", f"compose dir {d}", path=d, mode=0o750))
        if stack.git_url is not None:
            steps.append(Step("compose-git", f"compose git {redact(stack.git_url)}", path=d,
                              url=stack.git_url, ref=stack.git_ref))
        elif stack.source is not None:
            src = base_dir / stack.source
            if not src.is_dir():
                raise ConfigError(f"roles.{role_name}.compose.source: {src} is not a directory")
            for f in sorted(p for p in src.rglob("*") if p.is_file()):
                rel = f.relative_to(src).as_posix()
                text, secret = render(f.read_text(encoding="utf-8"), ctx,
                                      where=f"{src}/{rel}", resolve_secret=resolve_secret)
                files.append(Step("file", f"file {posixpath.join(d, rel)}",
                                  path=posixpath.join(d, rel), content=text.encode(),
                                  mode=0o600 if secret else 0o644, secret=secret))
                steps.append(files[-1])
        env = env_file_content(stack, resolve_secret).encode()
        steps.append(Step("file", f"file {posixpath.join(d, '.env')}",
                          path=posixpath.join(d, ".env"), content=env, mode=0o600,
                          secret=True))
    if role.commands:
        steps.append(Step("commands", f"commands ({len(role.commands)})",
                          argvs=tuple(tuple(a) for a in role.commands),
                          marker=posixpath.join(state_dir, "roles", f"{role_name}.sha256"),
                          digest=role_digest(role, files)))
    if stack is not None:
        project = compose_project(stack)
        env_digest = _sha(env_file_content(stack, resolve_secret).encode())
        steps.append(Step("compose-deploy", f"compose up {project}", path=str(stack.dir),
                          project=project, compose_file=stack.file, env_digest=env_digest,
                          marker=posixpath.join(state_dir, "compose", f"{project}.sha256"),
                          docker_host=stack.docker_host,
                          argvs=(compose_up_argv(stack), compose_ps_argv(stack),
                                 compose_services_argv(stack))))
    return steps


def guest_steps(inv: Inventory, guest: Guest, *, base_dir: Path,
                state_dir: str = DEFAULT_STATE_DIR) -> list[tuple[str, Step]]:
    """(role, step) for every role of the guest, in the inventory's order."""
    return [(role, step) for role in guest.roles
            for step in role_steps(inv, guest, role, base_dir=base_dir, state_dir=state_dir)]


# ====================================================================== running


@dataclass(frozen=True)
class StepOutcome:
    step: str
    status: Literal["changed", "unchanged"]
    detail: str = ""


def _run(client: Any, argv: Sequence[str], *, timeout: float = CHECK_TIMEOUT,
         check: bool = True, env: Mapping[str, str] | None = None) -> Any:
    return client.run(tuple(argv), timeout=timeout, check=check, env=dict(env) if env else None)


def _read_marker(client: Any, path: str) -> str | None:
    try:
        return client.read_text(path).strip()
    except FileNotFoundError:
        return None


def _write_marker(client: Any, path: str, digest: str) -> None:
    _run(client, ("mkdir", "-p", posixpath.dirname(path)))
    client.put_text(digest + "\n", path, mode=0o644)


_ID_CACHE_ATTR = "_labkeeper_ids"


def owner_ids(client: Any, owner: str, group: str) -> tuple[int, int]:
    """Numeric uid/gid of ``owner``/``group`` on the guest (root is 0; others asked once)."""
    cache: dict[tuple[str, str], tuple[int, int]] = client.__dict__.setdefault(_ID_CACHE_ATTR, {})
    if (owner, group) not in cache:
        uid = 0 if owner == "root" else int(_run(client, ("id", "-u", owner)).stdout.strip())
        gid = 0 if group == "root" else int(
            _run(client, ("getent", "group", group)).stdout.split(":")[2])
        cache[(owner, group)] = (uid, gid)
    return cache[(owner, group)]


def _stat(client: Any, path: str) -> Any:
    try:
        return client.stat(path)
    except FileNotFoundError:
        return None


def run_step(client: Any, step: Step, *, host: str,
             command_timeout: float = COMMAND_TIMEOUT) -> StepOutcome:
    """Check, then change only if needed."""
    if step.kind == "packages":
        res = _run(client, packages_check_argv(step.packages), check=False)
        missing = missing_packages(step.packages, parse_dpkg_query(res.stdout))
        if not missing:
            return StepOutcome(step.name, "unchanged", f"installed: {' '.join(step.packages)}")
        for argv in install_argvs(missing):
            _run(client, argv, timeout=command_timeout, env=APT_ENV)
        return StepOutcome(step.name, "changed", f"installed {' '.join(missing)}")
    if step.kind == "dir":
        st = _stat(client, step.path)
        ids = owner_ids(client, step.owner, step.group)
        if st is not None and st.is_dir and st.mode == step.mode and (st.uid, st.gid) == ids:
            return StepOutcome(step.name, "unchanged")
        _run(client, ("install", "-d", "-m", f"{step.mode:o}", "-o", step.owner, "-g",
                      step.group, step.path))
        return StepOutcome(step.name, "changed", f"mode {step.mode:o}")
    if step.kind == "file":
        return _file(client, step)
    if step.kind == "commands":
        if _read_marker(client, step.marker) == step.digest:
            return StepOutcome(step.name, "unchanged", "role unchanged since the last run")
        for argv in step.argvs:
            _run(client, argv, timeout=command_timeout)
        _write_marker(client, step.marker, step.digest)
        return StepOutcome(step.name, "changed", f"ran {len(step.argvs)} command(s)")
    if step.kind == "compose-git":
        return _git(client, step, command_timeout)
    if step.kind == "compose-deploy":
        return _deploy(client, step, host=host, command_timeout=command_timeout)
    raise ValueError(f"unknown step kind {step.kind!r}")


def _file(client: Any, step: Step) -> StepOutcome:
    ids = owner_ids(client, step.owner, step.group)
    st = _stat(client, step.path)
    same_content = False
    if st is not None and st.is_file and st.size == len(step.content):
        buf = bytearray()
        client.get_stream(step.path, buf.extend)
        same_content = _sha(bytes(buf)) == _sha(step.content)
    if same_content and st.mode == step.mode and (st.uid, st.gid) == ids:
        return StepOutcome(step.name, "unchanged")
    what = []
    if not same_content:
        parent = posixpath.dirname(step.path)
        if _stat(client, parent) is None:
            _run(client, ("mkdir", "-p", parent))
        client.put_stream(step.content, step.path, mode=step.mode)
        what.append("created" if st is None else "content updated")
        st = client.stat(step.path)
    if (st.uid, st.gid) != ids:
        _run(client, ("chown", f"{step.owner}:{step.group}", step.path))
    if st.mode != step.mode:
        _run(client, ("chmod", f"{step.mode:o}", step.path))
    if same_content:
        what.append(f"mode/owner → {step.mode:o} {step.owner}:{step.group}")
    return StepOutcome(step.name, "changed",
                       "; ".join(what) + (" (secret)" if step.secret else ""))


def _git(client: Any, step: Step, timeout: float) -> StepOutcome:
    stack = ComposeStack(dir=Path(step.path), git_url=step.url, git_ref=step.ref)
    a = git_argvs(stack)
    origin = _run(client, a["origin"], check=False)
    if origin.returncode != 0:
        _run(client, a["clone"], timeout=timeout)
        return StepOutcome(step.name, "changed", f"cloned {redact(step.url or '')}")
    if origin.stdout.strip() != step.url:
        raise ConfigError(f"{step.path} is a checkout of {redact(origin.stdout.strip())}, "
                          f"not {redact(step.url or '')}")
    remote = _run(client, a["remote"], timeout=timeout).stdout.split()
    head = _run(client, a["head"]).stdout.strip()
    if remote and remote[0] == head:
        return StepOutcome(step.name, "unchanged", f"at {head[:12]}")
    _run(client, a["fetch"], timeout=timeout)
    _run(client, a["checkout"])
    return StepOutcome(step.name, "changed", f"checked out {step.ref or 'HEAD'}")


def docker_problem(result: Any, host: str) -> str | None:
    """What ``docker compose version`` failing says about the host (None: it worked)."""
    if result.returncode == 0:
        return None
    text = f"{result.stdout}\n{result.stderr}".lower()
    if result.returncode == 127 or "command not found" in text or "no such file" in text:
        return f"docker not found on {host}"
    if "unknown command" in text or "is not a docker command" in text:
        return f"docker compose not found on {host} (docker is there, its compose plugin is not)"
    if "cannot connect to the docker daemon" in text or "is the docker daemon running" in text:
        return f"the Docker engine on {host} does not answer: {text.strip()[:300]}"
    return f"docker compose does not work on {host}: {text.strip()[:300]}"


def _deploy(client: Any, step: Step, *, host: str, command_timeout: float) -> StepOutcome:
    problem = docker_problem(_run(client, ("docker", "compose", "version"),
                                  check=False), host)
    if problem is not None:
        raise ServiceError(f"{problem}: install Docker with the compose plugin (e.g. a "
                           f"docker-host role) before deploying {step.project}",
                           service="docker", transient=False)
    engine = _run(client, engine_argv(step.docker_host), check=False)
    if engine.returncode != 0:
        where = step.docker_host or "the default socket"
        raise ServiceError(f"the Docker engine on {host} does not answer at {where}: "
                           f"{(engine.stderr or engine.stdout).strip()[-300:]}",
                           service="docker", transient=True)
    compose_path = posixpath.join(step.path, step.compose_file)
    sums = _run(client, ("sha256sum", compose_path), check=False)
    if sums.returncode != 0:
        raise ConfigError(f"{host}: {compose_path} does not exist (compose source missing)")
    digest = _sha(f"{sums.stdout.split()[0]}:{step.env_digest}".encode())
    up_argv, ps_argv, services_argv = step.argvs
    if _read_marker(client, step.marker) == digest:
        up = _stack_up(client, ps_argv, services_argv)
        if up is not None:
            return StepOutcome(step.name, "unchanged", f"stack up to date: {up}")
    _run(client, up_argv, timeout=command_timeout)
    _write_marker(client, step.marker, digest)
    return StepOutcome(step.name, "changed", f"deployed {step.project}")


def _stack_up(client: Any, ps_argv: Sequence[str], services_argv: Sequence[str]) -> str | None:
    """What runs when every service of the stack has a running, not unhealthy container
    (None otherwise: the stack needs an ``up``)."""
    services = _run(client, services_argv, check=False)
    ps = _run(client, ps_argv, check=False)
    if services.returncode != 0 or ps.returncode != 0:
        return None
    names = services.stdout.split()
    try:
        containers = compose.parse_ps(ps.stdout)
    except compose.ComposeOutputError:
        return None
    verdict = compose.container_health(containers, names)
    if not names or not verdict.ok or verdict.waiting:
        return None
    return verdict.detail


@dataclass
class BootstrapReport:
    guest: str
    outcomes: list[tuple[str, StepOutcome]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(o.status == "changed" for _, o in self.outcomes)

    def detail(self) -> str:
        return "; ".join(f"{role}/{o.step}: {o.status}" + (f" ({o.detail})" if o.detail
                                                             and o.status == "changed" else "")
                         for role, o in self.outcomes)

    def result(self, seconds: float) -> StepResult:
        return StepResult(self.guest, "bootstrap", "changed" if self.changed else "unchanged",
                          self.detail() or "no roles", seconds)


def bootstrap_guest(client: Any, inv: Inventory, guest: Guest, *, base_dir: Path,
                    state_dir: str = DEFAULT_STATE_DIR) -> BootstrapReport:
    """Run every role step of ``guest`` over ``client`` (each outcome logged); stops at
    the first failure (raising it, with what was done so far in the log)."""
    report = BootstrapReport(guest.name)
    host = f"{guest.name} ({client.target.host})" if hasattr(client, "target") else guest.name
    timeout = inv.ssh.command_timeout
    for role, step in guest_steps(inv, guest, base_dir=base_dir, state_dir=state_dir):
        try:
            outcome = run_step(client, step, host=host, command_timeout=timeout)
        except CommandError as exc:
            raise BootstrapError(f"{guest.name}: role {role}, {step.name}: {exc}",
                                 transient=exc.transient) from exc
        report.outcomes.append((role, outcome))
        logger.info("%s: %s/%s: %s%s", guest.name, role, outcome.step, outcome.status,
                    f" — {outcome.detail}" if outcome.detail else "")
    return report


def run_bootstrap(inv: Inventory, guest: Guest, *, base_dir: Path,
                  state_dir: str = DEFAULT_STATE_DIR) -> StepResult:
    """Connect to the guest (host key checked) and bootstrap it: one :class:`StepResult`."""
    from labkeeper import ssh

    started = time.monotonic()
    spec = inv.ssh_targets().get(guest.name)
    if spec is None:
        return StepResult(guest.name, "bootstrap", "skipped", "no ssh section")
    with ssh.connect(ssh.SshTarget.from_spec(spec)) as client:
        report = bootstrap_guest(client, inv, guest, base_dir=base_dir, state_dir=state_dir)
    return report.result(time.monotonic() - started)
