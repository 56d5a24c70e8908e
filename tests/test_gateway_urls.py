"""Image URLs (reliability case 14): data: always; http(s) only from allow-listed hosts, fetched by the gateway with
a size cap and a timeout, never from loopback or private addresses unless allowed; file: and the rest never.

A local HTTP server thread serves the images. It listens on 127.0.0.1, a loopback address: gateways refuse it
unless their --image-url-allowed-networks covers it, as an on-prem deployment would allow its own network.
"""

from __future__ import annotations

import http.server
import ipaddress
import threading
import time

import grpc
import pytest

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from shared.images import sha256_hex
from shared.url_fetch import address_refusal, parse_networks
from tests.reference import chat_request
from tests.support import assert_status, image_bytes, noise_image

INVALID = grpc.StatusCode.INVALID_ARGUMENT
FIELD = "messages[0].content[1].image.url"
MAX_BYTES = 100_000
PICTURE = image_bytes(noise_image(64, 40, seed=400))
LARGE = image_bytes(noise_image(400, 400, seed=401))   # over MAX_BYTES
assert len(PICTURE) < MAX_BYTES < len(LARGE)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    hits: list[str] = []

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              length: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if length:
            self.send_header("Content-Length", str(len(body)))
        else:
            self.send_header("Connection", "close")   # no length: the body ends when the connection does
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        _Handler.hits.append(self.path)
        port = self.server.server_address[1]
        redirects = {
            "/redirect-ok": "/picture.png",
            "/redirect-loopback": f"http://127.0.0.2:{port}/picture.png",
            "/redirect-metadata": "http://169.254.169.254/latest/meta-data/",
            "/redirect-other-host": "http://images.example.com/picture.png",
            "/redirect-file": "file:///etc/passwd",
            "/loop": "/loop",
        }
        try:
            if self.path == "/picture.png":
                self._send(200, PICTURE, {"Content-Type": "image/png"})
            elif self.path == "/large.png":
                self._send(200, LARGE, {"Content-Type": "image/png"})
            elif self.path == "/picture-unannounced.png":
                self.close_connection = True
                self._send(200, PICTURE, {"Content-Type": "image/png"}, length=False)
            elif self.path == "/large-unannounced.png":
                self.close_connection = True
                self._send(200, LARGE, {"Content-Type": "image/png"}, length=False)
            elif self.path == "/slow.png":
                time.sleep(3)
                self._send(200, PICTURE)
            elif self.path in redirects:
                self._send(302, headers={"Location": redirects[self.path]})
            else:
                self._send(404, b"not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the gateway gave up on us, as it should


@pytest.fixture(scope="module")
def image_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def gateways(stack):
    """Two more gateways over the shared stack: one allows 127.0.0.1's network, one does not."""
    common = ("--image-url-allowlist", "127.0.0.1,127.0.0.2,169.254.169.254", "--image-url-timeout-s", "1",
              "--max-image-bytes", str(MAX_BYTES))
    allowing = stack.start_gateway("gateway-urls", (*common, "--image-url-allowed-networks", "127.0.0.1/32"))
    strict = stack.start_gateway("gateway-urls-strict", common)
    yield {"allowing": allowing, "strict": strict}
    stack.stop_process("gateway-urls")
    stack.stop_process("gateway-urls-strict")


def url_chat(url: str) -> gateway_pb2.ChatRequest:
    request = chat_request([("user", ["Look:", b""])], max_tokens=3, temperature=0.0)
    request.messages[0].content[1].image.url = url
    return request


def chat_result(gateway: str, url: str):
    with grpc.insecure_channel(gateway) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Chat(url_chat(url), timeout=60))[-1]


def chat_error(gateway: str, url: str) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        chat_result(gateway, url)
    return caught.value


def test_allowed_url_is_fetched_by_the_gateway_and_served(gateways, image_server):
    _Handler.hits.clear()
    last = chat_result(gateways["allowing"], f"{image_server}/picture.png")
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH and last.usage.image_tokens > 0
    assert _Handler.hits == ["/picture.png"]
    with grpc.insecure_channel(gateways["allowing"]) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        put = stub.PutImages(gateway_pb2.PutImagesRequest(images=[
            gateway_pb2.ImagePart(url=f"{image_server}/redirect-ok"),
            gateway_pb2.ImagePart(url=f"{image_server}/picture-unannounced.png")]), timeout=60)
    assert [item.info.sha256 for item in put.images] == [sha256_hex(PICTURE)] * 2
    assert all(item.was_cached for item in put.images)


def test_http_urls_are_refused_without_an_allow_list(stack, image_server):
    _Handler.hits.clear()
    assert_status(chat_error(stack.gateway, f"{image_server}/picture.png"), INVALID,
                  f"{FIELD}: http(s) image URLs are not enabled on this gateway")
    assert _Handler.hits == []


