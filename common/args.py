"""Frozen per-process config dataclasses whose CLI flags are generated from their fields."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar

from common.event_loop import CHOICES as EVENT_LOOPS

T = TypeVar("T", bound="ArgsBase")


def arg(
    default: Any, help: str, *, aliases: tuple[str, ...] = (), choices: tuple[Any, ...] | None = None
) -> Any:
    """A dataclass field carrying its CLI help, SGLang-style aliases and choices."""
    meta = {"help": help, "aliases": aliases, "choices": choices}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _base_type(tp: Any) -> tuple[type, bool]:
    """(element type, is_list) for str, int, float, bool, X | None and list[X]."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(inner[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


@dataclasses.dataclass(frozen=True)
class ArgsBase:
    """Base for GatewayArgs, SchedulerArgs, ... : `add_cli_args` / `from_cli_args` mirror the fields."""

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = ()) -> None:
        hints = typing.get_type_hints(cls)
        groups = {}  # flags of a base class with a `_cli_group` title come last, under that title
        for base in cls.__mro__:
            title = base.__dict__.get("_cli_group")
            if title:
                groups.update(dict.fromkeys(base.__dataclass_fields__, title))
        fields = sorted(dataclasses.fields(cls), key=lambda f: f.name in groups)
        targets: dict[str, Any] = {}
        for f in fields:
            if f.name in skip or not f.init:
                continue
            target = parser
            if f.name in groups:
                title = groups[f.name]
                target = targets.get(title) or targets.setdefault(title, parser.add_argument_group(title))
            tp, is_list = _base_type(hints[f.name])
            names = ["--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_text = f.metadata.get("help", "")
            help_text = f"{help_text} (default: {default!r})" if default not in (None, "") else help_text
            kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
            if tp is bool:
                target.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
                continue
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
            if is_list:
                kwargs["nargs"] = "*"
            target.add_argument(*names, type=tp, **kwargs)

    @classmethod
    def from_cli_args(cls: type[T], ns: argparse.Namespace, **overrides: Any) -> T:
        values = {
            f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(ns, f.name)
        }
        values.update(overrides)
        return cls(**values)

    def to_cli(self, *, skip: tuple[str, ...] = ()) -> list[str]:
        """The flags that reproduce this config (used by `mirador up` to start each service)."""
        out: list[str] = []
        for f in dataclasses.fields(self):
            if f.name in skip or not f.init:
                continue
            value = getattr(self, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                out.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif value is None or (value == "" and f.default == ""):  # unset: the service's own default
                continue
            elif isinstance(value, list):
                out.append(flag)
                out.extend(str(v) for v in value)
            else:
                out.extend([flag, str(value)])
        return out


@dataclasses.dataclass(frozen=True)
class ProcessArgs(ArgsBase):
    """Flags of every service about its process."""

    _cli_group = "process"

    event_loop: str = arg(
        "auto",
        "the asyncio event loop: uvloop (C transports, less CPU per message), asyncio's own, or auto = uvloop "
        "when installed",
        choices=EVENT_LOOPS,
    )


@dataclasses.dataclass(frozen=True)
class ObservabilityArgs(ArgsBase):
    """Flags of every service about logs."""

    _cli_group = "observability"

    log_format: str = arg(
        "text",
        "log lines as plain text or one JSON object per line (request ids in both)",
        choices=("text", "json"),
    )
    log_requests: bool = arg(
        False,
        "log every request: the gateway its body and response (truncated), the scheduler its admission, the worker "
        "its sequences' start, vision its encodes; each line carries the request id (SGLang's flag)",
    )
