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
from dataclasses import dataclass, field
from typing import Any, TextIO

import grpc

from pixtral.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
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
FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error",
                  common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}
ROLES = {"system": gateway_pb2.ROLE_SYSTEM, "user": gateway_pb2.ROLE_USER,
         "assistant": gateway_pb2.ROLE_ASSISTANT, "tool": gateway_pb2.ROLE_TOOL}
TOOL_CHOICE_MODES = {"auto": gateway_pb2.TOOL_CHOICE_MODE_AUTO, "none": gateway_pb2.TOOL_CHOICE_MODE_NONE,
                     "required": gateway_pb2.TOOL_CHOICE_MODE_REQUIRED}
# An --messages image URL of this scheme names an image sent before by its hash (the gateway's extension).
SHA256_SCHEME = "sha256:"
# Flags copied as they are into SamplingParams fields of the same name (the others need converting).
SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "min_p", "min_tokens")


class UsageError(ValueError):
    """A flag whose value cannot make a request; the message names the flag."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"argument {flag}: {message}")


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


# -- the request ---------------------------------------------------------------------------------------------

def image_part_from_url(url: str) -> gateway_pb2.ImagePart:
    """A data: URL as it is (the gateway decodes it); "sha256:<hex>" as a reference to an image sent before."""
    if url.startswith(SHA256_SCHEME):
        return gateway_pb2.ImagePart(sha256=url[len(SHA256_SCHEME):])
    return gateway_pb2.ImagePart(url=url)


def _content_from_openai(content: Any, where: str) -> list[gateway_pb2.ContentPart]:
    if content is None:
        return []
    if isinstance(content, str):
        return [gateway_pb2.ContentPart(text=content)]
    if not isinstance(content, list):
        raise UsageError("--messages", f"{where}: must be a string or a list of parts")
    parts = []
    for index, part in enumerate(content):
        at = f"{where}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(gateway_pb2.ContentPart(text=part["text"]))
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise UsageError("--messages", f"{at}.image_url: must be {{\"url\": \"data:...\"}}")
            parts.append(gateway_pb2.ContentPart(image=image_part_from_url(url)))
        else:
            raise UsageError("--messages", f'{at}: must be {{"type": "text", "text": ...}} or '
                                           f'{{"type": "image_url", "image_url": {{"url": ...}}}}')
    return parts


def _tool_call_from_openai(call: Any, where: str) -> gateway_pb2.ToolCall:
    """OpenAI's {"id", "type", "function": {"name", "arguments"}}, or this CLI's own {"id", "name", "arguments"};
    arguments as JSON text or as an object."""
    if not isinstance(call, dict):
        raise UsageError("--messages", f"{where}: must be an object")
    function = call.get("function", call)
    name, arguments = (function.get("name"), function.get("arguments", {})) if isinstance(function, dict) else (
        None, None)
    if not isinstance(call.get("id"), str) or not isinstance(name, str):
        raise UsageError("--messages", f'{where}: must be {{"id", "function": {{"name", "arguments"}}}}')
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return gateway_pb2.ToolCall(id=call["id"], name=name, arguments=arguments)


def message_from_openai(message: Any, where: str) -> gateway_pb2.Message:
    """One OpenAI-style chat message; `where` (e.g. "messages[2]") names it in errors."""
    if not isinstance(message, dict):
        raise UsageError("--messages", f"{where}: must be an object")
    role = message.get("role")
    if role not in ROLES:
        raise UsageError("--messages", f"{where}.role: must be one of {', '.join(ROLES)}, not {role!r}")
    calls = message.get("tool_calls") or []
    if not isinstance(calls, list):
        raise UsageError("--messages", f"{where}.tool_calls: must be a list")
    call_id = message.get("tool_call_id") or ""
    if not isinstance(call_id, str):
        raise UsageError("--messages", f"{where}.tool_call_id: must be a string")
    prefix = message.get("prefix", False)
    if not isinstance(prefix, bool):
        raise UsageError("--messages", f"{where}.prefix: must be true or false")
    return gateway_pb2.Message(
        role=ROLES[role], content=_content_from_openai(message.get("content"), f"{where}.content"),
        tool_calls=[_tool_call_from_openai(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(calls)],
        tool_call_id=call_id, prefix=prefix)


def tool_from_openai(tool: Any, where: str) -> gateway_pb2.Tool:
    """{"type": "function", "function": {"name", "description", "parameters"}} -> Tool (parameters as JSON text)."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise UsageError("--tools", f'{where}: must be {{"type": "function", "function": {{...}}}}')
    function = tool.get("function", tool)
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise UsageError("--tools", f"{where}.function.name: must be a string")
    description = function.get("description") or ""
    parameters = function.get("parameters")
    if not isinstance(description, str):
        raise UsageError("--tools", f"{where}.function.description: must be a string")
    if parameters is not None and not isinstance(parameters, dict):
        raise UsageError("--tools", f"{where}.function.parameters: must be a JSON schema object")
    return gateway_pb2.Tool(name=name, description=description,
                            parameters="" if parameters is None else json.dumps(parameters, ensure_ascii=False))


