"""The provisioning plan: per guest an action and its changes, readable as a table,
markdown and JSON. Computed by :mod:`labkeeper.provision.diff`, run by
:mod:`labkeeper.provision.apply`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal
from urllib.parse import unquote

Action = Literal["create", "change", "leave", "destroy", "absent", "unmanaged", "protected",
                 "conflict"]


@dataclass(frozen=True)
class Change:
    """One difference between Proxmox and the inventory."""

    key: str
    old: str | None
    new: str | None
    kind: Literal["set", "delete", "grow", "start", "protect", "refused"] = "set"
    needs_restart: bool = False
    note: str = ""

    def text(self) -> str:
        if self.kind == "start":
            return "start (stopped → running)"
        old = short_value(self.key, self.old)
        new = short_value(self.key, self.new)
        text = f"{self.key}: {old} → {new}"
        if self.kind == "grow":
            text += " (grow)"
        if self.kind == "refused":
            text += f" REFUSED: {self.note}"
        elif self.needs_restart:
            text += " [restart]"
        return text


def short_value(key: str, value: str | None) -> str:
    if value is None:
        return "∅"
    if key == "sshkeys":
        return f"{len(unquote(value).splitlines())} key(s)"
    return value if len(value) <= 60 else value[:57] + "..."


@dataclass(frozen=True)
class GuestPlan:
    name: str
    vmid: int
    type: str
    node: str
    action: Action
    changes: tuple[Change, ...] = ()
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    status: str | None = None
    in_inventory: bool = True

    @property
    def needs_restart(self) -> bool:
        return any(c.needs_restart for c in self.changes)

    @property
    def touches(self) -> bool:
        return self.action in ("create", "change", "destroy")

    def summary(self) -> str:
        parts = [c.text() for c in self.changes]
        parts += [f"PROBLEM: {p}" for p in self.problems]
        parts += list(self.notes)
        return "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["needs_restart"] = self.needs_restart
        d["changes"] = [asdict(c) for c in self.changes]
        d["problems"] = list(self.problems)
        d["notes"] = list(self.notes)
        return d


@dataclass(frozen=True)
class Plan:
    lab: str
    guests: tuple[GuestPlan, ...]
    max_changes_without_yes: int = 5

    @property
    def touched(self) -> list[GuestPlan]:
        return [g for g in self.guests if g.touches]

    @property
    def problems(self) -> list[str]:
        return [f"{g.name} ({g.vmid}): {p}" for g in self.guests for p in g.problems]

    @property
    def is_empty(self) -> bool:
        """Nothing to create, change or destroy, and nothing wrong."""
        return not self.touched and not self.problems

    @property
    def needs_yes(self) -> bool:
        return len(self.touched) > self.max_changes_without_yes

    def guest(self, name: str) -> GuestPlan:
        for g in self.guests:
            if g.name == name:
                return g
        raise KeyError(name)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.guests:
            out[g.action] = out.get(g.action, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"lab": self.lab, "counts": self.counts(), "touched": len(self.touched),
                "needs_yes": self.needs_yes, "needs_restart": [
                    g.name for g in self.guests if g.needs_restart],
                "problems": self.problems, "guests": [g.to_dict() for g in self.guests]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    def rows(self) -> list[dict[str, Any]]:
        return [{"guest": g.name, "vmid": g.vmid, "type": g.type, "node": g.node,
                 "action": g.action, "restart": "yes" if g.needs_restart else "",
                 "details": g.summary()} for g in self.guests]

    def headline(self) -> str:
        c = self.counts()
        parts = [f"{c[a]} {a}" for a in ("create", "change", "destroy", "leave", "absent",
                                          "unmanaged", "protected", "conflict") if c.get(a)]
        text = f"plan for lab {self.lab}: " + (", ".join(parts) or "no guests")
        if self.is_empty:
            text += " — nothing to do"
        return text

    def table(self) -> str:
        """A plain-text table (the CLI prints a rich table from :meth:`rows`)."""
        rows = self.rows()
        cols = ("guest", "vmid", "type", "node", "action", "restart", "details")
        widths = {c: max([len(c), *(len(str(r[c])) for r in rows)]) for c in cols[:-1]}
        lines = [self.headline(), "  ".join(c.ljust(widths.get(c, 0)) for c in cols)]
        for r in rows:
            lines.append("  ".join(str(r[c]).ljust(widths.get(c, 0)) for c in cols).rstrip())
        for p in self.problems:
            lines.append(f"problem: {p}")
        return "\n".join(lines)

    def markdown(self) -> str:
        icon = {"create": "🆕", "change": "✏️", "destroy": "🗑️", "leave": "·", "absent": "·",
                "unmanaged": "👤", "protected": "🔒", "conflict": "❌"}
        lines = [f"# Provisioning plan — {self.lab}", "", self.headline(), "",
                 "| | guest | vmid | type | node | action | restart | details |",
                 "|---|---|---|---|---|---|---|---|"]
        for r in self.rows():
            details = str(r["details"]).replace("|", "\\|")
            lines.append(f"| {icon.get(r['action'], '')} | {r['guest']} | {r['vmid']} | "
                         f"{r['type']} | {r['node']} | {r['action']} | {r['restart']} | "
                         f"{details} |")
        if self.problems:
            lines += ["", "## Problems", *(f"- {p}" for p in self.problems)]
        if self.needs_yes:
            lines += ["", f"**The plan touches {len(self.touched)} guests (more than "
                          f"{self.max_changes_without_yes}): apply needs `--yes`.**"]
        return "\n".join(lines)
