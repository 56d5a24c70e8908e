"""Reads a service's frozen config dataclass from command-line flags and `PIXTRAL_*` environment variables.

This is the one place that touches `os.environ` for configuration. Each field `foo_bar` of a config dataclass is
settable as `--foo-bar` or `PIXTRAL_FOO_BAR`; a flag wins over the environment, which wins over the default.
A field's help text is its `metadata["help"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

T = TypeVar("T")
ENV_PREFIX = "PIXTRAL_"


def option(default: Any, help: str, secret: bool = False) -> Any:
    """A config field with its help text; a `secret` one (a token) is left out of the config's repr."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("config defaults must be immutable: use a tuple")
    return dataclasses.field(default=default, repr=not secret, metadata={"help": help})


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def env_value(field_name: str, environ: Mapping[str, str] | None = None) -> str | None:
    """The `PIXTRAL_*` environment value of a setting, for command-line tools that parse their own flags."""
    return (os.environ if environ is None else environ).get(env_name(field_name))


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(annotation: Any):
    origin = typing.get_origin(annotation)
    if origin is tuple:  # tuple[str, ...]: comma-separated
        (item_type, *_) = typing.get_args(annotation)
        return lambda text: tuple(item_type(part.strip()) for part in text.split(",") if part.strip())
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        convert = _converter(inner)
        return lambda text: None if text.strip().lower() in ("", "none") else convert(text)
    if annotation is bool:
        return _parse_bool
    return annotation


def load_config(cls: type[T], argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                description: str | None = None) -> T:
    """Builds `cls` from flags (argv) over environment variables over field defaults."""
    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(description=description or (cls.__doc__ or "").strip().splitlines()[0])
    converters = {}
    for field in dataclasses.fields(cls):
        convert = _converter(hints[field.name])
        converters[field.name] = convert
        default = field.default
        help_text = f"{field.metadata.get('help', '')} [env {env_name(field.name)}; default {default!r}]"
        parser.add_argument("--" + field.name.replace("_", "-"), dest=field.name, default=None,
                            metavar=field.name.upper(), help=help_text)
    args = parser.parse_args(argv)
    values = {}
    for field in dataclasses.fields(cls):
        raw = getattr(args, field.name)
        source = f"--{field.name.replace('_', '-')}"
        if raw is None and env_name(field.name) in environ:
            raw, source = environ[env_name(field.name)], env_name(field.name)
        if raw is None:
            continue
        try:
            values[field.name] = converters[field.name](raw)
        except ValueError as error:
            parser.error(f"{source}: {error}")
    try:
        return cls(**values)
    except ValueError as error:
        parser.error(str(error))
        raise  # unreachable: parser.error exits


def to_argv(config: Any) -> list[str]:
    """The flags that rebuild `config` in a child process (the inverse of load_config)."""
    argv = []
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if value is None:
            continue
        if isinstance(value, tuple):
            value = ",".join(map(str, value))
        argv += ["--" + field.name.replace("_", "-"), str(value)]
    return argv
