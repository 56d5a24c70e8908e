"""TLS and mutual TLS for gRPC servers and clients, configured by paths to PEM files.

A server with a certificate and key serves TLS; given a client CA as well, it also requires every client to
present a certificate signed by that CA (mutual TLS). A client given a CA verifies the server against it; given
a certificate and key as well, it presents them. Files are read once, at start-up, so a bad path fails there.
"""

from __future__ import annotations

from pathlib import Path

import grpc


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{flag}: cannot read {path} ({error.strerror})") from None


def check_server_files(cert: str, key: str, client_ca: str, prefix: str = "--tls") -> None:
    """Raises ValueError naming the flag when the server options do not go together or cannot be read."""
    if bool(cert) != bool(key):
        raise ValueError(f"{prefix}-cert and {prefix}-key go together")
    if client_ca and not cert:
        raise ValueError(f"{prefix}-client-ca needs {prefix}-cert and {prefix}-key (mutual TLS is TLS first)")
    for value, flag in ((cert, f"{prefix}-cert"), (key, f"{prefix}-key"), (client_ca, f"{prefix}-client-ca")):
        if value:
            _read(value, flag)


def check_client_files(ca: str, cert: str, key: str, prefix: str) -> None:
    """Same for a client: `prefix` is e.g. "--decoder-tls"."""
    if bool(cert) != bool(key):
        raise ValueError(f"{prefix}-cert and {prefix}-key go together")
    if cert and not ca:
        raise ValueError(f"{prefix}-cert needs {prefix}-ca (a client certificate is only sent over TLS)")
    for value, flag in ((ca, f"{prefix}-ca"), (cert, f"{prefix}-cert"), (key, f"{prefix}-key")):
        if value:
            _read(value, flag)


def server_credentials(cert: str, key: str, client_ca: str = "") -> grpc.ServerCredentials | None:
    """None when no certificate is configured (plaintext)."""
    if not cert:
        return None
    root = _read(client_ca, "--tls-client-ca") if client_ca else None
    return grpc.ssl_server_credentials([(_read(key, "--tls-key"), _read(cert, "--tls-cert"))],
                                       root_certificates=root, require_client_auth=root is not None)


def channel_credentials(ca: str, cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """None when no CA is configured (plaintext)."""
    if not ca:
        return None
    return grpc.ssl_channel_credentials(root_certificates=_read(ca, "CA file"),
                                        private_key=_read(key, "key file") if key else None,
                                        certificate_chain=_read(cert, "certificate file") if cert else None)
