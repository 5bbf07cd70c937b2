"""Which drills a target means: ``all``, ``db:NAME``, ``guest:NAME``, ``repository``,
``paths:HOST/SET``, ``pitr:NAME`` or a bare name, resolved against the inventory (pure).
"""

from __future__ import annotations

from labkeeper.errors import ConfigError
from labkeeper.inventory import Inventory, PathBackup
from labkeeper.inventory.pitr import pitr_server

KINDS = ("database", "guest", "repository", "paths", "pitr")
_ALIASES = {"db": "database", "database": "database", "guest": "guest", "vm": "guest",
            "ct": "guest", "repo": "repository", "repository": "repository",
            "paths": "paths", "path": "paths", "pitr": "pitr"}


def path_set_target(pb: PathBackup) -> str:
    """The drill target of a path set: ``<host>/<set>`` (label ``paths:<host>/<set>``,
    the series tag of its snapshots)."""
    return f"{pb.host}/{pb.name}"


def find_path_set(inv: Inventory, target: str) -> PathBackup:
    """``<host>/<set>`` or ``<set>`` → the path set."""
    host, slash, name = target.rpartition("/")
    if not slash:
        return inv.path_backup(target)
    pb = inv.path_backup(name)
    if pb.host != host:
        raise ConfigError(f"path set {name!r} is on host {pb.host!r}, not {host!r} "
                          f"(target paths:{path_set_target(pb)})")
    return pb


def plan_targets(inv: Inventory, target: str | None = "all") -> list[tuple[str, str]]:
    """``(kind, name)`` of the drills a target asks for.

    ``all`` (or nothing): every enabled database drill, every present guest with an
    enabled ``drill``, (when ``drills.repository.enabled``) each repository of
    ``drills.repository.repositories`` (default: all), (when
    ``drills.paths.enabled``) each path set of ``drills.paths.path_sets`` (default:
    all), and every server of the ``pitr:`` section (the point-in-time drill,
    :func:`labkeeper.pitr.drill.dr_drill`). ``db:NAME``, ``guest:NAME``,
    ``repository:NAME`` (or ``repository`` for all), ``paths:HOST/SET`` or
    ``paths:SET`` (or ``paths`` for all), ``pitr:NAME`` (or ``pitr`` for all): that
    drill, enabled or not (a manual run). A bare ``NAME`` is looked up among databases,
    guests, repositories, path sets and PITR servers. Path sets are named ``HOST/SET``.
    """
    text = (target or "all").strip()
    if text == "all":
        return _plan_all(inv)
    kind, colon, name = text.partition(":")
    if colon:
        return [_plan_kind(inv, kind, name, text)]
    groups = {"repository": _all_repositories, "repositories": _all_repositories,
              "repo": _all_repositories, "paths": _all_path_sets, "path": _all_path_sets,
              "pitr": _all_pitr}
    if text in groups:
        return groups[text](inv)
    return _plan_bare(inv, text)


def _plan_all(inv: Inventory) -> list[tuple[str, str]]:
    out = [("database", d.name) for d in inv.databases if d.drill.enabled]
    out += [("guest", g.name) for g in inv.guests
            if g.drill is not None and g.drill.enabled and g.state == "present"]
    if inv.drills.repository.enabled:
        out += _all_repositories(inv)
    if inv.drills.paths.enabled:
        out += _all_path_sets(inv)
    return out + _all_pitr(inv)


def _plan_kind(inv: Inventory, kind: str, name: str, text: str) -> tuple[str, str]:
    if kind not in _ALIASES:
        raise ConfigError(f"unknown drill kind {kind!r} in target {text!r} "
                          "(use db:, guest:, repository:, paths: or pitr:)")
    kind = _ALIASES[kind]
    if kind == "database":
        inv.database(name)
    elif kind == "guest":
        name = inv.guest(name).name
    elif kind == "paths":
        name = path_set_target(find_path_set(inv, name))
    elif kind == "pitr":
        name = pitr_server(inv, name).name
    else:
        inv.repository(name)
    return kind, name


def _plan_bare(inv: Inventory, text: str) -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    if any(d.name == text for d in inv.databases):
        found.append(("database", text))
    if any(g.name == text or str(g.vmid) == text for g in inv.guests):
        found.append(("guest", inv.guest(text).name))
    if any(r.name == text for r in inv.repositories):
        found.append(("repository", text))
    if any(pb.name == text or path_set_target(pb) == text for pb in inv.path_backups):
        found.append(("paths", path_set_target(find_path_set(inv, text))))
    if any(s.name == text for s in inv.pitr):
        found.append(("pitr", text))
    if not found:
        known = ([f"db:{d.name}" for d in inv.databases] + [f"guest:{g.name}" for g in inv.guests]
                 + [f"repository:{r.name}" for r in inv.repositories]
                 + [f"paths:{path_set_target(pb)}" for pb in inv.path_backups]
                 + [f"pitr:{s.name}" for s in inv.pitr])
        raise ConfigError(f"no database, guest, repository or path set called {text!r}, nor "
                          f"a PITR server (known: {', '.join(known) or 'none'}, or all)")
    if len(found) > 1:
        raise ConfigError(f"{text!r} names several things ({', '.join(k for k, _ in found)}): "
                          f"say which, e.g. {found[0][0]}:{text}")
    return found


def _all_repositories(inv: Inventory) -> list[tuple[str, str]]:
    repos = inv.drills.repository.repositories or [r.name for r in inv.repositories]
    return [("repository", r) for r in repos]


def _all_pitr(inv: Inventory) -> list[tuple[str, str]]:
    return [("pitr", s.name) for s in inv.pitr]


def _all_path_sets(inv: Inventory) -> list[tuple[str, str]]:
    names = inv.drills.paths.path_sets or [pb.name for pb in inv.path_backups]
    return [("paths", path_set_target(inv.path_backup(n))) for n in names]
