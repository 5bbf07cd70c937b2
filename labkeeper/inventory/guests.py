"""Inventory section ``guests:``: the Proxmox guests to provision (LXC and QEMU), their
network, resources, SSH access, cloud-init and DR drill.

Also their cross-checks (unique names, vmids and static addresses; nodes, storages,
roles and dependencies that exist, without cycles) and the check other sections use
when they name a guest.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from labkeeper.inventory.base import _Model
from labkeeper.inventory.fields import (
    VMID,
    VMID_MAX,
    VMID_MIN,
    BridgeName,
    Cron,
    GuestName,
    HostAddr,
    HostKey,
    Hours,
    IfaceName,
    IPAddr,
    IPv4,
    Minutes,
    Name,
    NodeName,
    NonNegInt,
    PoolName,
    Port,
    PositiveInt,
    PublicKey,
    Seconds,
    Secret,
    StorageName,
    Tag,
    UserName,
    _int_to_str,
)
from labkeeper.inventory.probes import Probe
from labkeeper.inventory.proxmox import check_storage
from labkeeper.inventory.xref import CrossCheck, Loc, View, unknown
from labkeeper.yaml_loader import format_path


def _check_ip_config(value: str) -> str:
    if value in ("dhcp", "manual"):
        return value
    try:
        iface = ipaddress.IPv4Interface(value)
    except ValueError:
        raise ValueError('must be "dhcp", "manual" or an IPv4 address with prefix') from None
    if "/" not in value:
        raise ValueError("needs a prefix length, e.g. 10.0.0.30/24")
    return str(iface)


def _check_ip6_config(value: str) -> str:
    if value in ("dhcp", "auto", "manual"):
        return value
    try:
        iface = ipaddress.IPv6Interface(value)
    except ValueError:
        raise ValueError('must be "dhcp", "auto", "manual" or an IPv6 address/prefix') from None
    if "/" not in value:
        raise ValueError("needs a prefix length, e.g. fd00::30/64")
    return str(iface)


def _check_mac(value: str) -> str:
    if not re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", value):
        raise ValueError("must be a MAC address like BC:24:11:00:00:01")
    return value.upper()


class Nic(_Model):
    name: IfaceName = "eth0"
    """Interface name in the guest (LXC); QEMU NICs are numbered by position (net0...)."""
    bridge: BridgeName = "vmbr0"
    ip: Annotated[str, AfterValidator(_check_ip_config)] | None = "dhcp"
    gateway: IPv4 | None = None
    ip6: Annotated[str, AfterValidator(_check_ip6_config)] | None = None
    gateway6: IPAddr | None = None
    vlan: Annotated[int, Field(ge=1, le=4094)] | None = None
    mac: Annotated[str, AfterValidator(_check_mac)] | None = None
    firewall: bool = False
    model: Literal["virtio", "e1000", "vmxnet3", "rtl8139"] = "virtio"
    """QEMU NIC model (ignored for LXC)."""
    mtu: Annotated[int, Field(ge=576, le=65520)] | None = None

    @property
    def static_ip(self) -> str | None:
        """The static IPv4 address without prefix, or None for dhcp/manual."""
        if self.ip is None or self.ip in ("dhcp", "manual"):
            return None
        return str(ipaddress.IPv4Interface(self.ip).ip)

    @model_validator(mode="after")
    def _gateway(self) -> Nic:
        if self.gateway is not None:
            if self.static_ip is None:
                raise ValueError("gateway needs a static ip (DHCP provides its own gateway)")
            net = ipaddress.IPv4Interface(self.ip or "").network
            if ipaddress.IPv4Address(self.gateway) not in net:
                raise ValueError(f"gateway is outside the NIC's network {net}")
        return self


class Resources(_Model):
    cores: Annotated[int, Field(ge=1, le=512)] = 1
    sockets: Annotated[int, Field(ge=1, le=4)] = 1
    """QEMU only."""
    memory_mb: Annotated[int, Field(ge=16)] = 512
    swap_mb: NonNegInt = 512
    """LXC only."""
    balloon_mb: NonNegInt | None = None
    """QEMU only: minimum memory for ballooning (0 disables the balloon device)."""
    disk_gb: PositiveInt = 8
    """Root disk size. Provisioning grows disks, never shrinks them."""
    storage: StorageName
    """Storage for the root disk (must be declared in proxmox.storages)."""


class LxcFeatures(_Model):
    nesting: bool = False
    """Needed for Docker in an LXC (with keyctl for unprivileged containers)."""
    keyctl: bool = False
    fuse: bool = False
    mount: list[str] = []


class GuestSsh(_Model):
    """SSH to a guest; unset fields come from the top-level ``ssh`` defaults.
    ``address`` defaults to the first static NIC address."""

    address: HostAddr | None = None
    port: Port | None = None
    user: UserName | None = None
    key: Secret | None = None
    host_key: HostKey | None = None
    trust_on_first_use: bool | None = None
    connect_timeout: Seconds | None = None


_IPCONFIG = re.compile(
    r"(ip=(dhcp|[0-9./]+))?(,?gw=[0-9.]+)?(,?ip6=([0-9a-fA-F:/]+|auto|dhcp))?(,?gw6=[0-9a-fA-F:]+)?"
)


def _check_ipconfig(value: str) -> str:
    if not value or not _IPCONFIG.fullmatch(value):
        raise ValueError("must be a Proxmox ipconfig string like 'ip=10.0.0.40/24,gw=10.0.0.1'")
    return value


class CloudInit(_Model):
    """Cloud-init for QEMU clones. ``ipconfig`` defaults to one entry per NIC
    derived from ``network``."""

    user: UserName | None = None
    password: Secret | None = None
    ssh_keys: list[PublicKey] = []
    """Public keys (not secrets) authorised for ``user``."""
    ipconfig: list[Annotated[str, AfterValidator(_check_ipconfig)]] | None = None
    nameservers: list[IPAddr] = []
    searchdomain: str | None = None
    upgrade: bool = False


class GuestDrill(_Model):
    """Guest DR drill: restore the latest vzdump archive into a scratch VMID."""

    enabled: bool = True
    schedule: Cron | None = None
    """Default: ``drills.schedule``."""
    rto_minutes: Minutes = 60
    rpo_hours: Hours = 24 * 8
    check: Literal["status", "ssh", "probe"] = "status"
    """How to prove the restored copy came up. ``status``: PVE says it runs.
    ``ssh``: it runs *and* an SSH login to ``address`` succeeds (user, key and
    host key from the guest's ssh section and the ssh defaults; the copy has the
    original's host keys, so pin ``ssh.host_key`` or add ``address`` to
    known_hosts). ``probe``: it runs *and* ``probe`` passes. Both are retried
    until ``drills.guests.boot_timeout``, and need ``drills.guests.bridge`` (a
    detached copy cannot be reached): otherwise the check fails the drill."""
    probe: Probe | None = None
    """For ``check: probe``: http, tcp (host default: ``address``) or command
    (run over SSH on ``address``)."""
    address: HostAddr | None = None
    """Where the worker reaches the restored copy on the isolated drill bridge.
    Needed by ``ssh``, tcp probes without a host, and command probes. Never
    defaults to the guest's own address: that would reach the original guest,
    not the copy, and pass a drill that proved nothing."""

    @model_validator(mode="after")
    def _probe(self) -> GuestDrill:
        if self.check == "probe" and self.probe is None:
            raise ValueError("check: probe needs a probe")
        if self.probe is not None and self.probe.container is not None:
            raise ValueError("a guest drill cannot use a container probe (no compose "
                             "app): use http, tcp or command")
        return self


_VOLID = re.compile(r"(?P<storage>[a-z][a-z0-9._-]*[a-z0-9]):vztmpl/[^/\s]+")


class Guest(_Model):
    name: GuestName
    vmid: VMID
    type: Literal["lxc", "qemu"]
    node: NodeName
    template: Annotated[str | None, BeforeValidator(_int_to_str)] = None
    """LXC: an ostemplate volid (``local:vztmpl/debian-12-...tar.zst``);
    QEMU: the vmid of the template to clone. Required unless ``state: absent`` or
    ``managed: false``."""
    full_clone: bool = True
    """QEMU: full clone (True) or linked clone."""
    resources: Resources
    network: list[Nic] = []
    tags: list[Tag] = []
    pool: PoolName | None = None
    onboot: bool = True
    startup_order: NonNegInt | None = None
    description: str = ""
    state: Literal["present", "absent"] = "present"
    protection: bool = False
    unprivileged: bool = True
    """LXC only."""
    features: LxcFeatures | None = None
    """LXC only."""
    ssh: GuestSsh | None = None
    cloud_init: CloudInit | None = None
    roles: list[Name] = []
    depends_on: list[GuestName] = []
    """Guests/hosts this one needs running first (maintenance stops in reverse order)."""
    cleanup_on_failure: Literal["destroy", "report"] | None = None
    """Override of settings.provision.cleanup_on_failure."""
    drill: GuestDrill | None = None
    managed: bool = True
    """False: provisioning leaves this guest alone (never creates, changes or destroys
    it; ``provision plan`` lists it as unmanaged). The inventory still describes it
    for backups, drills and apps. ``labkeeper init`` writes this for templates and
    guests it cannot describe faithfully, with the reason in a comment."""

    @property
    def template_vmid(self) -> int | None:
        if self.type == "qemu" and self.template is not None:
            return int(self.template)
        return None

    @property
    def template_storage(self) -> str | None:
        if self.type == "lxc" and self.template is not None:
            m = _VOLID.fullmatch(self.template)
            return m.group("storage") if m else None
        return None

    @property
    def static_ip(self) -> str | None:
        for nic in self.network or ():
            if nic.static_ip is not None:
                return nic.static_ip
        return None

    @property
    def address(self) -> str | None:
        """Where to reach the guest: ``ssh.address`` or the first static NIC IP."""
        if self.ssh is not None and self.ssh.address is not None:
            return self.ssh.address
        return self.static_ip

    @model_validator(mode="after")
    def _per_type(self) -> Guest:
        if self.state == "present" and self.managed and self.template is None:
            raise ValueError("template is required (lxc: ostemplate volid; qemu: template vmid)")
        if self.template is not None:
            if self.type == "lxc" and not _VOLID.fullmatch(self.template):
                raise ValueError(
                    "lxc template must be an ostemplate volid like "
                    "local:vztmpl/debian-12-standard_12.7-1_amd64.tar.zst"
                )
            if self.type == "qemu" and not (
                self.template.isdigit() and VMID_MIN <= int(self.template) <= VMID_MAX
            ):
                raise ValueError("qemu template must be the vmid of a template to clone")
            if self.type == "qemu" and int(self.template) == self.vmid:
                raise ValueError("a guest cannot be cloned from itself")
        if self.type == "lxc" and self.cloud_init is not None:
            raise ValueError("cloud_init is for qemu guests only")
        if self.type == "qemu" and self.features is not None:
            raise ValueError("features are for lxc guests only")
        if self.name in self.depends_on:
            raise ValueError("a guest cannot depend on itself")
        names = [n.name for n in self.network]
        if len(set(names)) != len(names):
            raise ValueError("network interface names must be unique")
        return self


# ---- cross-references ----------------------------------------------------------------


def check_guest_names(x: CrossCheck) -> None:
    x.unique("guests", x.v.guests, "name", "guest name")
    x.unique("guests", x.v.guests, "vmid", "vmid")


def check_guest_addresses(x: CrossCheck) -> None:
    """No guest named like a host (both are SSH targets); no static IP used twice."""
    for i, g in x.v.guests:
        if g.name in x.host_names:
            x.add(("guests", i, "name"),
                  f"name {g.name!r} is also used by hosts[{x.host_names[g.name]}]; "
                  "SSH targets need unique names")
    ips: dict[str, Loc] = {}
    for i, g in x.v.guests:
        if g.state == "absent":
            continue
        for n, nic in enumerate(g.network or ()):
            ip = nic.static_ip
            if ip is None:
                continue
            loc: Loc = ("guests", i, "network", n, "ip")
            if ip in ips:
                x.add(loc, f"address {ip} is already used by {format_path(ips[ip][:2])}")
            else:
                ips[ip] = loc


def check_guests(x: CrossCheck) -> None:
    """What each guest names: its node, storages, roles, SSH access and dependencies."""
    if x.v.guests and not x.v.has_proxmox:
        x.add(("guests",), "guests are declared but there is no proxmox section")
    for i, g in x.v.guests:
        _check_placement(x, i, g)
        _check_roles_and_ssh(x, i, g)
        for d, dep in enumerate(g.depends_on or ()):
            if dep not in x.known["guest"] and dep not in x.known["host"]:
                x.add(("guests", i, "depends_on", d),
                      unknown("guest or host", dep, x.known["guest"] | x.known["host"]))


def _check_placement(x: CrossCheck, i: int, g: Guest) -> None:
    known = x.known
    if g.node is not None and g.node not in known["node"]:
        x.add(("guests", i, "node"), unknown("node", g.node, known["node"], "proxmox.nodes"))
    if g.state == "present":
        content = {"lxc": "rootdir", "qemu": "images"}.get(g.type or "")
        if g.resources is not None and content is not None:
            check_storage(x, ("guests", i, "resources", "storage"), g.resources.storage,
                          g.node, content, f"{g.type} disks")
        check_storage(x, ("guests", i, "template"), g.template_storage, g.node, "vztmpl",
                      "container templates")


def _check_roles_and_ssh(x: CrossCheck, i: int, g: Guest) -> None:
    known = x.known
    for r, role in enumerate(g.roles or ()):
        if role not in known["role"]:
            x.add(("guests", i, "roles", r), unknown("role", role, known["role"], "roles"))
    if g.roles and g.ssh is None and "ssh" not in x.v.bad_fields(("guests", i)):
        x.add(("guests", i, "roles"), "roles are applied over SSH: add an ssh section")
    if g.ssh is not None:
        if g.address is None and not address_unknown(x.v, i):
            x.add(("guests", i, "ssh"), "no address: set ssh.address or give a NIC a static ip")
        if g.ssh.key is None and x.default_key is None:
            x.add(("guests", i, "ssh"), "no SSH key: set ssh.key (the defaults) or ssh.key here")


def address_unknown(v: View, guest: int) -> bool:
    """The guest's address cannot be known: its network or ssh failed validation."""
    return bool({"network", "ssh"} & v.bad_fields(("guests", guest)))


