"""`pixtral-chat`: one user message (images, then text) sent to a gateway; the answer streamed to stdout.

    pixtral-chat [--gateway HOST:PORT] [--image FILE]... [--image-ref SHA256]... [--max-tokens N]
                 [--temperature T] [--seed S] [--json] [--tokenize-only]
                 [--token TOKEN] [--tls | --tls-ca PEM [--tls-cert PEM --tls-key PEM]] TEXT

Images come first, in the order given on the command line. With --json, one JSON object per streamed message,
then a last line with the completion's token_ids, finish_reason and usage. A failed call exits with status 1
and prints the gRPC status name and message on stderr. The bearer token defaults to $PIXTRAL_AUTH_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from shared import tls
from shared.auth import bearer_metadata
from shared.settings import env_name, env_value

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error"}


class _AppendImage(argparse.Action):
    """--image and --image-ref share one list so their relative order is kept."""

    def __call__(self, parser, namespace, value, option_string=None):
        images = getattr(namespace, "images", None) or []
        images.append((self.dest, value))
        namespace.images = images


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pixtral-chat", description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", default="127.0.0.1:50051", help="gateway address (default %(default)s)")
    parser.add_argument("--image", dest="file", action=_AppendImage, metavar="FILE", help="an image file")
    parser.add_argument("--image-ref", dest="sha256", action=_AppendImage, metavar="SHA256",
                        help="an image sent before, by the sha256 of its bytes")
    parser.add_argument("--max-tokens", type=int, help="most tokens to generate")
    parser.add_argument("--temperature", type=float, help="0 for greedy (default: the server's, 1.0)")
    parser.add_argument("--seed", type=int, help="sampling seed")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    parser.add_argument("--tokenize-only", action="store_true", help="print the prompt's token ids only")
    parser.add_argument("--token", default=env_value("auth_token"),
                        help=f"bearer token of the gateway (default: ${env_name('auth_token')})")
    parser.add_argument("--tls", action="store_true", help="TLS, verifying the gateway with the system's CAs")
    parser.add_argument("--tls-ca", default="", metavar="PEM", help="TLS, verifying the gateway with this CA")
    parser.add_argument("--tls-cert", default="", metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("text", help="the user's message")
    parser.set_defaults(images=[])
    return parser.parse_args(argv)


def build_request(args: argparse.Namespace) -> gateway_pb2.ChatRequest:
    content = []
    for kind, value in args.images:
        if kind == "file":
            with open(value, "rb") as handle:
                content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=handle.read())))
        else:
            content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(sha256=value)))
    content.append(gateway_pb2.ContentPart(text=args.text))
    sampling = common_pb2.SamplingParams(stop=args.stop)
    for name in ("max_tokens", "temperature", "seed"):
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    return gateway_pb2.ChatRequest(messages=[gateway_pb2.Message(role=gateway_pb2.ROLE_USER, content=content)],
                                   sampling=sampling)


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 64 << 20)]
    tls.check_client_files(args.tls_ca, args.tls_cert, args.tls_key, "--tls")
    credentials = tls.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    if credentials is None and args.tls:
        credentials = grpc.ssl_channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(args.gateway, options=options)
    return grpc.secure_channel(args.gateway, credentials, options=options)


def run(args: argparse.Namespace, stub: gateway_pb2_grpc.GatewayStub) -> None:
    request = build_request(args)
    metadata = bearer_metadata(args.token or "")
    if args.tokenize_only:
        response = stub.Tokenize(request, timeout=args.timeout, metadata=metadata)
        print(json.dumps({"token_ids": list(response.token_ids)}) if args.json
              else " ".join(map(str, response.token_ids)))
        return
    token_ids: list[int] = []
    for response in stub.Chat(request, timeout=args.timeout, metadata=metadata):
        token_ids.extend(response.token_ids)
        if response.finish_reason:
            usage = response.usage
            if args.json:
                print(json.dumps({"token_ids": token_ids, "finish_reason": FINISH_REASONS[response.finish_reason],
                                  "request_id": response.request_id,
                                  "usage": {field.name: getattr(usage, field.name)
                                            for field in usage.DESCRIPTOR.fields}}))
            else:
                print()
        elif args.json:
            print(json.dumps({"text": response.text, "token_ids": list(response.token_ids)}, ensure_ascii=False),
                  flush=True)
        else:
            print(response.text, end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with open_channel(args) as channel:
            run(args, gateway_pb2_grpc.GatewayStub(channel))
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"pixtral-chat: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
