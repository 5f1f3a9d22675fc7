"""Which web pages may use the gateway: the ``Origin`` and ``Host`` checks.

Browsers let any page open a WebSocket to any host, the developer's own
``localhost`` included, and send the page's origin along; only the server can
refuse it.  That matters where the credential is public: the development
profile's built-in ``dev-key`` would let any site the developer visits run
sessions on the gateway (and on the cloud keys it holds).  Clients that are
not browsers send no ``Origin`` and are never refused here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit


def _host_of(netloc: str) -> str:
    """The host of ``host[:port]`` (IPv6 literals in brackets), lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else ""
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def is_loopback_host(netloc: str) -> bool:
    """Whether ``host[:port]`` names this machine whatever DNS says: ``localhost``
    (and ``*.localhost``, which browsers resolve to loopback themselves) or a
    loopback address.  A name DNS resolves is not: DNS rebinding points any name
    at 127.0.0.1."""
    host = _host_of(netloc)
    if host == "localhost" or host.endswith(".localhost"):
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def normalize_origin(origin: str) -> str:
    """``scheme://host[:port]`` as browsers send it: lower case, no path or slash."""
    return origin.strip().rstrip("/").lower()


class OriginPolicy:
    """Decide whether a request's ``Origin`` may use ``/ws``.

    Args:
        allowed: the ``allowed_origins`` setting: exactly the origins that may
            connect (``*``: any).
        public_key: whether the built-in development key is in force.  With no
            ``allowed`` list, any origin may connect, except while anyone can
            know the key: then only pages on this machine (a loopback origin) or
            served by this gateway at an IP address (the origin is the request's
            ``Host``).
    """

    def __init__(self, allowed: Iterable[str], *, public_key: bool) -> None:
        self._allowed = frozenset(normalize_origin(o) for o in allowed if o.strip())
        self._public_key = public_key

    def allows(self, origin: str | None, host: str | None) -> bool:
        if origin is None:
            return True  # not a browser
        if self._allowed:
            return "*" in self._allowed or normalize_origin(origin) in self._allowed
        return not self._public_key or is_local_origin(origin, host)


def is_local_origin(origin: str, host: str | None) -> bool:
    """Whether ``origin`` is a page on this machine, or one this gateway served at
    an IP address (a name could be rebound; an address cannot)."""
    parts = urlsplit(normalize_origin(origin))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return False  # "null" (a file, a sandboxed frame), or not an origin
    if is_loopback_host(parts.netloc):
        return True
    return (
        host is not None
        and _ip(_host_of(parts.netloc)) is not None
        and parts.netloc == host.strip().lower()
    )