def test_loopback_host_is_refused_unless_its_network_is_allowed(gateways, image_server):
    _Handler.hits.clear()
    assert_status(chat_error(gateways["strict"], f"{image_server}/picture.png"), INVALID,
                  f"{FIELD}: host 127.0.0.1 is refused: 127.0.0.1 is a loopback address")
    assert _Handler.hits == [], "the gateway connected to a refused address"


def test_size_cap_from_the_header_and_while_reading(gateways, image_server):
    assert_status(chat_error(gateways["allowing"], f"{image_server}/large.png"), INVALID,
                  f"{FIELD}: image of {len(LARGE)} bytes, over the limit of {MAX_BYTES}")
    assert_status(chat_error(gateways["allowing"], f"{image_server}/large-unannounced.png"), INVALID,
                  f"{FIELD}: image of more than {MAX_BYTES} bytes, over the limit")


def test_fetch_timeout(gateways, image_server):
    started = time.monotonic()
    assert_status(chat_error(gateways["allowing"], f"{image_server}/slow.png"), INVALID,
                  f"{FIELD}: no complete answer within 1.0 s")
    assert time.monotonic() - started < 2.5


@pytest.mark.parametrize("path, message", [
    ("/redirect-loopback", "host 127.0.0.2 is refused: 127.0.0.2 is a loopback address"),
    ("/redirect-metadata", "host 169.254.169.254 is refused: 169.254.169.254 is a link-local address"),
    ("/redirect-other-host", "redirect target host images.example.com is not on the gateway's image URL allow-list"),
    ("/redirect-file", "redirect target scheme file: is not accepted, only http and https"),
    ("/loop", "more than 3 redirects"),
    ("/missing.png", "127.0.0.1 answered HTTP 404"),
])
def test_redirects_are_checked_again_and_failures_are_named(gateways, image_server, path, message):
    _Handler.hits.clear()
    assert_status(chat_error(gateways["allowing"], f"{image_server}{path}"), INVALID, f"{FIELD}: {message}")
    assert all(hit in (path, "/loop") for hit in _Handler.hits), _Handler.hits   # nothing fetched after it


@pytest.mark.parametrize("url, message", [
    ("file:///etc/passwd", "only data:image/...;base64 URLs (and http(s) URLs where the gateway allows them) are "
                           "accepted, not file:"),
    ("ftp://127.0.0.1/picture.png", "not ftp:"),
    ("gopher://127.0.0.1:70/", "not gopher:"),
    ("http://images.example.com/picture.png", "host images.example.com is not on the gateway's image URL "
                                              "allow-list"),
    ("http://127.0.0.1@images.example.com/picture.png", "URL must not carry user info"),
    ("http://127.0.0.1\\@images.example.com/", "URL must be plain ASCII without spaces, control characters or "
                                              "backslashes"),
    ("http://[::1]/picture.png", "host ::1 is not on the gateway's image URL allow-list"),
])
def test_other_schemes_and_hosts_are_refused(gateways, url, message):
    _Handler.hits.clear()
    assert_status(chat_error(gateways["allowing"], url), INVALID, f"{FIELD}: ", message)
    assert _Handler.hits == []


# -- the address rules on their own ------------------------------------------------------------------------------

@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("100.64.0.1", "shared (CGNAT)"), ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"), ("240.0.0.1", "reserved"), ("::1", "loopback"), ("fe80::1", "link-local"),
    ("fc00::1", "private"), ("::", "unspecified"),
    ("::ffff:10.0.0.1", "private"),      # IPv4-mapped
    ("64:ff9b::a9fe:a9fe", None),         # NAT64 of 169.254.169.254: refused, whichever kind is named
    ("2002:c0a8:101::1", None),           # 6to4 of 192.168.1.1
    ("8.8.8.8", ""), ("2606:4700:4700::1111", ""),
])
def test_non_public_addresses_are_refused(address, kind):
    refusal = address_refusal(ipaddress.ip_address(address), ())
    if kind == "":
        assert refusal is None
    else:
        assert refusal is not None and (kind is None or refusal.endswith(f"is a {kind} address")), refusal


def test_allowed_networks_admit_their_addresses_in_any_spelling():
    allowed = parse_networks(("10.0.0.0/8", "fd00::/8"))
    for address in ("10.2.3.4", "::ffff:10.2.3.4", "fd12::1"):
        assert address_refusal(ipaddress.ip_address(address), allowed) is None
    assert address_refusal(ipaddress.ip_address("127.0.0.1"), allowed) is not None
    with pytest.raises(ValueError, match="not a network"):
        parse_networks(("10.0.0.0/33",))
