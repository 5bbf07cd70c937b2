"""labkeeper's Proxmox VE simulator: a stateful PVE API on a loopback HTTPS port.

Every request is validated against the vendored PVE API structure file; see
:class:`Simulator` for the in-process API and ``labkeeper pvesim serve`` for the
command line.
"""

from labkeeper.pvesim.errors import ApiError
from labkeeper.pvesim.server import Simulator

__all__ = ["ApiError", "Simulator"]
