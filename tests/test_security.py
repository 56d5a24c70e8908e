"""Security: a bearer token on every RPC but health (reliability case 13, every method found through reflection),
TLS and mutual TLS on the public port and on the gateway -> decoder hop, and the CLI's flags for both.

Certificates are made here: a CA, a server certificate for 127.0.0.1, a client certificate, and a client
certificate of another CA that no server trusts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pixtral.v1 import decoder_pb2, decoder_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from services.gateway.config import GatewayConfig
from shared import auth
from shared.auth import BearerTokenInterceptor
from shared.settings import load_config
from tests.reference import chat_request
from tests.support import ROOT, Stack, assert_status, child_env, image_bytes, noise_image

TOKEN = "s3cret-token-for-tests"
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
SERVING = health_pb2.HealthCheckResponse.SERVING


# -- certificates (with the openssl command-line tool) -------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> dict[str, Path]:
    files = {}
    for ca in ("ca", "rogue-ca"):
        _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{ca}.key",
                 cwd=directory)
        _openssl("req", "-x509", "-new", "-key", f"{ca}.key", "-subj", f"/CN={ca}", "-days", "2", "-out",
                 f"{ca}.pem", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=directory)
        files[ca] = directory / f"{ca}.pem"
        prefix = "" if ca == "ca" else "rogue-"
        for role, extensions in (
                ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth"),
                ("client", "extendedKeyUsage=clientAuth")):
            name = f"{prefix}{role}"
            (directory / f"{name}.ext").write_text(extensions + "\n")
            _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key",
                     cwd=directory)
            _openssl("req", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-out", f"{name}.csr",
                     cwd=directory)
            _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                     "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=directory)
            files[name], files[f"{name}-key"] = directory / f"{name}.pem", directory / f"{name}.key"
    return files


def credentials(pki: dict[str, Path], client: str | None = "client") -> grpc.ChannelCredentials:
    """Trusting our CA; presenting `client`'s certificate (None: none)."""
    return grpc.ssl_channel_credentials(
        root_certificates=pki["ca"].read_bytes(),
        private_key=pki[f"{client}-key"].read_bytes() if client else None,
        certificate_chain=pki[client].read_bytes() if client else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_stack(tiny_model, redis_server, pki, tmp_path_factory):
    """Decoders and vision workers with mutual TLS and the token; a gateway with TLS and the token that calls the
    decoders with its client certificate and the token; a second gateway that also requires client certificates."""
    server_tls = ("--tls-cert", str(pki["server"]), "--tls-key", str(pki["server-key"]))
    internal = (*server_tls, "--tls-client-ca", str(pki["ca"]), "--auth-token", TOKEN)
    stack = Stack(tiny_model, redis_server.url, tmp_path_factory.mktemp("secure"), credentials=credentials(pki),
                  decoder_args=internal, vision_args=internal,
                  gateway_args=(*server_tls, "--auth-token", TOKEN, "--decoder-tls-ca", str(pki["ca"]),
                                "--decoder-tls-cert", str(pki["client"]), "--decoder-tls-key", str(pki["client-key"])))
    stack.start()
    stack.mtls_gateway = stack.start_gateway("gateway-mtls", (*stack.gateway_args, "--tls-client-ca", str(pki["ca"])))
    yield stack
    stack.stop()


def secure(address: str, pki, client: str | None = "client") -> grpc.Channel:
    return grpc.secure_channel(address, credentials(pki, client))


def bearer(token: str = TOKEN) -> tuple[tuple[str, str], ...]:
    return auth.bearer_metadata(token)


# -- case 13: every method but health needs the token ----------------------------------------------------------

def reflected_methods(channel: grpc.Channel) -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method of every service the server lists."""
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**request) -> reflection_pb2.ServerReflectionResponse:
        (response,) = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**request)]),
                                                metadata=bearer(), timeout=10)
        return response

    services = [service.name for service in ask(list_services="").list_services_response.service]
    methods = []
    for service in services:
        package, _, name = service.rpartition(".")
        for blob in ask(file_containing_symbol=service).file_descriptor_response.file_descriptor_proto:
            file = descriptor_pb2.FileDescriptorProto.FromString(blob)
            for described in file.service:
                if file.package == package and described.name == name:
                    methods += [(f"/{service}/{method.name}", method.client_streaming, method.server_streaming)
                                for method in described.method]
    return methods


def call_raw(channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool, metadata=()):
    """Calls a method with an empty message, whatever its kind; returns the error (or None)."""
    kind = {(False, False): channel.unary_unary, (False, True): channel.unary_stream,
            (True, False): channel.stream_unary, (True, True): channel.stream_stream}
    method = kind[(client_streaming, server_streaming)](path)
    request = iter([b""]) if client_streaming else b""
    try:
        result = method(request, metadata=metadata, timeout=10)
        if server_streaming:
            list(result)
    except grpc.RpcError as error:
        return error
    return None


def test_every_method_listed_by_reflection_but_health_needs_the_token(secure_stack, pki):
    with secure(secure_stack.gateway, pki) as channel:
        methods = reflected_methods(channel)
        paths = {path for path, _, _ in methods}
        assert {"/pixtral.v1.Gateway/Chat", "/pixtral.v1.Gateway/Tokenize", "/pixtral.v1.Gateway/PutImages",
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"} <= paths, paths
        for path, client_streaming, server_streaming in methods:
            if path.startswith("/grpc.health.v1.Health/"):
                continue
            for metadata in ((), bearer("wrong-token"), bearer(TOKEN + "x"), (("authorization", TOKEN),),
                             (*bearer(), *bearer("other"))):
                error = call_raw(channel, path, client_streaming, server_streaming, metadata)
                assert error is not None, f"{path} served without the right token ({metadata})"
                assert_status(error, UNAUTHENTICATED, "missing or invalid bearer token")
        # Unknown methods too: a caller without the token learns nothing about the API.
        assert_status(call_raw(channel, "/pixtral.v1.Gateway/Nope", False, False), UNAUTHENTICATED)
        assert call_raw(channel, "/pixtral.v1.Gateway/Nope", False, False, bearer()).code() == \
            grpc.StatusCode.UNIMPLEMENTED
        # Health needs no token (probes cannot send one).
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        assert next(health.Watch(health_pb2.HealthCheckRequest(), timeout=10)).status == SERVING


def test_decoder_and_vision_servers_need_the_token_too(secure_stack, pki):
    methods = [(f"/pixtral.v1.Decoder/{method.name}", method.client_streaming, method.server_streaming)
               for method in decoder_pb2.DESCRIPTOR.services_by_name["Decoder"].methods]
    with secure(secure_stack.decoders[0], pki) as channel:
        for path, client_streaming, server_streaming in methods:
            assert_status(call_raw(channel, path, client_streaming, server_streaming), UNAUTHENTICATED)
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
        # With the token, the decoder serves (a bad request, refused for its content, not for its caller).
        with pytest.raises(grpc.RpcError) as caught:
            list(decoder_pb2_grpc.DecoderStub(channel).Generate(decoder_pb2.GenerateRequest(), metadata=bearer(),
                                                                 timeout=10))
        assert_status(caught.value, grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids: empty")
    with secure(secure_stack.vision[0], pki) as channel:
        assert_status(call_raw(channel, "/pixtral.v1.Vision/Anything", False, False), UNAUTHENTICATED)
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING


def test_the_bearer_scheme_is_taken_in_any_case(secure_stack, pki):
    """RFC 6750: `bearer`, `BEARER` and `Bearer` are one scheme; the token itself is compared exactly."""
    with secure(secure_stack.gateway, pki) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        request = gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(
            role=gateway_pb2.ROLE_USER, content=[gateway_pb2.ContentPart(text="Hi")])])
        for scheme in ("bearer", "BEARER", "bEaReR"):
            response = stub.Tokenize(request, metadata=(("authorization", f"{scheme} {TOKEN}"),), timeout=30)
            assert list(response.token_ids[:2]) == [1, 3], scheme
        with pytest.raises(grpc.RpcError) as caught:
            stub.Tokenize(request, metadata=(("authorization", f"Bearer {TOKEN.upper()}"),), timeout=30)
        assert_status(caught.value, UNAUTHENTICATED, "missing or invalid bearer token")


def test_the_token_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    interceptor = BearerTokenInterceptor(TOKEN, refuse=None)
    assert interceptor.is_authorized(bearer())
    assert not interceptor.is_authorized(bearer("nope"))
    assert not interceptor.is_authorized(())
    assert not interceptor.is_authorized((*bearer(), *bearer()))   # twice: ambiguous, refused
    assert compared == [(f"Bearer {TOKEN}".encode(),) * 2, (b"Bearer nope", f"Bearer {TOKEN}".encode())]
    with pytest.raises(ValueError):
        BearerTokenInterceptor("", refuse=None)


# -- TLS ---------------------------------------------------------------------------------------------------------

def test_chat_over_tls_reaches_the_decoders_over_mutual_tls(secure_stack, pki):
    """The gateway's decoder client presents its certificate and the token, or nothing would be generated."""
    request = chat_request([("user", ["Secure?", image_bytes(noise_image(32, 48, seed=600))])], max_tokens=4)
    for address in (secure_stack.gateway, secure_stack.mtls_gateway):
        with secure(address, pki) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            last = list(stub.Chat(request, metadata=bearer(), timeout=60))[-1]
            assert last.usage.completion_tokens == 4
            stored = stub.PutImages(gateway_pb2.PutImagesRequest(images=[request.messages[0].content[1].image]),
                                    metadata=bearer(), timeout=60)
            assert stored.images[0].was_cached


def test_tls_servers_refuse_plaintext_and_unknown_clients(secure_stack, pki):
    health = health_pb2.HealthCheckRequest()

    def check(channel: grpc.Channel) -> grpc.StatusCode:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health, timeout=5)
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            return error.code()

    for address in (secure_stack.gateway, secure_stack.mtls_gateway, *secure_stack.decoders):
        with grpc.insecure_channel(address) as channel:
            assert check(channel) == grpc.StatusCode.UNAVAILABLE, address
    # Mutual TLS: no client certificate, or one of a CA the server does not trust, cannot connect.
    for address in (secure_stack.mtls_gateway, *secure_stack.decoders, *secure_stack.vision):
        with secure(address, pki, client=None) as channel:
            assert check(channel) == grpc.StatusCode.UNAVAILABLE, address
        with secure(address, pki, client="rogue-client") as channel:
            assert check(channel) == grpc.StatusCode.UNAVAILABLE, address
    # TLS without client certificates: any client that trusts the server's CA connects.
    with secure(secure_stack.gateway, pki, client=None) as channel:
        assert check(channel) == grpc.StatusCode.OK


