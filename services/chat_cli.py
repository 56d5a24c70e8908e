"""`pixtral-chat`: a chat sent to a gateway; the answer streamed to stdout.

    pixtral-chat [--gateway HOST:PORT] [--image FILE]... [--image-ref SHA256]... [--max-tokens N]
                 [--temperature T] [--seed S] [--json] [--tokenize-only]
                 [--system TEXT] [--messages FILE] [--n N] [--top-logprobs K] [sampling flags]
                 [--json-object | --json-schema FILE | --regex PATTERN | --choice TEXT... | --grammar FILE]
                 [--tools FILE] [--tool-choice auto|none|required|NAME]
                 [--token TOKEN] [--tls | --tls-ca PEM [--tls-cert PEM --tls-key PEM]] [TEXT]

The chat is: the --system message, then the --messages, then one user message whose content is the images
(--image and --image-ref, in the order given on the command line) and TEXT. TEXT may be left out when --messages
is given. A failed call exits with status 1 and prints the gRPC status name and message on stderr; a flag value
the client cannot send (a file that is not JSON, --logit-bias without "=") is a usage error (status 2) naming the
flag. The bearer token defaults to $PIXTRAL_AUTH_TOKEN.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

import grpc

from pixtral.v1 import gateway_pb2, gateway_pb2_grpc
from services.chat_answer import AnswerPrinter
from services.chat_request import UsageError, build_request
from shared import tls
from shared.auth import bearer_metadata
from shared.settings import env_name, env_value

OUTPUT_HELP = """\
output:
  Without --json: the text of choice 0 as it streams. With --n > 1 each other choice follows once the stream
  ends, after a line "--- choice i". A choice's tool calls follow its text, one line each:
  "[tool call ID] NAME ARGUMENTS".

  With --json, one JSON object per line. A line per streamed message: "index" (the choice), "text",
  "token_ids". With --top-logprobs each such line holds exactly one token, with its "logprob" and
  "top_logprobs" (a list of [token_id, logprob], most likely first): a message of several tokens is printed as
  one line per token, the message's text on the last of them. Then one last line:
    text           the completion's text
    token_ids      its tokens
    finish_reason  stop, length, tool_calls, cancelled or error
    seed           the seed it was sampled with
    stop_reason    {"stop": STRING} or {"token_id": ID} when it stopped, else null
    tool_calls     a list of {"id", "name", "arguments"}, arguments as a JSON object
    logprobs       with --top-logprobs: one {"token_id", "logprob", "top_logprobs": [[token_id, logprob], ...]}
                   per token of token_ids
    index          the choice
    usage          the request's: prompt_tokens, completion_tokens (of every choice), image_tokens,
                   cached_images, encoded_images, cached_prompt_tokens
    request_id     the request's
  With --n > 1 the top-level keys are those of choice 0, and "choices" lists every choice (index 0 to n - 1),
  each an object with the keys above but request_id (its usage is the request's, the same in each).

  With --tokenize-only --json: {"token_ids": [...]}, the whole prompt.
"""

# The first line and the last paragraph of the module's docstring: what the chat is, how a call fails.
_DOC_PARAGRAPHS = __doc__.strip().split("\n\n")
DESCRIPTION = f"{_DOC_PARAGRAPHS[0]}\n\n{_DOC_PARAGRAPHS[-1]}"


class _AppendImage(argparse.Action):
    """--image and --image-ref share one list so their relative order is kept."""

    def __call__(self, parser, namespace, value, option_string=None):
        images = getattr(namespace, "images", None) or []
        images.append((self.dest, value))
        namespace.images = images


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {number}")
    return number


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def _logit_bias(value: str) -> tuple[int, float]:
    token, is_split, bias = value.partition("=")
    if not is_split:
        raise argparse.ArgumentTypeError(f"must be ID=BIAS, got {value!r}")
    try:
        return _non_negative_int(token), float(bias)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"must be ID=BIAS with an integer id >= 0 and a number, got {value!r}")


def _read_text(path: str) -> str:
    """The file's text; "-" is stdin."""
    if path == "-":
        return sys.stdin.read()
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except (OSError, UnicodeDecodeError) as error:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {error}")


def _json_file(path: str) -> Any:
    text = _read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {error}")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixtral-chat", description=DESCRIPTION, epilog=OUTPUT_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gateway", default="127.0.0.1:50051", help="gateway address (default %(default)s)")

    chat = parser.add_argument_group("the chat")
    chat.add_argument("--system", metavar="TEXT", help="a system message, first in the chat")
    chat.add_argument("--messages", type=_json_file, metavar="FILE",
                      help='a JSON list of OpenAI-style chat messages ("-": stdin): role system, user, assistant '
                           'or tool; content a string or a list of {"type": "text", "text": ...} and {"type": '
                           '"image_url", "image_url": {"url": "data:..." or "sha256:<hex>"}} parts; an '
                           'assistant\'s tool_calls, a tool\'s tool_call_id; "prefix": true on a last assistant '
                           "message, whose text the answer continues")
    chat.add_argument("--image", dest="file", action=_AppendImage, metavar="FILE",
                      help="an image file, in the last user message")
    chat.add_argument("--image-ref", dest="sha256", action=_AppendImage, metavar="SHA256",
                      help="an image sent before, by the sha256 of its bytes, in the last user message")
    chat.add_argument("--tools", type=_json_file, metavar="FILE",
                      help='a JSON list of OpenAI function tools: {"type": "function", "function": {"name", '
                           '"description", "parameters"}}')
    chat.add_argument("--tool-choice", metavar="auto|none|required|NAME",
                      help="whether the model may (auto) or must (required) call a tool, must not (none), or "
                           "must call the function NAME (default: auto with tools)")
    chat.add_argument("--no-parallel-tool-calls", dest="parallel_tool_calls", action="store_false", default=None,
                      help="at most one tool call per answer")
    chat.add_argument("text", nargs="?", metavar="TEXT",
                      help="the user's message, last in the chat (optional with --messages)")

    sampling = parser.add_argument_group("sampling and stopping (unset: the gateway's defaults)")
    sampling.add_argument("--n", type=_positive_int, metavar="N", help="completions to generate (default 1)")
    sampling.add_argument("--max-tokens", type=int, metavar="N", help="most tokens to generate")
    sampling.add_argument("--temperature", type=float, metavar="T", help="0 for greedy (default: the server's, 1.0)")
    sampling.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling, in (0, 1]")
    sampling.add_argument("--top-k", type=_non_negative_int, metavar="K", help="keep the K most likely tokens")
    sampling.add_argument("--min-p", type=float, metavar="P",
                          help="drop tokens less likely than P times the most likely one")
    sampling.add_argument("--seed", type=_non_negative_int, metavar="S", help="sampling seed")
    sampling.add_argument("--repetition-penalty", type=float, metavar="R",
                          help="divide the logits of the prompt's and output's tokens by R (1: off)")
    sampling.add_argument("--presence-penalty", type=float, metavar="P",
                          help="subtract P from the logit of each token the output holds, in [-2, 2]")
    sampling.add_argument("--frequency-penalty", type=float, metavar="F",
                          help="subtract F per occurrence in the output, in [-2, 2]")
    sampling.add_argument("--logit-bias", type=_logit_bias, action="append", default=[], metavar="ID=BIAS",
                          help="add BIAS (in [-100, 100]) to token ID's logit (repeatable)")
    sampling.add_argument("--min-tokens", type=_non_negative_int, metavar="N",
                          help="EOS and stop token ids cannot end the output before N tokens")
    sampling.add_argument("--stop", action="append", default=[], metavar="TEXT", help="a stop string (repeatable)")
    sampling.add_argument("--stop-token-id", type=_non_negative_int, action="append", default=[], metavar="ID",
                          help="stop after this token id, which is returned (repeatable)")
    sampling.add_argument("--ignore-eos", action="store_true", help="the end-of-sequence token does not stop")
    sampling.add_argument("--top-logprobs", type=_non_negative_int, metavar="K",
                          help="return each token's logprob and the K most likely tokens at its position (0-20)")

    formats = parser.add_argument_group("output format (at most one)").add_mutually_exclusive_group()
    formats.add_argument("--json-object", action="store_true", default=None, help="any JSON object")
    formats.add_argument("--json-schema", type=_json_file, metavar="FILE",
                         help="a JSON object valid against the JSON schema in FILE")
    formats.add_argument("--regex", metavar="PATTERN", help="text that matches PATTERN entirely")
    formats.add_argument("--choice", action="append", metavar="TEXT",
                         help="exactly one of the --choice strings (repeatable)")
    formats.add_argument("--grammar", type=_read_text, metavar="FILE", help="text of the EBNF (GBNF) grammar in FILE")

    call = parser.add_argument_group("the call")
    call.add_argument("--timeout", type=float, help="deadline of the call in seconds")
    call.add_argument("--json", action="store_true", help="print JSON lines (see output below)")
    call.add_argument("--tokenize-only", action="store_true", help="print the prompt's token ids only")
    call.add_argument("--token", default=env_value("auth_token"),
                      help=f"bearer token of the gateway (default: ${env_name('auth_token')})")
    call.add_argument("--tls", action="store_true", help="TLS, verifying the gateway with the system's CAs")
    call.add_argument("--tls-ca", default="", metavar="PEM", help="TLS, verifying the gateway with this CA")
    call.add_argument("--tls-cert", default="", metavar="PEM", help="client certificate (mutual TLS)")
    call.add_argument("--tls-key", default="", metavar="PEM", help="private key of --tls-cert")
    parser.set_defaults(images=[])
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.text is None and args.messages is None:
        parser.error("TEXT is required unless --messages is given")
    return args


# -- the call ------------------------------------------------------------------------------------------------

def open_channel(args: argparse.Namespace) -> grpc.Channel:
    options = [("grpc.max_send_message_length", 64 << 20)]
    tls.check_client_files(args.tls_ca, args.tls_cert, args.tls_key, "--tls")
    credentials = tls.channel_credentials(args.tls_ca, args.tls_cert, args.tls_key)
    if credentials is None and args.tls:
        credentials = grpc.ssl_channel_credentials()
    if credentials is None:
        return grpc.insecure_channel(args.gateway, options=options)
    return grpc.secure_channel(args.gateway, credentials, options=options)


def run(args: argparse.Namespace, request: gateway_pb2.ChatRequest, stub: gateway_pb2_grpc.GatewayStub,
        out: TextIO | None = None) -> None:
    """Sends the request and prints the answer on `out` (stdout); a failed call raises grpc.RpcError, after the
    last line when some choice had finished."""
    out = out or sys.stdout
    metadata = bearer_metadata(args.token or "")
    if args.tokenize_only:
        response = stub.Tokenize(request, timeout=args.timeout, metadata=metadata)
        print(json.dumps({"token_ids": list(response.token_ids)}) if args.json
              else " ".join(map(str, response.token_ids)), file=out)
        return
    printer = AnswerPrinter(args.n or 1, args.json, args.top_logprobs is not None, out)
    try:
        for response in stub.Chat(request, timeout=args.timeout, metadata=metadata):
            printer.add(response)
    except grpc.RpcError:
        if printer.has_finished_any():
            printer.close()
        raise
    printer.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        request = build_request(args)
    except UsageError as error:
        make_parser().error(str(error))
    except OSError as error:
        print(f"pixtral-chat: {error}", file=sys.stderr)
        return 2
    try:
        with open_channel(args) as channel:
            run(args, request, gateway_pb2_grpc.GatewayStub(channel))
    except grpc.RpcError as error:
        print(f"{error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as error:
        print(f"pixtral-chat: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
