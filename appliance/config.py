"""One TOML file -> typed, validated settings.

Like Klipper, one configuration file whose sections switch parts of the
appliance on; each part reads only its own section. With no file at all the
embedded defaults serve, so `make run` on a fresh clone just works.

A wrong key, type or value must stop start-up with a message a field engineer
can act on: which file, which key, what is allowed. A typo silently ignored is
how a gateway ends up sending images nowhere for a week.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.dicom.peers import PeerSettings
from appliance.disks.settings import DisksSettings
from appliance.fields import (  # noqa: F401 - the checks other modules and tests take from here
    check_ae_title,
    check_ae_titles,
    check_name,
    check_nonempty,
    check_not_negative,
    check_port,
    check_positive,
    check_window,
)
from appliance.fields import checked as _checked
from appliance.forward.settings import DestinationSettings, ForwardSettings, MatchSettings  # noqa: F401

CONFIG_ENV = "APPLIANCE_CONFIG"
# Where the appliance image keeps its configuration: a field engineer's
# `appliance status` over SSH must look at the same data as the services.
SYSTEM_CONFIG = Path("/etc/appliance/appliance.toml")


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


# --- value checks -------------------------------------------------------------


def check_log_level(value: str) -> str | None:
    allowed = ("DEBUG", "INFO", "WARNING", "ERROR")
    return None if value.upper() in allowed else f"one of {', '.join(allowed)}"


# --- sections -----------------------------------------------------------------


@dataclass(frozen=True)
class NodeSettings:
    """[node]: who this gateway is on the modality LAN and where it keeps data."""

    ae_title: str = _checked("GATEWAY", check_ae_title, "our AE title")
    dicom_port: int = _checked(11112, check_port, "TCP port of the DICOM service")
    data_dir: Path = _checked(
        Path("./var"), None, "archive, index, quarantine; relative paths are from the cwd"
    )
    allowed_callers: tuple[str, ...] = _checked(
        (), check_ae_titles, "calling AE titles allowed to connect; empty = accept any"
    )
    bind_address: str = _checked("0.0.0.0", None, "address the DICOM service listens on")
    max_associations: int = _checked(16, check_positive, "simultaneous associations")
    max_pending: int = _checked(
        32, check_positive, "connections not yet associated (no thread is spent on them); more are closed"
    )
    max_pending_per_address: int = _checked(
        8, check_positive, "of those, from one IP address (one broken or hostile host cannot fill them)"
    )
    acse_timeout: float = _checked(
        30.0, check_positive, "seconds a new connection has to send its whole A-ASSOCIATE-RQ"
    )
    dimse_timeout: float = _checked(
        120.0, check_positive, "seconds one whole DIMSE message may take (command + dataset); else A-ABORT"
    )
    network_timeout: float = _checked(120.0, check_positive, "idle seconds before closing")
    artim_timeout: float = _checked(
        10.0, check_positive, "seconds the peer has to close after release, reject or abort"
    )
    max_pdu: int = _checked(262144, check_not_negative, "largest PDU we accept (0 = any)")
    check_called_ae: bool = _checked(
        False, None, "true: reject associations calling another AE title than ours"
    )
    max_inflated_mb: int = _checked(
        64, check_positive, "a Deflated dataset larger than this inflated is refused (0xC000, quarantine)"
    )
    max_inflate_ratio: int = _checked(
        200, check_positive, "a Deflated dataset inflating more than this many times is refused likewise"
    )
    max_sequence_depth: int = _checked(
        64, check_positive, "sequences nested deeper than this are refused (0xC000, quarantine)"
    )
    min_free_mb: int = _checked(
        100, check_not_negative, "refuse new images (0xA700) below this free space"
    )
    log_level: str = _checked("INFO", check_log_level, "DEBUG, INFO, WARNING or ERROR")


def check_store_format(value: str) -> str | None:
    allowed = ("uncompressed", "lossless", "lossy", "as-received")
    return None if value in allowed else f"one of {', '.join(allowed)}"


def _syntax_check(wanted: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        from appliance.transcode import syntaxes

        resolved = syntaxes.resolve(value)
        if resolved is None or syntaxes.class_of(resolved) != wanted:
            names = ", ".join(f"{syntaxes.name_of(s)} ({s})" for s in syntaxes.members(wanted))
            return f"a {wanted} transfer syntax UID or keyword: {names}"
        return None

    return check


def check_psnr(value: float) -> str | None:
    return None if 0 <= value <= 200 else "a PSNR in dB from 0 (no bound) to 200"


def check_on_conflict(value: str) -> str | None:
    allowed = ("replace", "keep-first", "reject")
    return None if value in allowed else f"one of {', '.join(allowed)}"


def check_quality(value: int) -> str | None:
    return None if 1 <= value <= 100 else "a number from 1 (smallest) to 100 (best)"


def check_commit_requires(value: str) -> str | None:
    return None if value in ("archive", "two-disks") else '"archive" or "two-disks"'


@dataclass(frozen=True)
class StorageSettings:
    """[storage]: the format the archive keeps (store rule in docs/DESIGN.md)."""

    format: str = _checked(
        "as-received", check_store_format, "uncompressed, lossless, lossy or as-received"
    )
    lossless_syntax: str = _checked(
        "1.2.840.10008.1.2.4.80", _syntax_check("lossless"),
        "syntax for format = lossless (default JPEG-LS Lossless; see docs/PERFORMANCE.md)",
    )
    lossy_syntax: str = _checked(
        "1.2.840.10008.1.2.4.91", _syntax_check("lossy"),
        "syntax for format = lossy (default JPEG 2000; holds 8-16 bit data)",
    )
    lossy_quality: int = _checked(
        90, check_quality, "1-100: JPEG quality; J2K ratio 2+(100-q)/2; JPEG-LS NEAR; HTJ2K step"
    )
    lossy_min_psnr: float = _checked(
        28.0, check_psnr, "a lossy result under this PSNR (dB) against its source is refused, original kept"
    )
    on_conflict: str = _checked(
        "replace", check_on_conflict,
        "another sender re-sends an instance with other content: replace, keep-first or reject",
    )
    commit_requires: str = _checked(
        "archive", check_commit_requires,
        "Storage Commitment commits an instance once: archive (stored, verified) or two-disks (and on two "
        "verified external disks)",
    )

    def syntax(self, format_class: str) -> str:
        """The concrete syntax for a class name, as a UID."""
        from appliance.transcode import syntaxes

        if format_class == "lossless":
            return syntaxes.resolve(self.lossless_syntax) or self.lossless_syntax
        if format_class == "lossy":
            return syntaxes.resolve(self.lossy_syntax) or self.lossy_syntax
        return syntaxes.UNIVERSAL[0]


@dataclass(frozen=True)
class WebSettings:
    """[web]: the front-panel status page, its JSON (/api/status) and /metrics."""

    enabled: bool = _checked(True, None, "false: no status page (the other services do not need it)")
    port: int = _checked(8080, check_port, "TCP port of the status page")
    bind_address: str = _checked("0.0.0.0", None, "address the status page listens on")
    refresh_seconds: int = _checked(10, check_positive, "how often the page reloads itself")


@dataclass(frozen=True)
class Settings:
    """All sections. `source` names the file they came from, for messages."""

    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    forward: ForwardSettings = field(default_factory=ForwardSettings)
    destinations: tuple[DestinationSettings, ...] = ()
    peers: tuple[PeerSettings, ...] = ()
    disks: DisksSettings = field(default_factory=lambda: DisksSettings(enabled=False))
    web: WebSettings = field(default_factory=WebSettings)
    source: str = "embedded defaults"

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir


SECTIONS: dict[str, type] = {"node": NodeSettings, "storage": StorageSettings,
                             "forward": ForwardSettings, "disks": DisksSettings, "web": WebSettings}
# Sections written [[name]], one table per item: name -> (Settings attribute, class).
LIST_SECTIONS: dict[str, tuple[str, type]] = {"destination": ("destinations", DestinationSettings),
                                              "peer": ("peers", PeerSettings)}


# --- loading ------------------------------------------------------------------


def _type_name(hint: Any) -> str:
    if hint is Path:
        return "a path string"
    if typing.get_origin(hint) is tuple:
        return "a list of strings"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(
        hint, str(hint)
    )


def _coerce(hint: Any, value: Any) -> Any:
    """Return `value` as `hint`, or raise TypeError. TOML already typed it."""
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif hint is Path:
        if isinstance(value, str) and value:
            return Path(value)
    elif (
        typing.get_origin(hint) is tuple
        and isinstance(value, list)
        and all(isinstance(v, str) for v in value)
    ):
        return tuple(value)
    raise TypeError


def build_section(cls: type, table: Any, source: str, name: str) -> Any:
    """Build one section dataclass from its TOML table, checking every key."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table of settings")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: [{name}] has unknown key {key!r}; allowed keys: {allowed}")
        hint = hints[key]
        if isinstance(hint, types.UnionType):
            hint = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(hint):
            values[key] = build_section(hint, raw, source, f"{name}.{key}")
            continue
        try:
            value = _coerce(hint, raw)
        except TypeError:
            raise ConfigError(
                f"{source}: [{name}] {key} = {raw!r} has the wrong type; expected {_type_name(hint)}"
            ) from None
        check = fields[key].metadata.get("check")
        problem = check(value) if check else None
        if problem:
            raise ConfigError(f"{source}: [{name}] {key} = {raw!r} is not allowed: {problem}")
        values[key] = value
    missing = [f.name for f in dataclasses.fields(cls)
               if f.name not in values and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{source}: [{name}] is missing {', '.join(repr(m) for m in missing)}")
    check = getattr(cls, "check_whole", None)
    problem = check(values) if check else None
    if problem:
        raise ConfigError(f"{source}: [{name}]: {problem}")
    return cls(**values)


def parse(text: str, source: str) -> Settings:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    sections: dict[str, Any] = {}
    for name, table in document.items():
        if name in LIST_SECTIONS:
            attribute, cls = LIST_SECTIONS[name]
            if not isinstance(table, list):
                raise ConfigError(f"{source}: write [[{name}]] (one per {name}), not [{name}]")
            built = [build_section(cls, item, source, f"{name} #{n}")
                     for n, item in enumerate(table, start=1)]
            names = [item.name for item in built if hasattr(item, "name")]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ConfigError(f"{source}: [[{name}]] name {duplicates[0]!r} is used twice")
            sections[attribute] = tuple(built)
            continue
        if name not in SECTIONS:
            allowed = ", ".join([*(f"[{s}]" for s in SECTIONS), *(f"[[{s}]]" for s in LIST_SECTIONS)])
            raise ConfigError(f"{source}: unknown section [{name}]; allowed sections: {allowed}")
        sections[name] = build_section(SECTIONS[name], table, source, name)
    settings = Settings(**sections, source=source)
    if settings.peers and settings.node.allowed_callers:
        raise ConfigError(f"{source}: [node] allowed_callers and [[peer]] entries are both set; list every "
                          "caller as a [[peer]] and remove allowed_callers")
    return _absolute(settings)


def _absolute(settings: Settings) -> Settings:
    """Resolve data_dir now, so child services started elsewhere agree on it."""
    node = dataclasses.replace(settings.node, data_dir=settings.node.data_dir.expanduser().resolve())
    return dataclasses.replace(settings, node=node)


def load(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from `path`, else $APPLIANCE_CONFIG, else SYSTEM_CONFIG, else defaults."""
    chosen = path if path is not None else os.environ.get(CONFIG_ENV) or None
    if chosen is None and SYSTEM_CONFIG.is_file():
        chosen = SYSTEM_CONFIG
    if chosen is None:
        return _absolute(Settings())
    file = Path(chosen)
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"configuration file {file} does not exist; check --config or ${CONFIG_ENV}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"configuration file {file} cannot be read: {exc}") from None
    return parse(text, str(file))


def describe() -> list[tuple[str, str, Any, str]]:
    """(section, key, default, description) for every setting: README and `config show`."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((name, f.name, f.default, f.metadata.get("doc", "")))
    return rows


def to_toml(settings: Settings) -> str:
    """The settings in force, as TOML a field engineer can copy into a file."""
    lines: list[str] = []
    for name in SECTIONS:
        lines.append(f"[{name}]")
        lines.extend(_toml_fields(getattr(settings, name)))
        lines.append("")
    for name, (attribute, _cls) in LIST_SECTIONS.items():
        for item in getattr(settings, attribute):
            lines.append(f"[[{name}]]")
            lines.extend(_toml_fields(item))
            lines.append("")
    return "\n".join(lines)


def _toml_fields(section: Any) -> list[str]:
    lines = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            inner = ", ".join(f"{g.name} = {_toml_value(getattr(value, g.name))}"
                              for g in dataclasses.fields(value))
            lines.append(f"{f.name} = {{ {inner} }}")
        else:
            lines.append(f"{f.name} = {_toml_value(value)}")
    return lines


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'
