"""The lab inventory: pydantic models of the whole lab, and YAML loading with
file:line errors.

One YAML file describes the lab: the Proxmox connection, nodes and storages, the
guests to provision, plain SSH hosts, bootstrap roles, PostgreSQL databases and
their drills, restic repositories, vzdump jobs, applications with health probes
and rollback, file-tree backups, notifications and drill settings.

Rules:

- Every model is strict (``extra="forbid"``): an unknown key is an error, with a
  "did you mean 'xyz'?" hint when a known key is close.
- Secrets are never in the inventory: every secret field is a
  :data:`labkeeper.secrets.SecretRef` (``env:NAME``, ``file:/path``,
  ``prefect-block:NAME``). Validation messages never echo a rejected value.
- :func:`load_inventory` / :func:`validate_file` report *every* problem at once
  (:mod:`.loader`).

Layout: :mod:`.fields` (field types), :mod:`.base` (the strict base model), one module
per section holding its models *and* its cross-reference checks, :mod:`.root` (the
``Inventory`` model, look-ups, the order of the checks), :mod:`.loader` (YAML).
Behaviour belongs to the flows; this package only describes *shape*, plus a few pure
helpers that read the inventory (:meth:`Inventory.ssh_targets`, look-ups by name,
:meth:`Inventory.secret_refs`).
"""

from labkeeper.inventory.apps import App, AppApt, AppCommands, AppCompose, Gate, MaintenanceWindow
from labkeeper.inventory.base import _did_you_mean, _Model
from labkeeper.inventory.databases import (
    DRILL_DB_PREFIX,
    LOCAL_DOCKER_HOST,
    LOCAL_DRILL_SERVER,
    Database,
    DatabaseContainer,
    DatabaseDrill,
    SmokeQuery,
)
from labkeeper.inventory.drills import (
    Drills,
    DrillServer,
    GuestDrillSettings,
    PathDrillSettings,
    RepositoryDrillSettings,
    VmidRange,
)
from labkeeper.inventory.fields import VMID_MAX, VMID_MIN, check_cron, check_git_ref
from labkeeper.inventory.guests import (
    CloudInit,
    Guest,
    GuestDrill,
    GuestSsh,
    LxcFeatures,
    Nic,
    Resources,
)
from labkeeper.inventory.hosts import Host, SshDefaults, SshTargetSpec
from labkeeper.inventory.loader import (
    _schema_problems,
    load_inventory,
    parse_inventory,
    problems_report,
    validate_file,
    validate_text,
)
from labkeeper.inventory.notifications import Healthchecks, Notifications
from labkeeper.inventory.path_backups import HostCredentials, HostS3Keys, PathBackup
from labkeeper.inventory.probes import CommandProbe, ContainerProbe, HttpProbe, Probe, TcpProbe
from labkeeper.inventory.proxmox import Node, Proxmox, Storage, Tls
from labkeeper.inventory.repositories import S3, CheckPolicy, Pricing, Repository, Retention
from labkeeper.inventory.roles import ComposeStack, Role, RoleFile
from labkeeper.inventory.root import Inventory
from labkeeper.inventory.settings import JobTuning, Lab, Metrics, ProvisionSettings, Settings
from labkeeper.inventory.vzdump import Offsite, PruneRetention, Selection, VzdumpJob
from labkeeper.yaml_loader import Problem, format_path

__all__ = [
    "DRILL_DB_PREFIX",
    "LOCAL_DOCKER_HOST",
    "LOCAL_DRILL_SERVER",
    "S3",
    "VMID_MAX",
    "VMID_MIN",
    "App",
    "AppApt",
    "AppCommands",
    "AppCompose",
    "CheckPolicy",
    "CloudInit",
    "CommandProbe",
    "ComposeStack",
    "ContainerProbe",
    "Database",
    "DatabaseContainer",
    "DatabaseDrill",
    "DrillServer",
    "Drills",
    "Gate",
    "Guest",
    "GuestDrill",
    "GuestDrillSettings",
    "GuestSsh",
    "Healthchecks",
    "Host",
    "HostCredentials",
    "HostS3Keys",
    "HttpProbe",
    "Inventory",
    "JobTuning",
    "Lab",
    "LxcFeatures",
    "MaintenanceWindow",
    "Metrics",
    "Nic",
    "Node",
    "Notifications",
    "Offsite",
    "PathBackup",
    "PathDrillSettings",
    "Pricing",
    "Probe",
    "Problem",
    "ProvisionSettings",
    "Proxmox",
    "PruneRetention",
    "Repository",
    "RepositoryDrillSettings",
    "Resources",
    "Retention",
    "Role",
    "RoleFile",
    "Selection",
    "Settings",
    "SmokeQuery",
    "SshDefaults",
    "SshTargetSpec",
    "Storage",
    "TcpProbe",
    "Tls",
    "VmidRange",
    "VzdumpJob",
    "_Model",
    "_did_you_mean",
    "_schema_problems",
    "check_cron",
    "check_git_ref",
    "format_path",
    "load_inventory",
    "parse_inventory",
    "problems_report",
    "validate_file",
    "validate_text",
]
