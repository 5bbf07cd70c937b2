"""The report of a ``repo_maintenance`` run, per repository: the table
``repo-maintenance-<name>`` of what forget kept and removed, and the markdown
``repo-maintenance-<name>-summary`` (bucket usage and cost, prune and check output).
"""

from __future__ import annotations

from typing import Any

from labkeeper.run_report import RunReport


class RepoMaintenanceReport(RunReport):
    def repository(self, name: str, entry: dict[str, Any], *, dry_run: bool) -> None:
        rows = entry["forget"]
        removed = [r for r in rows if r["action"] != "keep"]
        key = f"repo-maintenance-{name}"
        self.table(rows or [{"series": "-", "snapshot": "-", "time": "-", "action": "-"}],
                   f"{name}: {len(removed)} snapshot(s) {'would be ' if dry_run else ''}"
                   f"removed, {len(rows) - len(removed)} kept", key=key)
        self.summary(summary(name, entry, dry_run=dry_run), key=f"{key}-summary")
        self.logger.info("%s: %d removed%s, usage %s", name, len(removed),
                         " (dry run)" if dry_run else "", entry["usage"])


def summary(name: str, entry: dict[str, Any], *, dry_run: bool) -> str:
    usage = entry["usage"]
    md = [f"# {name}{' (dry run)' if dry_run else ''}", ""]
    if usage:
        md += [f"- bucket {usage['bucket']}/{usage['prefix']}: {usage['objects']} objects,"
               f" {usage['GB']} GB, about {usage['monthly cost']} per month",
               f"- versioning: {usage['versioning']}; object lock: {usage['object lock']}"]
    if "prune" in entry:
        md += ["", "## prune", "```", entry["prune"], "```"]
    if "check" in entry:
        md += ["", "## check", "```", entry["check"], "```"]
    return "\n".join(md)
