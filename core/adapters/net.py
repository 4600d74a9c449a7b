"""Name resolution for webhook URL checks: the system resolver, asked for addresses only (no connection)."""

from __future__ import annotations

import ipaddress
import socket

from core.application.webhooks import AddressResolver
from core.domain.webhooks import IPAddress


def addresses_of(infos: list[tuple[object, ...]]) -> list[IPAddress]:
    """The distinct IP addresses in `getaddrinfo` results (an IPv6 scope id dropped)."""
    found: dict[IPAddress, None] = {}
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        found[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
    return list(found)


class SystemResolver(AddressResolver):
    def resolve(self, host: str, port: int) -> list[IPAddress]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            return []
        return addresses_of(list(infos))
