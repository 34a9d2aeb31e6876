"""Where a person reaches `device-agent demo`'s provider, when that is not loopback.

On a Pi reached over SSH, the person approves on a phone: the links the device shows
must name an address the phone can reach, while the agent keeps talking to the
provider on this machine.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

__all__ = ["check_public_url", "open_to_the_network", "people_url", "primary_address"]

_WILDCARDS = {"0.0.0.0": socket.AF_INET, "::": socket.AF_INET6}
# Documentation addresses (RFC 5737, RFC 3849): only the route to them is looked up.
_PROBES = {socket.AF_INET: "192.0.2.1", socket.AF_INET6: "2001:db8::1"}


def check_public_url(url: str) -> str:
    """`url` without a trailing "/", or ValueError saying what is wrong with it."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--public-url needs an http:// or https:// URL with a host, "
                         f"not {url!r}")
    if parts.query or parts.fragment:
        raise ValueError(f"--public-url takes no query or fragment: {url!r}")
    return url.rstrip("/")


def open_to_the_network(host: str) -> bool:
    """Whether a provider bound to `host` can be reached from other machines."""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True  # a name: it is there to be reached by others


def _usable(address: str) -> bool:
    try:
        parsed = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    return not (parsed.is_loopback or parsed.is_unspecified or parsed.is_link_local)


def primary_address(family: socket.AddressFamily = socket.AF_INET) -> str | None:
    """The address this machine sends from by default: the one its LAN knows it by.
    None when it has no such address of `family`."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            # A UDP connect sends nothing; it only asks the routing table for a source.
            probe.connect((_PROBES[family], 9))
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if _usable(address):
        return address
    try:
        infos = socket.getaddrinfo(socket.gethostname(), None, family)
    except OSError:
        return None
    for *_, sockaddr in infos:
        if _usable(str(sockaddr[0])):
            return str(sockaddr[0])
    return None


def people_url(host: str, base_url: str) -> tuple[str | None, str | None]:
    """For a provider bound to `host` and reached here at `base_url`: the base URL to
    show people instead (None: `base_url` will do) and a line for the log saying why."""
    family = _WILDCARDS.get(host)
    if family is None:
        # Loopback or a named address: the phone reaches what this machine does.
        return None, None
    parts = urlsplit(base_url)
    address = primary_address(family)
    if address is None:
        return None, (f"listening on every address, but this machine has none a phone "
                      f"could reach: the links shown use {base_url}; give --public-url")
    shown = f"[{address}]" if ":" in address else address
    url = f"{parts.scheme}://{shown}:{parts.port}"
    return url, (f"listening on every address; the links shown use {url}, this "
                 f"machine's primary address (--public-url to show another)")
