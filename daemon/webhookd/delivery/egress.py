"""Where deliveries may go: no private, loopback or link-local destination unless the operator allows it.

Webhook URLs are typed in by customers, so a daemon inside a cluster must not become a way to reach the cluster.
The check runs on the addresses a name resolves to, in the delivery client just before it connects, so the
connection goes to the very address that was checked (no second lookup, hence no DNS rebinding).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Prefixes that embed an IPv4 address in an IPv6 one; the embedded address is what the packet finally reaches.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_DENIED: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(net)
    for net in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
        "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
        "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/128", "::1/128", "100::/64", "2001:db8::/32", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip


class BlockedDestination(OSError):
    """Raised when every address of a host is forbidden: the attempt is `blocked`, never made."""

    def __init__(self, host: str) -> None:
        super().__init__(f"{host} resolves only to addresses that egress rules forbid")
        self.host = host


@dataclass(frozen=True)
class EgressPolicy:
    """The operator's egress rules: private ranges are blocked unless allowed in general or by CIDR."""

    allow_private: bool = False
    allowed_cidrs: tuple[IPNetwork, ...] = ()

    def allows(self, address: IPAddress) -> bool:
        if self.allow_private:
            return True
        if any(address in net for net in self.allowed_cidrs if net.version == address.version):
            return True
        return not any(_is_internal(a) for a in _addresses_behind(address))


def _addresses_behind(address: IPAddress) -> Iterable[IPAddress]:
    yield address
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            yield address.ipv4_mapped
        if address.sixtofour is not None:
            yield address.sixtofour
        if address in _NAT64 or address in _NAT64_LOCAL:
            yield ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.teredo is not None:
            yield address.teredo[1]


def _is_internal(address: IPAddress) -> bool:
    # The explicit list comes first: ipaddress's own tables differ between Python releases (192.0.0.0/24 became
    # non-global only in later 3.11 patch releases), and they call site-local fec0::/10 global.
    if any(address in net for net in _DENIED if net.version == address.version):
        return True
    if address.is_multicast or address.is_unspecified or address.is_reserved or address.is_link_local:
        return True
    return not address.is_global


def literal_address(host: str) -> IPAddress | None:
    """The address a URL host names literally, in any spelling a resolver would accept, or None for a name.

    Besides the canonical forms this reads what `inet_aton` reads (2130706433, 0x7f.1, 0177.0.0.1, 127.1) and a
    trailing dot, since the system resolver turns each of those into an address without any DNS lookup.
    """
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" not in text and text.endswith("."):  # an IPv6 zone id may end in a dot; only names take a root dot
        text = text[:-1]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(text))
    except (OSError, ValueError):
        return None
