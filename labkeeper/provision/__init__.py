"""Provisioning: make Proxmox match the inventory's guests — plan first, then apply.

No Prefect here (``flows/provision.py`` runs the steps as tasks). The rooms:

* :mod:`.desired`: the PVE config an inventory guest should have, and how PVE's
  values compare with it (pure);
* :mod:`.diff` reads the cluster with GET requests only and diffs it into a
  :class:`Plan` (:mod:`.plan`: per guest an action, its changes, table/markdown/JSON);
* the steps, each re-reading the state it acts on so a rerun converges:
  :mod:`.create`, :mod:`.converge` (configure, start, protect), :mod:`.ssh_wait`,
  :mod:`.destroy` (``absent`` guests, cleanup of half-made ones); :mod:`.steps` holds
  what they share;
* :mod:`.apply` runs every guest's steps through a pluggable runner and enforces the
  guardrails.

Every name is re-exported here: callers write ``from labkeeper import provision as pv``.
"""

from __future__ import annotations

from labkeeper.provision.apply import (
    ApplyOptions,
    ApplyReport,
    StepRunner,
    apply_plan,
    check_guardrails,
    local_runner,
    results_table,
    run_step,
    steps_for,
)
from labkeeper.provision.converge import (
    converge_guest,
    protect_guest,
    start_guest,
)
from labkeeper.provision.create import (
    create_guest,
    create_request,
    public_key_of,
    ssh_public_keys,
)
from labkeeper.provision.desired import (
    LXC_RESTART_KEYS,
    NET_KEYS_LXC,
    NET_KEYS_QEMU,
    PVE_DEFAULTS,
    PVE_TYPE_DEFAULTS,
    QEMU_DISKS,
    QEMU_MODELS,
    QEMU_RESTART_KEYS,
    SEND_DESCRIPTION,
    GiB,
    desired_config,
    desired_tags,
    disk_key,
    disk_size,
    format_props,
    ipconfig_of,
    lxc_net,
    merged_net,
    parse_props,
    qemu_net,
    same_value,
    size_bytes,
)
from labkeeper.provision.destroy import (
    cleanup_guest,
    cleanup_policy,
    destroy_guest,
)
from labkeeper.provision.diff import (
    Actual,
    config_changes,
    diff_guest,
    guest_order,
    make_plan,
    read_actual,
    read_plan,
)
from labkeeper.provision.errors import (
    GuestUnreachable,
    ProvisionError,
    TooManyChanges,
    VmidTaken,
)
from labkeeper.provision.plan import (
    Action,
    Change,
    GuestPlan,
    Plan,
)
from labkeeper.provision.ssh_wait import (
    wait_for_ssh,
)
from labkeeper.provision.steps import (
    StepResult,
    StepStatus,
)

__all__ = [
    "LXC_RESTART_KEYS",
    "NET_KEYS_LXC",
    "NET_KEYS_QEMU",
    "PVE_DEFAULTS",
    "PVE_TYPE_DEFAULTS",
    "QEMU_DISKS",
    "QEMU_MODELS",
    "QEMU_RESTART_KEYS",
    "SEND_DESCRIPTION",
    "Action",
    "Actual",
    "ApplyOptions",
    "ApplyReport",
    "Change",
    "GiB",
    "GuestPlan",
    "GuestUnreachable",
    "Plan",
    "ProvisionError",
    "StepResult",
    "StepRunner",
    "StepStatus",
    "TooManyChanges",
    "VmidTaken",
    "apply_plan",
    "check_guardrails",
    "cleanup_guest",
    "cleanup_policy",
    "config_changes",
    "converge_guest",
    "create_guest",
    "create_request",
    "desired_config",
    "desired_tags",
    "destroy_guest",
    "diff_guest",
    "disk_key",
    "disk_size",
    "format_props",
    "guest_order",
    "ipconfig_of",
    "local_runner",
    "lxc_net",
    "make_plan",
    "merged_net",
    "parse_props",
    "protect_guest",
    "public_key_of",
    "qemu_net",
    "read_actual",
    "read_plan",
    "results_table",
    "run_step",
    "same_value",
    "size_bytes",
    "ssh_public_keys",
    "start_guest",
    "steps_for",
    "wait_for_ssh",
]
