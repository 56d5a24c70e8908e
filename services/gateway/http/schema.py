"""Request bodies of the HTTP API, as OpenAI's chat completions API names its fields and vLLM names the rest.

Pydantic checks their shapes and types only; the values are checked once, by the chat service, for both
transports. Fields a model does not declare are kept (`model_extra`) and ignored, as OpenAI's API ignores them for
forward compatibility, except those `UNSUPPORTED` lists: they would change the output in a way this service does
not, so a request that sets them is refused rather than answered as if they were absent.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class ImageUrl(BaseModel):
    # A data: URL, an http(s) URL (where the gateway allows them) or "sha256:<64 hex>", our name for an image sent
    # before. `detail` is OpenAI's resolution hint: Pixtral reads every image at its native resolution.
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value   # vLLM accepts the URL alone


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[ContentPart] | None = None
    name: str | None = None                   # the speaker's name: not part of Pixtral's prompt format, ignored
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = None           # tool
    prefix: bool = False                      # Mistral's: the last assistant message is the answer's start

    @field_validator("content", mode="before")
    @classmethod
    def _text_is_one_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class FunctionDefinition(BaseModel):
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class JsonSchemaFormat(BaseModel):
    name: str = ""
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None   # the output always follows the schema: a grammar constrains every token


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: exactly one kind. Its other options (structural tags, whitespace patterns)
    change the output and are not supported: refused."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    messages: list[Message]
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None             # OpenAI's older name; max_completion_tokens wins
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None   # token ids as strings, as JSON object keys must be
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Any = None                   # "auto", "none", "required" or {"type": "function", ...}: convert.py
    parallel_tool_calls: bool | None = None
    user: str | None = None                   # ignored
    # vLLM's names
    top_k: int | None = None                  # -1 (vLLM's "off") is taken as unset
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    continue_final_message: bool = False
    add_generation_prompt: bool = True
    return_token_ids: bool = False            # each choice (and streamed delta) carries its token ids
    request_id: str | None = None


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a chat (`messages`) or a text (`prompt`), which is tokenized as one user message since
    this service serves chats only."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[Message] | None = None
    prompt: str | None = None


# Fields that change the output in ways this service does not support -> (values that change nothing, why).
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only text output is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "functions": ((None,), "the legacy functions API is not supported: use tools"),
    "function_call": ((None,), "the legacy functions API is not supported: use tool_choice"),
    "web_search_options": ((None,), "web search is not supported"),
    "reasoning_effort": ((None,), "this model does not reason"),
    "verbosity": ((None,), "not supported by this model"),
    "echo": ((None, False), "echoing the prompt is not supported"),
    "best_of": ((None, 1), "best_of is not supported: use n"),
    "use_beam_search": ((None, False), "beam search is not supported"),
    "length_penalty": ((None, 1, 1.0), "beam search is not supported"),
    "prompt_logprobs": ((None, 0), "prompt logprobs are not supported"),
    "bad_words": ((None, []), "bad words are not supported: use logit_bias"),
    "allowed_token_ids": ((None,), "allowed token ids are not supported: use logit_bias or structured_outputs"),
    "truncate_prompt_tokens": ((None,), "prompt truncation is not supported"),
    "include_stop_str_in_output": ((None, False), "stop strings are never included in the output"),
    "skip_special_tokens": ((None, True), "special tokens are never included in the output"),
    "chat_template": ((None,), "the chat template is the model's own (mistral-common's)"),
    "chat_template_kwargs": ((None, {}), "the chat template is the model's own (mistral-common's)"),
    "documents": ((None, []), "documents are not supported"),
    "guided_whitespace_pattern": ((None,), "whitespace patterns are not supported"),
    "structural_tag": ((None,), "structural tags are not supported"),
    "logits_processors": ((None, []), "custom logits processors are not supported"),
}


def unsupported_fields(extra: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(field, why) of every field of `extra` that UNSUPPORTED refuses at the value it holds."""
    found = []
    for name, value in (extra or {}).items():
        if name in UNSUPPORTED:
            harmless, why = UNSUPPORTED[name]
            if not any(value == allowed and type(value) is type(allowed) for allowed in harmless):
                found.append((name, why))
    return found
