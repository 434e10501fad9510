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
Any invalid value raises ConfigError whose text is one line naming the key and the problem.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from zchat import limits as L
from zchat.endpoints import DEFAULT_HOST, DEFAULT_PORT

CONFIG_FILE_NAME = "zchat.toml"
ENV_PREFIX = "ZCHAT_"
CONFIG_ENV = "ZCHAT_CONFIG"  # the config file itself
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
SIDES = ("broker", "client")


class ConfigError(Exception):
    """An invalid setting; the message is one line naming the key and the problem."""


# --- checks: None when fine, else the problem -----------------------------------------


def _between(low: float, high: float) -> Callable[[Any], str | None]:
    return lambda v: None if low <= v <= high else f"must be between {low:g} and {high:g}, got {v!r}"


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}, got {v!r}"


def _log_level(value: str) -> str | None:
    return None if value.upper() in LOG_LEVELS else f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}"


def _host(value: str) -> str | None:
    return None if value.strip() and not any(c.isspace() for c in value) else f"not a host name: {value!r}"


def _name(value: str) -> str | None:
    from zchat.protocol import valid_name

    return None if valid_name(value) else (f"invalid name {value!r}: 1-{L.MAX_NAME_CHARS} ASCII letters, "
                                           "digits, '.', '-' or '_', starting with a letter or digit")


def _public_key(value: str) -> str | None:
    from zchat.keys import parse_public_key

    try:
        parse_public_key(value)
    except ValueError as exc:
        return str(exc)
    return None


# --- the options ---------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    key: str
    kind: str  # int | float | str | bool | path
    section: str  # "": shared (top level, or a side's table); "broker" / "client": that table only
    default: Any
    help: str
    check: Callable[[Any], str | None] | None = None
    live: bool = False  # the broker applies a change on SIGHUP; otherwise it needs a restart

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.key.upper()

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS: dict[str, Option] = {o.key: o for o in (
    Option("config_dir", "path", "", None, "keys and broker state (default $XDG_CONFIG_HOME/zchat "
           "or ~/.config/zchat)"),
    Option("host", "str", "", DEFAULT_HOST, "broker address; on the broker the interface to bind",
           _host),
    Option("port", "int", "", DEFAULT_PORT, "the broker's input (PULL) port", _between(1, 65535)),
    Option("pub_port", "int", "", None, "the broker's publish (XPUB) port (default port + 1)",
           _between(1, 65535)),
    Option("idle_exit", "float", "broker", 0.0, "stop after this many seconds with nobody online "
           "(0 = never)", _at_least(0), live=True),
    Option("db", "path", "broker", None, "history database (default <config dir>/broker/"
           "history.sqlite3; :memory: keeps none)"),
    Option("authorized_keys", "path", "broker", None, "closed mode: the authorized-keys file "
           "(its contents are re-read on SIGHUP)"),
    Option("history_keep", "int", "broker", L.HISTORY_KEEP_PER_ROOM, "events kept per room "
           "(0 = no limit)", _at_least(0), live=True),
    Option("history_days", "float", "broker", L.HISTORY_KEEP_DAYS, "drop events older than this "
           "(0 = never)", _at_least(0), live=True),
    Option("rate_burst", "int", "broker", L.RATE_BURST, "messages a sender may send at once",
           _at_least(1), live=True),
    Option("rate_per_second", "float", "broker", L.RATE_PER_SECOND, "sustained messages per second "
           "per sender (0 = unlimited)", _at_least(0), live=True),
    Option("client_timeout", "float", "broker", L.CLIENT_TIMEOUT, "seconds of silence after which a "
           "client is announced as left", _at_least(0.5), live=True),
    Option("max_peers", "int", "broker", L.MAX_PEERS, "keys the broker tracks at once (members "
           "first: keys that have not joined make room)", _at_least(1)),
    Option("connections_per_key", "int", "broker", L.CONNECTIONS_PER_KEY, "connections one key may "
           "hold on each broker socket", _at_least(1)),
    Option("new_keys_per_minute", "int", "broker", L.NEW_KEYS_PER_MINUTE, "keys new to the broker "
           "admitted per source address and minute (0 = no limit)", _at_least(0)),
    Option("stats_interval", "float", "broker", L.STATS_INTERVAL, "seconds between stats events on "
           "sys/ (0 = none)", _at_least(0), live=True),
    Option("log_level", "str", "broker", "INFO", "DEBUG, INFO, WARNING, ERROR or CRITICAL",
           _log_level, live=True),
    Option("log_json", "bool", "broker", False, "log one JSON object per line", live=True),
    Option("name", "str", "client", None, "your chat name", _name),
    Option("server_key", "str", "client", None, "the broker's public key (hex or z85)", _public_key),
    Option("key", "path", "client", None, "your secret key file"),
)}

