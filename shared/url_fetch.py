"""Fetching `http(s)` image URLs: allow-listed hosts only, never to internal addresses, bounded in size and time.

mistral-common would download a URL itself; the gateway never hands it one: it fetches the bytes here and passes
them on like any uploaded image. Each rule refuses with a message that is safe to show to the caller:

- only http and https, written plainly: ASCII, no spaces, control characters, backslashes or user info (the
  parser differences that let requests past other services' allow-lists);
- the host must be on the allow-list (exact names, case-insensitive; an IP literal is listed as itself);
- the host is resolved once and every address it resolves to must be public: not loopback, private, link-local,
  shared (CGNAT), multicast, reserved or unspecified, IPv4 inside IPv6 (mapped, NAT64, 6to4) included, unless it
  lies in a network the operator allowed (on-prem use). The connection goes to a checked address, so a second DNS
  answer cannot swap in another one;
- redirects are followed at most `max_redirects` times, each target checked by the same rules (and never from
  https down to http);
- the body is read up to `max_bytes` (a larger Content-Length is refused before reading), and the whole fetch,
  redirects included, ends within `timeout_s`.

HTTP/1.1 is spoken with h11 (a small, strict parser) over asyncio streams: one request per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import h11

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
MAX_URL_LENGTH = 4096
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_READ_BYTES = 64 * 1024


class ImageUrlError(ValueError):
    """The URL was refused or could not be fetched; the message is safe to show to the caller."""


def is_http_url(url: str) -> bool:
    return url[:8].lower().startswith(("http://", "https://"))


def parse_networks(texts: tuple[str, ...]) -> tuple[IPNetwork, ...]:
    """CIDR strings -> networks; ValueError names the bad one."""
    networks = []
    for text in texts:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"not a network in CIDR notation: {text!r}") from None
    return tuple(networks)


@dataclass(frozen=True, slots=True)
class UrlPolicy:
    allowed_hosts: frozenset[str]            # lowercase host names or IP literals
    allowed_networks: tuple[IPNetwork, ...]  # non-public addresses that are nevertheless allowed
    max_bytes: int                           # largest body accepted
    timeout_s: float                         # the whole fetch, redirects included
    max_redirects: int                       # redirects followed at most; 0: none


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    is_https: bool
    host: str          # lowercase, no brackets, no trailing dot
    port: int
    path: str          # path and query, as sent in the request line
    host_header: str


def address_refusal(address: IPAddress, allowed_networks: tuple[IPNetwork, ...]) -> str | None:
    """Why a connection to `address` is refused, or None when it is allowed."""
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address.version == network.version and address in network for network in allowed_networks):
        return None
    candidates = [address]
    if address.version == 6:
        if address in _NAT64:
            candidates.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        if address.sixtofour is not None:
            candidates.append(address.sixtofour)
        if address.teredo is not None:
            return f"{address} is a Teredo address"
    for candidate in candidates:
        kind = _non_public_kind(candidate)
        if kind:
            return f"{address} is a {kind} address"
    return None


def _non_public_kind(address: IPAddress) -> str:
    if address.is_loopback:
        return "loopback"
    if address.is_link_local:
        return "link-local"
    if address.is_unspecified:
        return "unspecified"
    if address.is_multicast:
        return "multicast"
    if address.version == 4 and address in _SHARED:
        return "shared (CGNAT)"
    if address.is_reserved:
        return "reserved"
    if address.is_private:
        return "private"
    if not address.is_global:
        return "reserved"
    return ""


class UrlFetcher:
    def __init__(self, policy: UrlPolicy, ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self._ssl = ssl_context or ssl.create_default_context()

    async def fetch(self, url: str, timeout_s: float | None = None) -> bytes:
        """The body of `url` (after allowed redirects). `timeout_s` (the caller's deadline) can only shorten."""
        budget = self.policy.timeout_s if timeout_s is None else min(self.policy.timeout_s, timeout_s)
        if budget <= 0:
            raise ImageUrlError("no time left to fetch the image")
        try:
            async with asyncio.timeout(budget):
                return await self._follow(url)
        except TimeoutError:
            raise ImageUrlError(f"no complete answer within {budget:.1f} s") from None

    async def _follow(self, url: str) -> bytes:
        was_https = False
        for hop in range(self.policy.max_redirects + 1):
            target = self._parse(url, is_redirect=hop > 0)
            if was_https and not target.is_https:
                raise ImageUrlError("redirect from https to plain http refused")
            was_https = target.is_https
            addresses = await self._resolve(target)
            location = await self._get(target, addresses)
            if isinstance(location, bytes):
                return location
            url = location
        raise ImageUrlError(f"more than {self.policy.max_redirects} redirects")

    def _parse(self, url: str, is_redirect: bool) -> _Target:
        where = "redirect target" if is_redirect else "URL"
        if len(url) > MAX_URL_LENGTH:
            raise ImageUrlError(f"{where} is longer than {MAX_URL_LENGTH} characters")
        if not url.isascii() or any(c in url for c in " \\") or any(ord(c) < 0x20 or ord(c) == 0x7F for c in url):
            raise ImageUrlError(f"{where} must be plain ASCII without spaces, control characters or backslashes")
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ImageUrlError(f"{where} scheme {scheme or '(none)'}: is not accepted, only http and https")
        if "@" in parts.netloc:
            raise ImageUrlError(f"{where} must not carry user info")
        host = (parts.hostname or "").rstrip(".")
        if not host:
            raise ImageUrlError(f"{where} has no host")
        try:
            port = parts.port or DEFAULT_PORTS[scheme]
        except ValueError:
            raise ImageUrlError(f"{where} has an invalid port") from None
        if host not in self.policy.allowed_hosts:
            raise ImageUrlError(f"{where} host {host} is not on the gateway's image URL allow-list")
        bracketed = f"[{host}]" if ":" in host else host
        host_header = bracketed if port == DEFAULT_PORTS[scheme] else f"{bracketed}:{port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return _Target(url, scheme == "https", host, port, path, host_header)

    async def _resolve(self, target: _Target) -> list[IPAddress]:
        """Every address of the host, each checked; any refused address refuses the host (no partial trust)."""
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise ImageUrlError(f"host {target.host} does not resolve") from None
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))
        for address in addresses:
            refusal = address_refusal(address, self.policy.allowed_networks)
            if refusal:
                raise ImageUrlError(f"host {target.host} is refused: {refusal}")
        if not addresses:
            raise ImageUrlError(f"host {target.host} does not resolve")
        return addresses

    async def _connect(self, target: _Target, addresses: list[IPAddress]):
        last_error: OSError | None = None
        for address in addresses:
            try:
                return await asyncio.open_connection(
                    str(address), target.port, ssl=self._ssl if target.is_https else None,
                    server_hostname=target.host if target.is_https else None)
            except ssl.SSLError:
                raise ImageUrlError(f"TLS with {target.host} failed") from None
            except OSError as error:
                last_error = error
        reason = last_error.strerror if last_error is not None and last_error.strerror else "unreachable"
        raise ImageUrlError(f"cannot connect to {target.host}: {reason}")

    async def _get(self, target: _Target, addresses: list[IPAddress]) -> bytes | str:
        """The body, or the absolute URL of a redirect."""
        reader, writer = await self._connect(target, addresses)
        try:
            return await self._exchange(target, reader, writer)
        except h11.ProtocolError:
            raise ImageUrlError(f"{target.host} sent a malformed HTTP response") from None
        except ssl.SSLError:
            raise ImageUrlError(f"TLS with {target.host} failed") from None
        except (ConnectionError, OSError):
            raise ImageUrlError(f"connection to {target.host} failed during the transfer") from None
        finally:
            writer.close()

    async def _exchange(self, target: _Target, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> bytes | str:
        max_bytes = self.policy.max_bytes
        connection = h11.Connection(h11.CLIENT)
        writer.write(connection.send(h11.Request(method="GET", target=target.path, headers=[
            ("Host", target.host_header), ("User-Agent", "pixtral-gateway"), ("Accept", "image/*"),
            ("Accept-Encoding", "identity"), ("Connection", "close")])))
        writer.write(connection.send(h11.EndOfMessage()))
        await writer.drain()
        body = bytearray()
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                connection.receive_data(await reader.read(_READ_BYTES))
            elif isinstance(event, h11.Response):
                headers = {name.lower(): value for name, value in event.headers}
                if event.status_code in REDIRECT_CODES:
                    return self._redirect_url(target, headers.get(b"location", b""))
                if event.status_code != 200:
                    raise ImageUrlError(f"{target.host} answered HTTP {event.status_code}")
                length = headers.get(b"content-length", b"")
                if length.isdigit() and int(length) > max_bytes:
                    raise ImageUrlError(f"image of {int(length)} bytes, over the limit of {max_bytes}")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_bytes:
                    raise ImageUrlError(f"image of more than {max_bytes} bytes, over the limit")
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            elif isinstance(event, h11.ConnectionClosed):
                raise ImageUrlError(f"{target.host} closed the connection before the end of the image")

    def _redirect_url(self, target: _Target, location: bytes) -> str:
        if self.policy.max_redirects == 0:
            raise ImageUrlError(f"{target.host} answered with a redirect; redirects are not followed")
        try:
            text = location.decode("ascii")
        except UnicodeDecodeError:
            raise ImageUrlError(f"{target.host} redirected to a URL that is not ASCII") from None
        if not text:
            raise ImageUrlError(f"{target.host} redirected without a Location")
        return urljoin(target.url, text)
