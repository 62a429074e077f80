"""Backends: the `ip:port` pairs a route forwards to, wherever they came from."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Mapping


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
    """One upstream server. The IP is checked, so it is safe to write into nginx.conf."""

    ip: str
    port: int

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