def check_dependency_cycles(x: CrossCheck) -> None:
    deps = {g.name: list(g.depends_on or ()) for _, g in x.v.guests if g.name is not None}
    index = {g.name: i for i, g in x.v.guests}
    state: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> None:
        state[name] = 1
        for dep in deps.get(name, []):
            if state.get(dep) == 1:
                cycle = [*stack[stack.index(dep):], dep]
                x.add(("guests", index[dep], "depends_on"),
                      f"dependency cycle: {' -> '.join(cycle)}")
            elif dep in deps and dep not in state:
                visit(dep, [*stack, dep])
        state[name] = 2

    for name in deps:
        if name not in state:
            visit(name, [name])


def check_guest_ref(x: CrossCheck, loc: Loc, name: str | None,
                    need: Literal["address", "ssh"]) -> Guest | None:
    """A guest named at ``loc``: declared, present, and reachable as ``need`` says.
    Returns the guest (None when it is unknown)."""
    if name is None:
        return None
    if name not in x.known["guest"]:
        x.add(loc, unknown("guest", name, x.known["guest"], "guests"))
        return None
    found = x.guests_by_name.get(name)
    if found is None:
        return None
    i, g = found
    if g.state == "absent":
        x.add(loc, f"guest {name!r} is marked absent")
    elif need == "address" and g.address is None and not address_unknown(x.v, i):
        x.add(loc, f"guest {name!r} has no static address (set its ssh.address or a static ip)")
    elif need == "ssh" and g.ssh is None:
        x.add(loc, f"guest {name!r} has no ssh section")
    return g