# -- pixtral-chat ------------------------------------------------------------------------------------------------

def chat_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.chat_cli", *args], cwd=ROOT, env=child_env(**env),
                          capture_output=True, text=True, timeout=120)


def test_pixtral_chat_with_token_and_tls(secure_stack, pki):
    tls = ["--tls-ca", str(pki["ca"])]
    args = ["--max-tokens", "3", "--json", "Hello"]
    result = chat_cli("--gateway", secure_stack.gateway, *tls, "--token", TOKEN, *args)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1])["finish_reason"] == "length"
    from_env = chat_cli("--gateway", secure_stack.gateway, *tls, *args, PIXTRAL_AUTH_TOKEN=TOKEN)
    assert from_env.returncode == 0, from_env.stderr
    mutual = chat_cli("--gateway", secure_stack.mtls_gateway, *tls, "--tls-cert", str(pki["client"]),
                      "--tls-key", str(pki["client-key"]), "--tokenize-only", "--json", "Hello",
                      PIXTRAL_AUTH_TOKEN=TOKEN)
    assert mutual.returncode == 0 and json.loads(mutual.stdout) == {"token_ids": [1, 3, 22177, 4]}, mutual.stderr

    refused = chat_cli("--gateway", secure_stack.gateway, *tls, *args)
    assert refused.returncode == 1 and refused.stderr.startswith("UNAUTHENTICATED: ") and refused.stdout == ""
    bad_flags = chat_cli("--gateway", secure_stack.gateway, "--tls-cert", str(pki["client"]), *args)
    assert bad_flags.returncode == 2 and "--tls-cert and --tls-key go together" in bad_flags.stderr


# -- configuration -----------------------------------------------------------------------------------------------

def test_tls_options_that_do_not_go_together_are_refused_at_start(capsys, pki):
    cases = [
        (["--tls-cert", str(pki["server"])], "--tls-cert and --tls-key go together"),
        (["--tls-client-ca", str(pki["ca"])], "--tls-client-ca needs --tls-cert and --tls-key"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", str(pki["server-key"])], "--tls-cert: cannot read"),
        (["--decoder-tls-cert", str(pki["client"]), "--decoder-tls-key", str(pki["client-key"])],
         "--decoder-tls-cert needs --decoder-tls-ca"),
        (["--image-url-allowed-networks", "10.0.0.0/33"], "--image-url-allowed-networks: not a network"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit):
            load_config(GatewayConfig, argv, {})
        assert message in capsys.readouterr().err
    config = load_config(GatewayConfig, [], {"PIXTRAL_AUTH_TOKEN": TOKEN})
    assert config.auth_token == config.decoder_token == TOKEN and TOKEN not in repr(config)
