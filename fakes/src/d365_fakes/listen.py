"""Where the fakes may listen. Kept apart from `server` so the command line checks it without
importing the servers."""

from __future__ import annotations

import ipaddress

LOOPBACK = "127.0.0.1"
ANY_ADDRESS = "0.0.0.0"


def check_listen_address(host: str) -> None:
    """ValueError unless `host` is an IPv4 loopback address or 0.0.0.0: the admin surface answers
    loopback callers only, so on any other address it would be unreachable."""
    try:
        address = ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv4 address") from None
    if not (address.is_loopback or host == ANY_ADDRESS):
        raise ValueError(
            f"{host} is neither a loopback address nor {ANY_ADDRESS}: the admin surface answers "
            "loopback callers only, so it would be unreachable"
        )
