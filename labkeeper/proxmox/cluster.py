"""The cluster as a whole: PVE version, node names, guest listing and free vmids."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from labkeeper.proxmox.client import send
from labkeeper.proxmox.models import Guest, VersionInfo
from labkeeper.proxmox.request import ApiRequest, GuestType, api_request


def version_request() -> ApiRequest:
    return api_request("GET", "/version")


def nodes_request() -> ApiRequest:
    return api_request("GET", "/nodes")


def resources_request(rtype: Literal["vm", "storage", "node"] | None = "vm") -> ApiRequest:
    return api_request("GET", "/cluster/resources", {"type": rtype})


def nextid_request(vmid: int | None = None) -> ApiRequest:
    return api_request("GET", "/cluster/nextid", {"vmid": vmid})


def version(api: Any) -> str:
    data = send(api, version_request())
    return str(data.get("version", "?"))


def version_info(api: Any) -> VersionInfo:
    return VersionInfo.model_validate(send(api, version_request()))


def node_names(api: Any) -> list[str]:
    data = send(api, nodes_request())
    return sorted(str(n["node"]) for n in data)


def filter_guests(guests: Iterable[Guest], *, node: str | None = None, tag: str | None = None,
                  pool: str | None = None, gtype: GuestType | None = None,
                  templates: bool = True) -> list[Guest]:
    """Pure selection of guests by node, tag, pool and type (sorted by vmid)."""
    out = [g for g in guests
           if (node is None or g.node == node) and (tag is None or tag in g.tags)
           and (pool is None or g.pool == pool) and (gtype is None or g.type == gtype)
           and (templates or not g.template)]
    return sorted(out, key=lambda g: g.vmid)


def list_guests(api: Any, *, node: str | None = None, tag: str | None = None,
                pool: str | None = None, gtype: GuestType | None = None,
                templates: bool = True) -> list[Guest]:
    """Guests from ``/cluster/resources`` (one call for the whole cluster), filtered."""
    data = send(api, resources_request("vm")) or []
    guests = [Guest.model_validate(e) for e in data if e.get("type") in ("lxc", "qemu")]
    return filter_guests(guests, node=node, tag=tag, pool=pool, gtype=gtype,
                         templates=templates)


def find_guest(api: Any, vmid: int) -> Guest | None:
    """Where guest ``vmid`` lives (node, type), or None if the cluster has no such guest."""
    for guest in list_guests(api):
        if guest.vmid == int(vmid):
            return guest
    return None


def next_vmid(api: Any, wanted: int | None = None) -> int:
    """The next free VMID (or check that ``wanted`` is free: 400 permanent if not)."""
    return int(send(api, nextid_request(wanted)))
