"""Settings from a TOML file, ZCHAT_* environment variables and command-line flags.

One place decides every setting, highest precedence first:

    command-line flag  >  ZCHAT_<KEY> environment variable  >  config file  >  default

The config file is `--config PATH`, else `$ZCHAT_CONFIG`, else `<config dir>/zchat.toml`
(missing is fine unless named explicitly). Its top level holds the settings both sides
share (host, ports, config dir); `[broker]` and `[client]` hold each side's own and may
override the shared ones for that side:

    port = 1234
    [broker]
    host = "0.0.0.0"
    rate_burst = 40
    [client]
    name = "alice"

`resolve()` is pure (unit-tested); `load()` reads the file and the environment around it.
msgspec checks every value (`msgspec.convert` against each option's type and `Meta` bounds; the
file against structs that forbid unknown fields); this module only words what it refused:
any invalid value raises ConfigError whose text is one line naming the key and the problem.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import msgspec
from msgspec import UNSET, Meta, UnsetType

from zchat import limits as L
from zchat.endpoints import DEFAULT_HOST, DEFAULT_PORT

CONFIG_FILE_NAME = "zchat.toml"
ENV_PREFIX = "ZCHAT_"
CONFIG_ENV = "ZCHAT_CONFIG"  # the config file itself
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SIDES = ("broker", "client")


class ConfigError(Exception):
    """An invalid setting; the message is one line naming the key and the problem."""


class _Invalid(Exception):
    """A value's problem in words; the caller says where the value came from."""


# --- checks: bounds are msgspec constraints; the few no type can say are functions -----------


_FINITE = Meta(le=sys.float_info.max)  # with the lower bound every float option has: no inf, no nan
_NOT_EMPTY = Meta(min_length=1)


def _log_level(value: str) -> str | None:
    return None if value.upper() in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}"


def _host(value: str) -> str | None:
    return None if value.strip() and not any(c.isspace() for c in value) else f"not a host name: {value!r}"


def _name(value: str) -> str | None:
    from zchat.protocol import valid_name

    return None if valid_name(value) else (f"invalid name {value!r}: 1-{L.MAX_NAME_CHARS} ASCII letters, "
                                           "digits, '.', '-' or '_', starting with a letter or digit")


# strftime directives a timestamp_format may use (C89, POSIX and the common glibc ones), each
# with an optional glibc flag (%-d: no padding): anything else is a typo, said at start-up.
_CLOCK_DIRECTIVE = re.compile(r"%[-_0^#]?([aAbBcCdDeFgGhHIjklmMnpPrRsStTuUVwWxXyYzZ%])|%(.?)", re.DOTALL)


def _clock_format(value: str) -> str | None:
    if len(value) > 64 or not value.isprintable():
        return f"a strftime format of at most 64 printable characters, got {value!r}"
    for match in _CLOCK_DIRECTIVE.finditer(value):
        if match.group(1) is None:
            return f"unknown strftime directive %{match.group(2)} in {value!r} (use %H:%M:%S and the like)"
    return None


def _public_key(value: str) -> str | None:
    from zchat.keys import parse_public_key

    try:
        for key in value.split(","):  # one per --host endpoint (clients of relays)
            parse_public_key(key)
    except ValueError as exc:
        return str(exc)
    return None


# --- the options ---------------------------------------------------------------------

_BASE: dict[str, type] = {"int": int, "float": float, "str": str, "bool": bool, "path": str}


@dataclass(frozen=True)
class Option:
    key: str
    kind: str  # int | float | str | bool | path
    section: str  # "": shared (top level, or a side's table); "broker" / "client": that table only
    default: Any
    help: str  # the one text for --help (cli.py adds the default)
    bounds: Meta | None = None
    check: Callable[[Any], str | None] | None = None
    live: bool = False  # the broker applies a change on SIGHUP; otherwise it needs a restart
    metavar: str | None = None  # the flag's argument in --help

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def type(self) -> Any:
        """The type msgspec checks a value against: the kind with its bounds."""
        extra = {"float": _FINITE, "path": _NOT_EMPTY}.get(self.kind)
        metas = [m for m in (self.bounds, extra) if m is not None]
        return Annotated[(_BASE[self.kind], *metas)] if metas else _BASE[self.kind]


