"""Evaluate an endpoint's ``permissions`` (from the structure file) — pure code.

A principal's privileges are either ``None`` (unlimited: root@pam, or a token
without a privilege limit), a set of privilege names granted on every path, or
a mapping ``{acl_path: {privs}}`` where a grant on ``/vms`` also covers
``/vms/101`` (ACLs propagate downwards, like PVE with ``propagate=1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

Privileges = None | frozenset[str] | Mapping[str, frozenset[str]]


class PermissionDenied(Exception):
    """Carries PVE's message: ``Permission check failed (/vms/101, VM.Allocate)``."""


@dataclass(frozen=True)
class Principal:
    userid: str  # user@realm, or user@realm!tokenid for tokens
    privileges: Privileges = None

    @property
    def unlimited(self) -> bool:
        return self.privileges is None

    @property
    def user(self) -> str:
        return self.userid.split("!", 1)[0]

    def has(self, path: str, priv: str) -> bool:
        if self.privileges is None:
            return True
        if isinstance(self.privileges, frozenset):
            return priv in self.privileges
        path = "/" + path.strip("/")
        for acl_path, privs in self.privileges.items():
            base = "/" + acl_path.strip("/")
            if (path == base or path.startswith(base.rstrip("/") + "/")) and priv in privs:
                return True
        return False


def _subst(path: str, params: Mapping[str, Any]) -> str | None:
    missing = False

    def repl(match: re.Match[str]) -> str:
        nonlocal missing
        value = params.get(match.group(1))
        if value is None:
            missing = True
            return ""
        return str(value)

    out = re.sub(r"\{([\w-]+)\}", repl, path)
    return None if missing else out


def _check(expr: Any, who: Principal, params: Mapping[str, Any]) -> tuple[bool, str]:
    """(ok, detail of the first failing check)."""
    kind = expr[0]
    check = _CHECKS.get(kind)
    if check is None:
        return False, f"unknown check {kind}"
    return check(expr, who, params)


def _check_perm(expr: Any, who: Principal, params: Mapping[str, Any]) -> tuple[bool, str]:
    """``["perm", path, [privs], "any", 1, "require_param", name]``."""
    path_t, privs = expr[1], list(expr[2])
    opts = dict(zip(expr[3::2], expr[4::2], strict=False))
    req = opts.get("require_param")
    if req is not None and params.get(req) is None:
        return False, f"{path_t}, {','.join(privs)}"
    path = _subst(path_t, params)
    if path is None:
        return False, f"{path_t}, {','.join(privs)}"
    if opts.get("any"):
        ok = any(who.has(path, p) for p in privs)
        return ok, f"{path}, {'|'.join(privs)}"
    for priv in privs:
        if not who.has(path, priv):
            return False, f"{path}, {priv}"
    return True, ""


def _check_and(expr: Any, who: Principal, params: Mapping[str, Any]) -> tuple[bool, str]:
    for sub in expr[1:]:
        ok, detail = _check(sub, who, params)
        if not ok:
            return False, detail
    return True, ""


def _check_or(expr: Any, who: Principal, params: Mapping[str, Any]) -> tuple[bool, str]:
    detail = ""
    for sub in expr[1:]:
        ok, detail = _check(sub, who, params)
        if ok:
            return True, ""
    return False, detail


def _check_userid_param(
    expr: Any, who: Principal, params: Mapping[str, Any]
) -> tuple[bool, str]:
    userid = str(params.get("userid", ""))
    if expr[1] == "self":
        return userid == who.user, "userid-param self"
    realm = userid.split("@", 1)[-1]
    return who.has(f"/access/realm/{realm}", expr[1]), f"/access/realm/{realm}, {expr[1]}"


def _check_userid_group(
    expr: Any, who: Principal, params: Mapping[str, Any]
) -> tuple[bool, str]:
    privs = list(expr[1])
    return any(who.has("/access/groups", p) for p in privs), (
        f"/access/groups, {'|'.join(privs)}"
    )


def _check_perm_modify(
    expr: Any, who: Principal, params: Mapping[str, Any]
) -> tuple[bool, str]:
    path = _subst(expr[1], params) or "/"
    return who.has(path, "Permissions.Modify"), f"{path}, Permissions.Modify"


_CHECKS: dict[str, Callable[[Any, Principal, Mapping[str, Any]], tuple[bool, str]]] = {
    "perm": _check_perm,
    "and": _check_and,
    "or": _check_or,
    "userid-param": _check_userid_param,
    "userid-group": _check_userid_group,
    "perm-modify": _check_perm_modify,
}


def check_permissions(
    permissions: Mapping[str, Any] | None, who: Principal | None, params: Mapping[str, Any]
) -> None:
    """Raise PermissionDenied when ``who`` may not call an endpoint with ``params``."""
    permissions = permissions or {}
    if permissions.get("user") == "world":
        return
    if who is None:
        raise PermissionDenied("Permission check failed")
    if who.unlimited:
        return
    check = permissions.get("check")
    if check:
        ok, detail = _check(check, who, params)
        if not ok:
            raise PermissionDenied(f"Permission check failed ({detail})")
        return
    if permissions.get("user") == "all":
        return
    # No permissions at all: only root may call it (like PVE).
    raise PermissionDenied("Permission check failed (user != root@pam)")


def require(who: Principal, path: str, *privs: str, any_of: bool = False) -> None:
    """Checks that handlers make themselves (vzdump's VM.Backup, create's VM.Allocate …)."""
    if any_of:
        if not any(who.has(path, p) for p in privs):
            raise PermissionDenied(f"Permission check failed ({path}, {'|'.join(privs)})")
        return
    for priv in privs:
        if not who.has(path, priv):
            raise PermissionDenied(f"Permission check failed ({path}, {priv})")