def _last_user_message(args: argparse.Namespace) -> gateway_pb2.Message | None:
    if args.text is None and not args.images:
        return None
    content = []
    for kind, value in args.images:
        if kind == "file":
            with open(value, "rb") as handle:
                content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(data=handle.read())))
        else:
            content.append(gateway_pb2.ContentPart(image=gateway_pb2.ImagePart(sha256=value)))
    if args.text is not None:
        content.append(gateway_pb2.ContentPart(text=args.text))
    return gateway_pb2.Message(role=gateway_pb2.ROLE_USER, content=content)


def _sampling(args: argparse.Namespace) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(stop=args.stop, stop_token_ids=args.stop_token_id)
    for name in SAMPLING_FLAGS:
        if getattr(args, name) is not None:
            setattr(sampling, name, getattr(args, name))
    for token_id, bias in args.logit_bias:
        sampling.logit_bias[token_id] = bias
    if args.ignore_eos:
        sampling.ignore_eos = True
    if args.top_logprobs is not None:
        sampling.logprobs = True
        sampling.top_logprobs = args.top_logprobs
    return sampling


def _response_format(args: argparse.Namespace) -> gateway_pb2.ResponseFormat | None:
    if args.json_object:
        return gateway_pb2.ResponseFormat(json_object=True)
    if args.json_schema is not None:
        if not isinstance(args.json_schema, dict):
            raise UsageError("--json-schema", "the file must hold a JSON schema object")
        return gateway_pb2.ResponseFormat(json_schema=json.dumps(args.json_schema, ensure_ascii=False))
    if args.regex is not None:
        return gateway_pb2.ResponseFormat(regex=args.regex)
    if args.choice is not None:
        return gateway_pb2.ResponseFormat(choice=gateway_pb2.Choices(choices=args.choice))
    if args.grammar is not None:
        return gateway_pb2.ResponseFormat(grammar=args.grammar)
    return None


def build_request(args: argparse.Namespace) -> gateway_pb2.ChatRequest:
    """The ChatRequest the flags describe; raises UsageError naming a flag whose value cannot be sent, OSError for
    an image file that cannot be read."""
    messages = [] if args.system is None else [
        gateway_pb2.Message(role=gateway_pb2.ROLE_SYSTEM, content=[gateway_pb2.ContentPart(text=args.system)])]
    if args.messages is not None:
        if not isinstance(args.messages, list):
            raise UsageError("--messages", "the file must hold a JSON list of messages")
        messages += [message_from_openai(message, f"messages[{i}]") for i, message in enumerate(args.messages)]
    last = _last_user_message(args)
    if last is not None:
        messages.append(last)
    request = gateway_pb2.ChatRequest(messages=messages, sampling=_sampling(args))
    if args.n is not None:
        request.n = args.n
    response_format = _response_format(args)
    if response_format is not None:
        request.response_format.CopyFrom(response_format)
    if args.tools is not None:
        if not isinstance(args.tools, list):
            raise UsageError("--tools", "the file must hold a JSON list of tools")
        request.tools.extend(tool_from_openai(tool, f"tools[{i}]") for i, tool in enumerate(args.tools))
    if args.tool_choice is not None:
        mode = TOOL_CHOICE_MODES.get(args.tool_choice)
        request.tool_choice.CopyFrom(gateway_pb2.ToolChoice(mode=mode) if mode is not None
                                     else gateway_pb2.ToolChoice(function=args.tool_choice))
    if args.parallel_tool_calls is not None:
        request.parallel_tool_calls = args.parallel_tool_calls
    return request


# -- the answer ----------------------------------------------------------------------------------------------

def _top_logprobs(logprob: common_pb2.TokenLogprob) -> list[list]:
    return [[top.token_id, top.logprob] for top in logprob.top_logprobs]


