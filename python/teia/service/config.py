"""Service configuration: one dataclass per service, filled from defaults, a TOML file and flags.

A service declares its settings once, as a dataclass whose fields carry `setting` metadata.
`add_arguments` turns every field into a flag (``data_dir`` → ``--data-dir``; lists repeat),
plus ``--config FILE``; `load` builds the dataclass from, in increasing precedence, the field
defaults, the TOML file, and the flags actually given. Keys are checked: an unknown key, a
value of the wrong type or one a field's validator refuses is a `ConfigError` naming the key
and where it came from, never a silent default.

    @dataclass
    class EchoConfig(ServiceConfig):
        listen: list[str] = setting(["/ip4/0.0.0.0/udp/4001/quic-v1"], "listen address",
                                    metavar="MULTIADDR")
"""

from __future__ import annotations

import argparse
import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from teia.errors import ConfigError

__all__ = ["MAX_CONFIG_SIZE", "ServiceConfig", "add_arguments", "load", "setting"]

MAX_CONFIG_SIZE = 1024 * 1024
"""A configuration file larger than this is refused (it is certainly a mistake)."""

C = TypeVar("C", bound="ServiceConfig")

_SCALARS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "a boolean",
}


def setting(
    default: Any,
    help: str,
    *,
    metavar: str | None = None,
    check: Callable[[Any], str | None] | None = None,
    flag: bool = True,
) -> Any:
    """A configurable field: its default, the flag's help, and an optional validator.

    ``check(value)`` returns None when the value is fine, else the reason it is not. Mutable
    defaults are copied per instance. ``flag=False`` makes the field settable only in the file.
    """
    metadata = {"help": help, "metavar": metavar, "check": check, "flag": flag}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _positive(value: Any) -> str | None:
    return None if value > 0 else "must be positive"


def _log_format(value: Any) -> str | None:
    return None if value in ("text", "json") else "must be 'text' or 'json'"


def _log_level(value: Any) -> str | None:
    levels = ("debug", "info", "warning", "error", "critical")
    return None if value.lower() in levels else f"must be one of {', '.join(levels)}"


def _metrics_address(value: Any) -> str | None:
    if value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be HOST:PORT (e.g. 127.0.0.1:9464), or empty to disable"
    return None


@dataclasses.dataclass
class ServiceConfig:
    """Settings every service has: logging, metrics and shutdown."""

    log_level: str = setting("info", "log level: debug, info, warning, error", check=_log_level)
    log_format: str = setting(
        "text", "log format: text (for people) or json (one object per line)", check=_log_format
    )
    metrics: str = setting(
        "",
        "serve Prometheus metrics on HOST:PORT (empty: off); metadata only, never content",
        metavar="HOST:PORT",
        check=_metrics_address,
    )
    shutdown_timeout: float = setting(
        10.0, "seconds allowed for a graceful stop after SIGTERM", check=_positive
    )

    identity_file: ClassVar[str | None] = None
    """The node identity's file name in ``data_dir``, for services that have one: they get
    ``--print-peer-id``."""

    def validate(self) -> None:
        """Checks across settings (each setting alone is checked by its ``check``); services
        override this and raise `ConfigError`. `load` calls it, so ``--check-config`` does."""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_list(annotation: Any) -> bool:
    return typing.get_origin(annotation) is list


def _base(annotation: Any) -> Any:
    """``list[X]`` → X, ``X | None`` → X."""
    if _is_list(annotation):
        return typing.get_args(annotation)[0]
    if isinstance(annotation, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def add_arguments(parser: argparse.ArgumentParser, cls: type[ServiceConfig]) -> None:
    """Add ``--config FILE``, ``--check-config`` (``--print-peer-id`` where ``cls`` has an
    identity file) and one flag per setting of ``cls`` to ``parser``."""
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file with these settings (flags win)"
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="load and check the settings, then exit: 0 if they are usable, 1 with the reason",
    )
    if cls.identity_file is not None:
        parser.add_argument(
            "--print-peer-id",
            action="store_true",
            help="print this node's peer ID (creating its identity in DATA_DIR on first use), "
            "then exit",
        )
    hints = _field_types(cls)
    for field in dataclasses.fields(cls):
        if not field.metadata.get("flag", True):
            continue
        annotation = hints[field.name]
        base = _base(annotation)
        default = (
            field.default_factory()
            if field.default_factory is not dataclasses.MISSING
            else field.default
        )
        shown = default if default not in ("", None, []) else "none"
        help_text = f"{field.metadata.get('help', '')} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        metavar = field.metadata.get("metavar")
        if base is bool and not _is_list(annotation):
            parser.add_argument(_flag(field.name), action=argparse.BooleanOptionalAction, **kwargs)
            continue
        kwargs["metavar"] = metavar or field.name.upper()
        kwargs["type"] = str  # converted and checked in `load`, with the key's name
        if _is_list(annotation):
            kwargs["action"] = "append"
            kwargs["help"] = help_text + "; repeatable"
        parser.add_argument(_flag(field.name), **kwargs)


def _convert(name: str, annotation: Any, value: Any, origin: str) -> Any:
    """Check/convert ``value`` for the field; raise ConfigError naming the key and origin."""
    where = f"{name} ({origin})"
    if _is_list(annotation):
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list")
        return [_convert(name, _base(annotation), item, origin) for item in value]
    base = _base(annotation)
    if isinstance(annotation, types.UnionType) and value is None:
        return None
    from_flag = origin.startswith("flag")
    if base is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{where}: must be a path")
        return Path(value).expanduser()
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: must be true or false")
    if base is int:
        if from_flag and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: must be {_SCALARS[int]}")
    if base is float:
        if from_flag and isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: must be {_SCALARS[float]}")
    if base is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: must be {_SCALARS[str]}")
    raise ConfigError(f"{where}: unsupported setting type {annotation!r}")  # pragma: no cover


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file with a size bound; errors name the file and say what is wrong."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_SIZE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    if len(data) > MAX_CONFIG_SIZE:
        raise ConfigError(f"config {path} is larger than {MAX_CONFIG_SIZE} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config {path} is not valid TOML: {exc}") from None


def load(
    cls: type[C],
    args: argparse.Namespace | None = None,
    *,
    file_values: Mapping[str, Any] | None = None,
) -> C:
    """Build ``cls`` from defaults, then the TOML file (``args.config`` or ``file_values``),
    then the flags given in ``args``. Raises `ConfigError`."""
    hints = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    if file_values is None and args is not None and getattr(args, "config", None) is not None:
        file_values = read_toml(args.config)
        source = f"file {args.config}"
    else:
        source = "file"
    for key, value in (file_values or {}).items():
        name = key.replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(n.replace("_", "-") for n in fields))
            raise ConfigError(f"unknown setting {key!r} in {source} (known: {known})")
        values[name] = _convert(key, hints[name], value, source)
        origin[name] = source
    if args is not None:
        for name in fields:
            given = getattr(args, name, None)
            if given is not None:
                values[name] = _convert(_flag(name), hints[name], given, "flag")
                origin[name] = "flag"
    config = cls(**values)
    for name, field in fields.items():
        check = field.metadata.get("check")
        if check is None:
            continue
        value = getattr(config, name)
        items = value if _is_list(hints[name]) else [value]
        for item in items:
            problem = check(item)
            if problem:
                where = origin.get(name, "default")
                raise ConfigError(f"{name.replace('_', '-')} ({where}): {item!r} {problem}")
    config.validate()
    return config
