"""The simulator's endpoint behaviour: the route table and the Python-side helpers.

The handlers live in :mod:`labkeeper.pvesim.routes` (one module per resource);
this module is the one place the server and the tests reach them through.
"""

from labkeeper.pvesim.routes import ROUTES, Ctx, Handler, route, sim_endpoint
from labkeeper.pvesim.routes.nodes import KERNEL, PVE_VERSION, PVEVERSION_STRING
from labkeeper.pvesim.seed import add_backup, add_guest, guest_state, set_rootfs_dir

__all__ = [
    "KERNEL",
    "PVEVERSION_STRING",
    "PVE_VERSION",
    "ROUTES",
    "Ctx",
    "Handler",
    "add_backup",
    "add_guest",
    "guest_state",
    "route",
    "set_rootfs_dir",
    "sim_endpoint",
]
