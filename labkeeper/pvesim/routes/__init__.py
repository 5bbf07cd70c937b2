"""The simulator's PVE endpoints, one module per resource.

Importing this package registers every handler in :data:`ROUTES`, keyed by
``(method, path template)`` as the vendored API structure spells the template.
``common`` and ``volumes`` hold the helpers the resource modules share.
"""

from labkeeper.pvesim.routes import (  # noqa: F401 - imported to register their routes
    access,
    backup_jobs,
    clone,
    cluster,
    guests,
    lxc_create,
    nodes,
    pools,
    power,
    qemu_create,
    snapshots,
    storage,
    tasks,
    vzdump,
)
from labkeeper.pvesim.routes.registry import ROUTES, Ctx, Handler, route
from labkeeper.pvesim.routes.sim import sim_endpoint

__all__ = ["ROUTES", "Ctx", "Handler", "route", "sim_endpoint"]
