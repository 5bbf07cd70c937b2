"""Runbooks: versioned YAML checklists that run themselves. This package holds the model
(``models``), loading with file:line errors (``loading``), templating (``templating``),
parameters (``params``), guest ordering (``order``) and the rendered record (``record``).
Nothing here changes the lab: the steps are executed by ``labkeeper/runbook_ops.py`` and
orchestrated by ``flows/runbook.py``; the format is documented in ``docs/RUNBOOKS.md``.

A runbook file (``runbooks/<name>.yaml``)::

    version: 1
    name: restore-database
    description: ...
    params:
      database: {type: database, description: The database to restore}
      snapshot: {type: snapshot, default: latest}
    steps:
      - id: restore
        title: Restore {{ database }} into a new database
        flow: {name: restore_database, with: {database: "{{ database }}"}}
      - id: ask
        approval: {message: Swap it in place of {{ database }}?}
      - id: swap
        database: {op: swap, database: "{{ database }}", restored: "{{ steps.restore.restored }}"}
        on_failure: {compensate: [drop-restored]}
    compensations:
      - id: drop-restored
        database: {op: drop, database: "{{ database }}", name: "{{ steps.restore.restored }}"}

Each step has exactly one kind key: ``flow`` (a labkeeper flow as a subflow), ``ssh``
(an argv on an inventory host or guest), ``proxmox`` (an operation through the
adapter), ``database`` (swap or drop restored databases), ``check`` (health probes,
a SQL query, a guest's status), ``note`` and ``approval``. A ``{{ expr }}`` names a
parameter, ``run.id`` / ``run.stamp``, ``steps.<id>.<output>``, or a value derived from an
inventory-typed parameter (``<param>_vmid``, ``<param>_node``, ``<param>_databases``,
``<param>_apps`` for a guest; ``<param>_guest`` for an app or a database on a guest;
``<param>_tag`` and ``<param>_storage`` for a vzdump job).
"""

from labkeeper.runbook.loading import (
    RUNBOOK_DIR,
    find_runbook,
    load_runbook,
    parse_runbook,
    runbook_dir,
    runbook_files,
)
from labkeeper.runbook.models import (
    DATABASE_OPS,
    FLOWS,
    KINDS,
    PROXMOX_OPS,
    Approval,
    CheckStep,
    Compensate,
    DatabaseStep,
    FlowStep,
    Param,
    ParamName,
    ParamType,
    ProxmoxStep,
    Runbook,
    Seconds,
    SqlCheck,
    SshStep,
    Step,
    StepId,
)
from labkeeper.runbook.order import start_order
from labkeeper.runbook.params import (
    DERIVED,
    bind_params,
    context,
    derived_values,
    inventory_choices,
    parse_cli_params,
    truthy,
)
from labkeeper.runbook.record import (
    Status,
    StepRecord,
    default_title,
    describe,
    record_markdown,
)
from labkeeper.runbook.templating import (
    TemplateError,
    code_arguments,
    expressions,
    lookup,
    render,
    render_argv,
)

__all__ = [
    "DATABASE_OPS", "DERIVED", "FLOWS", "KINDS", "PROXMOX_OPS", "RUNBOOK_DIR", "Approval",
    "CheckStep", "Compensate", "DatabaseStep", "FlowStep", "Param", "ParamName", "ParamType",
    "ProxmoxStep", "Runbook", "Seconds", "SqlCheck", "SshStep", "Status", "Step", "StepId",
    "StepRecord", "TemplateError", "bind_params", "code_arguments", "context",
    "default_title", "derived_values", "describe", "expressions", "find_runbook",
    "inventory_choices", "load_runbook", "lookup", "parse_cli_params", "parse_runbook",
    "record_markdown", "render", "render_argv", "runbook_dir", "runbook_files",
    "start_order", "truthy",
]
