"""Backends: the `ip:port` pairs a route forwards to, wherever they came from."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Collection, Iterable, Mapping


def plain_ip(value: object) -> str:
    """An IPv4 or IPv6 address in canonical form; no zone (`%eth0`), nothing around it."""
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not an IP address")
    address = ipaddress.ip_address(value)
    if getattr(address, "scope_id", None):
        raise ValueError(f"{value!r} has a zone; only plain addresses are used")
    return str(address)


@dataclass(frozen=True, order=True)
class Backend:
    """One upstream server. The IP is checked, so it is safe to write into nginx.conf.

    The pod it came from (when discovery found it) rides along for /routes. It is no part
    of what the backend is (equality, order), so a pod that only starts terminating or is
    seen anew changes no nginx.conf and reloads nothing.
    """

    ip: str
    port: int
    pod: str | None = field(default=None, compare=False)
    node: str | None = field(default=None, compare=False)
    terminating: bool = field(default=False, compare=False)  # deleted, yet Ready: it serves while it drains
    fallback: bool = field(default=False, compare=False)  # another node's pod, for an anyNode route

    def __post_init__(self) -> None:
        object.__setattr__(self, "ip", plain_ip(self.ip))
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range")

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Backend:
        """`10.0.0.5:8125` or `[fd00::5]:8125`."""
        host, sep, port = text.strip().rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"{text!r}: must be IP:PORT, with IPv6 in brackets")
        if ":" in host and not (host.startswith("[") and host.endswith("]")):
            raise ValueError(f"{text!r}: an IPv6 address must be in brackets, e.g. [fd00::5]:8125")
        return cls(host.strip("[]"), int(port))


Endpoints = Mapping[str, "list[Backend]"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def _address(ip: str) -> Address:
    """`ip` as the kernel routes it: ::ffff:127.0.0.1 is 127.0.0.1."""
    address = ipaddress.ip_address(ip)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class Listener:
    """One socket nginx listens on for this sidecar."""

    protocol: str
    address: str
    port: int

    def covers(self, ip: str, own: Collection[str]) -> bool:
        """Whether traffic sent to `ip` on this port arrives here. A wildcard (nginx binds [::]
        as IPv6-only) takes every loopback address of its family and the pod's own addresses."""
        host, target = _address(self.address), _address(ip)
        if host.is_unspecified:
            return target.version == host.version and (target.is_loopback or str(target) in own)
        return target == host

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}/{self.protocol}"


def unusable(backend: Backend, protocol: str, listeners: Iterable[Listener], own: Collection[str]) -> str | None:
    """Why `backend` must not get a route's traffic, or None when it may.

    A pod whose address is this sidecar's own listener would send every datagram back to
    us, forever; an unspecified, multicast or broadcast address is no pod at all.
    """
    address = _address(backend.ip)
    if address.is_unspecified:
        return "an unspecified address is no pod"
    if address.is_multicast:
        return "a multicast address is no pod"
    if address == BROADCAST:
        return "the broadcast address is no pod"
    for listener in listeners:
        if listener.protocol == protocol and listener.port == backend.port and listener.covers(backend.ip, own):
            return f"it is this sidecar's own listener {listener}: traffic would loop back to it"
    return None


def own_addresses(env: Mapping[str, str]) -> frozenset[str]:
    """This pod's own addresses: `POD_IP`/`MY_POD_IP`/`POD_IPS` (downward API status.podIP(s)),
    and what its hostname resolves to (the kubelet writes the pod IP for it into /etc/hosts)."""
    found = {ip.strip() for name in ("POD_IP", "MY_POD_IP", "POD_IPS") for ip in env.get(name, "").split(",")}
    try:
        found |= {str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), None)}
    except OSError:
        pass
    addresses = set()
    for ip in found:
        try:
            addresses.add(str(_address(plain_ip(ip))))
        except ValueError:
            continue
    return frozenset(addresses)


def parse_endpoints(data: Any, source: str) -> dict[str, list[Backend]]:
    """The `--endpoints` file: `{route-name: ["ip:port", ...]}`."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: must map route names to lists of 'ip:port'")
    endpoints: dict[str, list[Backend]] = {}
    for name, addresses in data.items():
        if not isinstance(addresses, list):
            raise ValueError(f"{source}: {name}: must be a list of 'ip:port'")
        try:
            endpoints[str(name)] = sorted({Backend.parse(str(a)) for a in addresses})
        except ValueError as exc:
            raise ValueError(f"{source}: {name}: {exc}") from None
    return endpoints
