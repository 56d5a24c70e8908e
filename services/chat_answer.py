"""pixtral-chat's output: a Chat stream printed as it comes, as text or JSON lines (OUTPUT_HELP in chat_cli.py
says what each holds)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TextIO

from pixtral.v1 import common_pb2, gateway_pb2

FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                  common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error",
                  common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls"}


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