OPTIONS: dict[str, Option] = {o.key: o for o in (
    Option("config_dir", "path", "", None, "keys and broker state (default $XDG_CONFIG_HOME/zchat "
           "or ~/.config/zchat)", metavar="DIR"),
    Option("host", "str", "", DEFAULT_HOST, "broker address; on the broker the interface to bind, "
           "0.0.0.0 for all", check=_host),
    Option("port", "int", "", DEFAULT_PORT, "the broker's input (PULL) port", Meta(ge=1, le=65535)),
    Option("pub_port", "int", "", None, "the broker's publish (XPUB) port (default port + 1)",
           Meta(ge=1, le=65535)),
    Option("idle_exit", "float", "broker", 0.0, "stop after this many seconds with nobody online, "
           "0 = never", Meta(ge=0), live=True, metavar="SECONDS"),
    Option("db", "path", "broker", None, "history database (default <config dir>/broker/"
           "history.sqlite3; :memory: keeps none)", metavar="FILE"),
    Option("authorized_keys", "path", "broker", None, "closed mode: only keys in FILE ('name "
           "public-key [role]' lines; roles user, tap, admin, relay) may connect; re-read on SIGHUP",
           metavar="FILE"),
    Option("relay_keys", "path", "broker", None, "keys of relays, which may mark their clients' "
           "identities ('public-key' lines; default <config dir>/broker/relay-keys if present; in "
           "closed mode the role relay counts too)", metavar="FILE"),
    Option("history_keep", "int", "broker", L.HISTORY_KEEP_PER_ROOM, "events kept per room, "
           "0 = no limit", Meta(ge=0), live=True, metavar="N"),
    Option("history_days", "float", "broker", L.HISTORY_KEEP_DAYS, "drop events older than this "
           "many days, 0 = never", Meta(ge=0), live=True, metavar="DAYS"),
    Option("rate_burst", "int", "broker", L.RATE_BURST, "messages a sender may send at once",
           Meta(ge=1), live=True, metavar="N"),
    Option("rate_per_second", "float", "broker", L.RATE_PER_SECOND, "sustained messages per second "
           "per sender, 0 = unlimited", Meta(ge=0), live=True, metavar="R"),
    Option("client_timeout", "float", "broker", L.CLIENT_TIMEOUT, "seconds of silence after which a "
           "client is announced as left", Meta(ge=0.5), live=True, metavar="SECONDS"),
    Option("max_peers", "int", "broker", L.MAX_PEERS, "keys the broker tracks at once; keys that "
           "have not joined make room for new ones", Meta(ge=1), metavar="N"),
    Option("connections_per_key", "int", "broker", L.CONNECTIONS_PER_KEY, "connections one key may "
           "hold on each broker socket", Meta(ge=1), metavar="N"),
    Option("new_keys_per_minute", "int", "broker", L.NEW_KEYS_PER_MINUTE, "keys new to the broker "
           "admitted per source address and minute, 0 = no limit", Meta(ge=0), metavar="N"),
    Option("stats_interval", "float", "broker", L.STATS_INTERVAL, "seconds between stats events on "
           "sys/, 0 = none", Meta(ge=0), live=True, metavar="SECONDS"),
    Option("log_level", "str", "broker", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL",
           check=_log_level, live=True, metavar="LEVEL"),
    Option("log_json", "bool", "broker", False, "log one JSON object per line", live=True),
    Option("name", "str", "client", None, "your chat name (asked when not given)", check=_name),
    Option("server_key", "str", "client", None, "the broker's public key (hex or z85); found by "
           "itself when the broker runs on this machine with the same config dir", check=_public_key,
           metavar="KEY"),
    Option("broker_key", "str", "client", None, "through a relay: the broker's public key (hex or "
           "z85), which seals your private stream (default: the server key); the relay prints it",
           check=_public_key, metavar="KEY"),
    Option("key", "path", "client", None, "your secret key file (default: one per name, made on "
           "first use in the config dir)", metavar="FILE"),
    Option("timestamp_format", "str", "client", None, "the clock on each line, a strftime format "
           "(default hours:minutes:seconds)", check=_clock_format, metavar="FORMAT"),
    Option("hyperlinks", "bool", "client", True, "make URLs clickable (OSC 8 links) on a terminal "
           "with colours (never with NO_COLOR)"),
    Option("log_dir", "path", "client", None, "write each room and private conversation to a "
           "text file per day in DIR (as irssi's autolog)", metavar="DIR"),
)}

