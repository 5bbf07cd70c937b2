"""``labkeeper init``: describe an existing lab as a commented inventory.

Pure at the core: :func:`render_inventory` (``document``) turns what was read
(:class:`ClusterFacts`, database names, :class:`InitOptions`; ``model``) into YAML text
with comments (``yamltext``) — guests exactly as Proxmox has them, or ``managed: false``
with the reason (``guests``), Proxmox's backup jobs as ``vzdump_jobs`` (``jobs``),
databases with a repository placeholder, secrets only as references and ``TODO`` where a
person must decide. The reading part (``read``) sends GET requests and one SELECT.
"""

from labkeeper.init.document import (
    DEFAULT_REPOSITORY,
    STORAGE_CONTENT,
    STORAGE_TYPES,
    render_inventory,
    render_valid,
    summary,
    validate_rendered,
)
from labkeeper.init.guests import (
    COMMON_KEYS,
    HARMLESS_DEFAULTS,
    LXC_KEYS,
    LXC_NIC_KEYS,
    QEMU_KEYS,
    QEMU_NIC_KEYS,
    Described,
    GiB,
    describe_guest,
    guess_template,
    sanitize_name,
    unmodelled,
)
from labkeeper.init.jobs import JOB_KEYS, describe_job
from labkeeper.init.model import (
    ClusterFacts,
    GuestFacts,
    InitError,
    InitOptions,
    PgServer,
    StorageFacts,
    check_ref,
    parse_host_port,
    parse_proxmox_url,
)
from labkeeper.init.pve_calendar import calendar_to_cron
from labkeeper.init.read import (
    DATABASES_SQL,
    read_cluster,
    read_databases,
    storages_of,
    token_commands,
)
from labkeeper.init.yamltext import Note, emit, scalar

__all__ = [
    "COMMON_KEYS", "DATABASES_SQL", "DEFAULT_REPOSITORY", "HARMLESS_DEFAULTS", "JOB_KEYS",
    "LXC_KEYS", "LXC_NIC_KEYS", "QEMU_KEYS", "QEMU_NIC_KEYS", "STORAGE_CONTENT",
    "STORAGE_TYPES", "ClusterFacts", "Described", "GiB", "GuestFacts", "InitError",
    "InitOptions", "Note", "PgServer", "StorageFacts", "calendar_to_cron", "check_ref",
    "describe_guest", "describe_job", "emit", "guess_template", "parse_host_port",
    "parse_proxmox_url", "read_cluster", "read_databases", "render_inventory", "render_valid",
    "sanitize_name", "scalar", "storages_of", "summary", "token_commands", "unmodelled",
    "validate_rendered",
]