_SHARED = ("config_dir", "host", "port", "pub_port")
BROKER_KEYS = (*_SHARED, "idle_exit", "db", "authorized_keys", "history_keep", "history_days",
               "rate_burst", "rate_per_second", "client_timeout", "max_peers", "connections_per_key",
               "new_keys_per_minute", "stats_interval", "log_level", "log_json")
CLIENT_KEYS = (*_SHARED, "name", "server_key", "key")
MONITOR_KEYS = (*_SHARED, "server_key")  # tap, stats, health: their own key, never a user's

# command -> (the file table it reads, the settings it resolves)
COMMANDS: dict[str | None, tuple[str, tuple[str, ...]]] = {
    "broker": ("broker", BROKER_KEYS),
    "history": ("broker", ("config_dir", "db")),
    None: ("client", CLIENT_KEYS),  # `zchat` alone
    "client": ("client", CLIENT_KEYS),
    "send": ("client", CLIENT_KEYS),
    "tap": ("client", MONITOR_KEYS),
    "stats": ("client", MONITOR_KEYS),
    "health": ("client", MONITOR_KEYS),
}


# --- conversions -----------------------------------------------------------------------


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


def _finish(opt: Option, value: Any) -> tuple[Any, str | None]:
    """Range-check and normalise a value of the right type."""
    if opt.kind == "float" and not math.isfinite(value):
        return value, f"must be a finite number, got {value!r}"
    if opt.kind == "path" and str(value) == "":
        return value, "must not be empty"
    problem = opt.check(value) if opt.check else None
    if problem is None and opt.key == "log_level":
        value = value.upper()
    if opt.kind == "float":
        value = float(value)
    if opt.kind == "path":
        value = Path(value).expanduser()
    return value, problem


def _from_file(opt: Option, raw: Any) -> tuple[Any, str | None]:
    ok = {"int": type(raw) is int, "float": type(raw) in (int, float), "str": type(raw) is str,
          "bool": type(raw) is bool, "path": type(raw) is str}[opt.kind]
    if not ok:
        return raw, f"expected {_EXPECTED[opt.kind]}, got {_describe(raw)}"
    return _finish(opt, raw)


def _from_env(opt: Option, text: str) -> tuple[Any, str | None]:
    value: Any = text.strip()
    try:
        if opt.kind == "int":
            value = int(value)
        elif opt.kind == "float":
            value = float(value)
        elif opt.kind == "bool":
            truth = {"1": True, "true": True, "yes": True, "on": True,
                     "0": False, "false": False, "no": False, "off": False}
            value = truth[value.lower()]
    except (ValueError, KeyError):
        expected = "1/0, true/false, yes/no or on/off" if opt.kind == "bool" else _EXPECTED[opt.kind]
        return text, f"expected {expected}"
    return _finish(opt, value)


def _from_flag(opt: Option, value: Any) -> tuple[Any, str | None]:
    return _finish(opt, value)  # argparse already gave it its type


# --- the file ----------------------------------------------------------------------------


def _unknown(where: str, key: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key.replace("-", "_"), candidates, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return ConfigError(f"{where}unknown key '{key}'{hint}")


def check_file(doc: Mapping[str, Any], origin: str) -> None:
    """Every key known, of the right type and in range, wherever it is in the file."""
    where = f"config file {origin}: "
    shared = [k for k, o in OPTIONS.items() if o.section == ""]
    for key, raw in doc.items():
        if key in SIDES:
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}'{key}' must be a table ([{key}]), got {_describe(raw)}")
            allowed = [k for k, o in OPTIONS.items() if o.section in ("", key)]
            for sub, value in raw.items():
                if sub not in allowed:
                    other = OPTIONS.get(sub)
                    if other is not None:
                        raise ConfigError(f"{where}{key}.{sub}: belongs in the [{other.section}] table")
                    raise _unknown(where, f"{key}.{sub}", allowed)
                _, problem = _from_file(OPTIONS[sub], value)
                if problem:
                    raise ConfigError(f"{where}{key}.{sub}: {problem}")
            continue
        opt = OPTIONS.get(key)
        if opt is None:
            raise _unknown(where, key, [*shared, *SIDES])
        if opt.section != "":
            raise ConfigError(f"{where}{key}: belongs in the [{opt.section}] table")
        _, problem = _from_file(opt, raw)
        if problem:
            raise ConfigError(f"{where}{key}: {problem}")


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
    check_file(file, origin)
    table = file.get(side, {})
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, default in defaults.items():
        opt = OPTIONS[key]
        if flags.get(key) is not None:
            value, problem = _from_flag(opt, flags[key])
            if problem:
                raise ConfigError(f"{opt.flag}: {problem}")
            source = f"flag {opt.flag}"
        elif env.get(opt.env, "").strip():  # set but empty counts as unset
            value, problem = _from_env(opt, env[opt.env])
            if problem:
                raise ConfigError(f"environment {opt.env}={_short(env[opt.env])}: {problem}")
            source = f"env {opt.env}"
        elif key in table or (opt.section == "" and key in file):
            value, _ = _from_file(opt, table[key] if key in table else file[key])  # checked above
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