_SHARED = ("config_dir", "host", "port", "pub_port")
BROKER_KEYS = (*_SHARED, "idle_exit", "db", "authorized_keys", "relay_keys", "history_keep", "history_days",
               "rate_burst", "rate_per_second", "client_timeout", "max_peers", "connections_per_key",
               "new_keys_per_minute", "stats_interval", "log_level", "log_json")
CLIENT_KEYS = (*_SHARED, "name", "server_key", "broker_key", "key")
CHAT_KEYS = (*CLIENT_KEYS, "timestamp_format", "hyperlinks", "log_dir")  # the chat's screen only
MONITOR_KEYS = (*_SHARED, "server_key", "broker_key")  # tap, stats, health: their own key, never a user's

# command -> (the file table it reads, the settings it resolves)
COMMANDS: dict[str | None, tuple[str, tuple[str, ...]]] = {
    "broker": ("broker", BROKER_KEYS),
    "history": ("broker", ("config_dir", "db")),
    None: ("client", CHAT_KEYS),  # `zchat` alone
    "client": ("client", CHAT_KEYS),
    "send": ("client", CLIENT_KEYS),
    "tap": ("client", MONITOR_KEYS),
    "stats": ("client", MONITOR_KEYS),
    "health": ("client", MONITOR_KEYS),
}


def flag_help(key: str) -> str:
    """The option's --help text: its help and, when it has one, its default."""
    opt = OPTIONS[key]
    if opt.default is None or opt.kind == "bool":
        return opt.help
    default = f"{opt.default:g}" if opt.kind == "float" else opt.default
    return f"{opt.help} (default {default})"


# --- values: msgspec checks the type and bounds; the words are ours -------------------------


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _short(text: str, limit: int = 60) -> str:
    return json.dumps(text if len(text) <= limit else text[:limit] + "...")


_EXPECTED = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
             "path": "a path (string)"}
_TRUTH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False,
          "off": False}


def _explain(opt: Option, value: Any) -> str:
    """Why msgspec refused `value` for `opt`, said as a person would."""
    try:
        msgspec.convert(value, _BASE[opt.kind])  # strict: "1" is no integer, 1 is no boolean
    except msgspec.ValidationError:
        return f"expected {_EXPECTED[opt.kind]}, got {_describe(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number, got {value!r}"
    if opt.kind == "path":
        return "must not be empty"
    assert opt.bounds is not None and opt.bounds.ge is not None  # the only bounds the table uses
    if opt.bounds.le is not None:
        return f"must be between {opt.bounds.ge:g} and {opt.bounds.le:g}, got {value!r}"
    return f"must be at least {opt.bounds.ge:g}, got {value!r}"


def _finish(opt: Option, value: Any) -> Any:
    """Check what no type says, and normalise a value of the right type and in bounds."""
    problem = opt.check(value) if opt.check else None
    if problem:
        raise _Invalid(problem)
    if opt.key == "log_level":
        return value.upper()
    if opt.kind == "path":
        return Path(value).expanduser()
    return value


def _typed(opt: Option, value: Any) -> Any:
    """A value from a flag (argparse gave it its type) or from env text, checked and normalised."""
    try:
        converted = msgspec.convert(str(value) if isinstance(value, Path) else value, opt.type)
    except msgspec.ValidationError:
        raise _Invalid(_explain(opt, value)) from None
    return _finish(opt, converted)


def _from_env(opt: Option, text: str) -> Any:
    text = text.strip()
    if opt.kind == "bool":
        if text.lower() not in _TRUTH:
            raise _Invalid("expected 1/0, true/false, yes/no or on/off")
        return _TRUTH[text.lower()]
    try:
        value = msgspec.convert(text, _BASE[opt.kind], strict=False)  # "12" -> 12
    except msgspec.ValidationError:
        raise _Invalid(f"expected {_EXPECTED[opt.kind]}") from None
    return _typed(opt, value)


# --- the file ----------------------------------------------------------------------------


def _table(name: str, keys: list[str], **tables: type) -> type:
    """A msgspec struct for one table of the file: these keys, each optional, nothing else."""
    fields = [(key, OPTIONS[key].type | UnsetType, UNSET) for key in keys]
    fields += [(side, struct | UnsetType, UNSET) for side, struct in tables.items()]
    return msgspec.defstruct(name, fields, forbid_unknown_fields=True)