def _stop_reason(response: gateway_pb2.ChatResponse) -> dict | None:
    if not response.HasField("stop_reason"):
        return None
    kind = response.stop_reason.WhichOneof("reason")
    return {kind: getattr(response.stop_reason, kind)} if kind else None


@dataclass
class Completion:
    """One choice of the answer as its messages arrive."""

    index: int
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str | None = None
    seed: int | None = None
    stop_reason: dict | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, response: gateway_pb2.ChatResponse) -> None:
        self.texts.append(response.text)
        self.token_ids.extend(response.token_ids)
        self.logprobs.extend({"token_id": logprob.token_id, "logprob": logprob.logprob,
                              "top_logprobs": _top_logprobs(logprob)} for logprob in response.logprobs)
        for call in response.tool_calls:
            try:
                arguments = json.loads(call.arguments)
            except json.JSONDecodeError:
                arguments = call.arguments  # shown as sent rather than lost
            self.tool_calls.append({"id": call.id, "name": call.name, "arguments": arguments})
        if response.finish_reason:
            self.finish_reason = FINISH_REASONS.get(response.finish_reason, str(response.finish_reason))
            self.seed = response.seed
            self.stop_reason = _stop_reason(response)

    def as_json(self, has_logprobs: bool, usage: dict | None) -> dict:
        result = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                  "seed": self.seed, "stop_reason": self.stop_reason, "tool_calls": self.tool_calls}
        if has_logprobs:
            result["logprobs"] = self.logprobs
        result["index"] = self.index
        result["usage"] = usage
        return result


class AnswerPrinter:
    """Prints a Chat stream as it comes (text, or JSON lines), then what the stream ended with."""

    def __init__(self, num_choices: int, is_json: bool, has_logprobs: bool, out: TextIO) -> None:
        self.num_choices = num_choices
        self.is_json = is_json
        self.has_logprobs = has_logprobs
        self.out = out
        self.completions: dict[int, Completion] = {}
        self.usage: dict | None = None
        self.request_id = ""

    def add(self, response: gateway_pb2.ChatResponse) -> None:
        completion = self.completions.setdefault(response.index, Completion(response.index))
        completion.add(response)
        if response.request_id:
            self.request_id = response.request_id
        if response.HasField("usage"):
            self.usage = {field.name: getattr(response.usage, field.name)
                          for field in response.usage.DESCRIPTOR.fields}
        if self.is_json:
            self._print_token_lines(response)
        elif response.index == 0:
            print(response.text, end="", file=self.out, flush=True)
            if response.finish_reason:
                print(file=self.out)
                self._print_tool_calls(completion)

    def _print_token_lines(self, response: gateway_pb2.ChatResponse) -> None:
        lines = []
        if self.has_logprobs and response.token_ids:
            logprobs = list(response.logprobs)
            for position, token_id in enumerate(response.token_ids):
                line = {"index": response.index, "text": "", "token_ids": [token_id], "logprob": None,
                        "top_logprobs": []}
                if position < len(logprobs):
                    line["logprob"] = logprobs[position].logprob
                    line["top_logprobs"] = _top_logprobs(logprobs[position])
                lines.append(line)
            lines[-1]["text"] = response.text  # the text is complete once the message's last token is in
        elif response.text or response.token_ids:
            lines.append({"index": response.index, "text": response.text, "token_ids": list(response.token_ids)})
        for line in lines:
            print(json.dumps(line, ensure_ascii=False), file=self.out, flush=True)

    def _print_tool_calls(self, completion: Completion) -> None:
        for call in completion.tool_calls:
            print(f"[tool call {call['id']}] {call['name']} {json.dumps(call['arguments'], ensure_ascii=False)}",
                  file=self.out)

    def has_finished_any(self) -> bool:
        return any(completion.finish_reason for completion in self.completions.values())

    def close(self) -> None:
        """After the stream: the last JSON line, or the choices after the first."""
        num_choices = max(self.num_choices, max(self.completions, default=0) + 1)
        completions = [self.completions.get(index, Completion(index)) for index in range(num_choices)]
        if self.is_json:
            choices = [completion.as_json(self.has_logprobs, self.usage) for completion in completions]
            last = {**choices[0], "request_id": self.request_id}
            if num_choices > 1:
                last["choices"] = choices
            print(json.dumps(last, ensure_ascii=False), file=self.out, flush=True)
            return
        for completion in completions[1:]:
            print(f"--- choice {completion.index}", file=self.out)
            if completion.text:
                print(completion.text, file=self.out)
            self._print_tool_calls(completion)
        self.out.flush()


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