def _keys_of(section: str) -> list[str]:
    return [k for k, o in OPTIONS.items() if o.section in ("", section)]


_FILE = _table("File", _keys_of(""), **{side: _table(side.title(), _keys_of(side)) for side in SIDES})
_ERROR = re.compile(r"(?P<what>.*?)(?: - at `\$\.(?P<path>[^`]*)`)?")
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>.*)`")


def _unknown(table: str, key: str) -> str:
    other = OPTIONS.get(key)
    name = f"{table}.{key}" if table else key
    if other is not None:
        return f"{name}: belongs in the [{other.section}] table"
    candidates = _keys_of(table) if table else [*_keys_of(""), *SIDES]
    close = difflib.get_close_matches(key.replace("-", "_"), candidates, n=1)
    return f"unknown key '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def _file_problem(doc: Mapping[str, Any], error: str) -> str:
    """msgspec's error (which check failed where) as today's one line about that key."""
    match = _ERROR.fullmatch(error)
    path = match["path"].split(".") if match and match["path"] else []
    unknown = _UNKNOWN.fullmatch(match["what"]) if match else None
    if unknown:
        return _unknown(path[0] if path else "", unknown["key"])
    if len(path) == 1 and path[0] in SIDES:
        return f"'{path[0]}' must be a table ([{path[0]}]), got {_describe(doc[path[0]])}"
    if path and path[-1] in OPTIONS and len(path) <= 2:
        raw = doc[path[0]] if len(path) == 1 else doc[path[0]][path[1]]
        return f"{'.'.join(path)}: {_explain(OPTIONS[path[-1]], raw)}"
    return error  # a shape this module does not expect: msgspec's own words


def check_file(doc: Mapping[str, Any], origin: str) -> dict[str, dict[str, Any]]:
    """Every key known, of the right type and in range, wherever it is in the file.

    Returns the checked values by table: "" for the top level, then "broker" and "client".
    """
    where = f"config file {origin}: "
    try:
        parsed = msgspec.convert(doc, _FILE)
    except msgspec.ValidationError as exc:
        raise ConfigError(where + _file_problem(doc, str(exc))) from None
    sides = {side: getattr(parsed, side) for side in SIDES}
    tables = {"": parsed, **{side: struct for side, struct in sides.items() if struct is not UNSET}}
    checked: dict[str, dict[str, Any]] = {side: {} for side in ("", *SIDES)}
    for table, struct in tables.items():
        for key in struct.__struct_fields__:
            value = getattr(struct, key)
            if key in SIDES or value is UNSET:
                continue
            try:
                checked[table][key] = _finish(OPTIONS[key], value)
            except _Invalid as exc:
                raise ConfigError(f"{where}{table + '.' if table else ''}{key}: {exc}") from None
    return checked


def read_file(path: Path, explicit: bool) -> dict[str, Any] | None:
    """The parsed file; None when it does not exist and was not asked for by name."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path}: not found") from None
        return None
    except OSError as exc:
        raise ConfigError(f"config file {path}: cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path}: invalid TOML: not UTF-8 text") from None


# --- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    values: dict[str, Any]
    sources: dict[str, str]  # key -> "flag --port", "env ZCHAT_PORT", "file PATH [broker]", "default"
    file: Path | None = None  # the config file looked for
    file_found: bool = False

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def resolve(flags: Mapping[str, Any], env: Mapping[str, str], file: Mapping[str, Any],
            defaults: Mapping[str, Any], side: str = "broker", origin: str = CONFIG_FILE_NAME) -> Settings:
    """The value and source of every key in `defaults`: flag > env > file > default.

    `flags`: argparse values by key (None = not given); `env`: environment variables; `file`:
    the parsed config file (checked whole, whatever this command reads of it); `side`: the
    file table this command reads ("broker" or "client"); `origin`: the file's name in messages.
    """
    tables = check_file(file, origin)
    table, top = tables[side], tables[""]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in defaults.items():
        opt = OPTIONS[key]
        if flags.get(key) is not None:
            try:
                value = _typed(opt, flags[key])  # argparse already gave it its type
            except _Invalid as exc:
                raise ConfigError(f"{opt.flag}: {exc}") from None
            source = f"flag {opt.flag}"
        elif env.get(opt.env, "").strip():  # set but empty counts as unset
            try:
                value = _from_env(opt, env[opt.env])
            except _Invalid as exc:
                raise ConfigError(f"environment {opt.env}={_short(env[opt.env])}: {exc}") from None
            source = f"env {opt.env}"
        elif key in table or key in top:
            value = table[key] if key in table else top[key]
            source = f"file {origin}" + (f" [{side}]" if key in table else "")
        else:
            value, source = default, "default"
        values[key], sources[key] = value, source
    return Settings(values, sources)


def base_config_dir(env: Mapping[str, str]) -> Path:
    """The config dir when neither --config-dir nor ZCHAT_CONFIG_DIR says otherwise."""
    base = env.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "zchat"


def config_path(flags: Mapping[str, Any], env: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read, and whether it was named explicitly (then it must exist)."""
    if flags.get("config") is not None:
        return Path(flags["config"]).expanduser(), True
    if env.get(CONFIG_ENV, "").strip():
        return Path(env[CONFIG_ENV].strip()).expanduser(), True
    if flags.get("config_dir") is not None:
        directory = Path(flags["config_dir"]).expanduser()
    elif env.get("ZCHAT_CONFIG_DIR", "").strip():
        directory = Path(env["ZCHAT_CONFIG_DIR"].strip()).expanduser()
    else:
        directory = base_config_dir(env)
    return directory / CONFIG_FILE_NAME, False


def defaults_for(keys: tuple[str, ...], env: Mapping[str, str]) -> dict[str, Any]:
    defaults = {key: OPTIONS[key].default for key in keys}
    if "config_dir" in defaults:
        defaults["config_dir"] = base_config_dir(env)
    return defaults


def load(command: str | None, flags: Mapping[str, Any], env: Mapping[str, str] | None = None) -> Settings:
    """Resolve `command`'s settings from its flags, the environment and the config file."""
    env = os.environ if env is None else env
    spec = COMMANDS.get(command)
    if spec is None:
        return Settings({}, {})
    side, keys = spec
    path, explicit = config_path(flags, env)
    doc = read_file(path, explicit)
    settings = resolve(flags, env, doc or {}, defaults_for(keys, env), side=side, origin=str(path))
    return replace(settings, file=path, file_found=doc is not None)


# --- showing them -----------------------------------------------------------------------------


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))


def render(settings: Settings, title: str = "zchat broker") -> str:
    """The effective settings as a config file (valid TOML), each line saying where its value
    came from."""
    v = settings.values
    if settings.file is None:
        state = "none"
    else:
        state = f"{settings.file} ({'read' if settings.file_found else 'not found: defaults used'})"
    lines = [f"# {title}: effective settings (precedence: flag > env > file > default)",
             f"# config file: {state}"]
    derived = {  # what None means, shown as the value it stands for
        "pub_port": lambda: (v["port"] + 1, "port + 1"),
        "db": lambda: (Path(v["config_dir"]) / "broker" / "history.sqlite3", "in the config dir"),
    }
    unset = {"authorized_keys": "open mode", "name": "asked when needed",
             "server_key": "read from the config dir", "key": "one per name in the config dir"}
    notes = {("idle_exit", 0.0): "never", ("stats_interval", 0.0): "no stats events",
             ("rate_per_second", 0.0): "unlimited", ("history_keep", 0): "no limit",
             ("history_days", 0.0): "never", ("new_keys_per_minute", 0): "no limit"}
    width = max((len(k) for k in v), default=0)
    table = ""
    for key in sorted(v, key=lambda k: OPTIONS[k].section != ""):  # shared keys first, then the table
        value, source, note = v[key], settings.sources[key], None
        if OPTIONS[key].section != table:
            table = OPTIONS[key].section
            lines.append(f"[{table}]")
        if value is None and key in derived:
            value, note = derived[key]()
        elif value is None:
            lines.append(f"# {key} is not set: {unset.get(key, 'none')}")
            continue
        else:
            note = notes.get((key, value))
        lines.append(f"{key:<{width}} = {_toml(value):<30} # {source}" + (f" ({note})" if note else ""))
    return "\n".join(lines)


def env_names(keys: tuple[str, ...] = tuple(OPTIONS)) -> list[str]:
    return [OPTIONS[key].env for key in keys]
