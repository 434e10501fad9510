"""Command line: `zchat [broker|client|tap] ...`; no subcommand = start chatting."""

from __future__ import annotations

import argparse
import math
import os
import socket
import sqlite3
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, TypeVar

from zchat import config, keys
from zchat import limits as L
from zchat.core import Limits
from zchat.endpoints import DEFAULT_HOST, DEFAULT_PORT, Endpoints
from zchat.history import Retention, StoredEvent
from zchat.launcher import AUTOSTART_IDLE_EXIT
from zchat.protocol import DEFAULT_ROOM

T = TypeVar("T")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (a timeout)."""
    return _duration(text, zero_ok=False)


def _seconds_or_zero(text: str) -> float:
    return _duration(text, zero_ok=True)


def _duration(text: str, zero_ok: bool) -> float:
    value = _number(text)
    if value < 0 or (value == 0 and not zero_ok):
        least = "0 or more" if zero_ok else "more than 0"
        raise argparse.ArgumentTypeError(f"must be {least} seconds, got {text!r}")
    return value


def _number(text: str) -> float:
    value = _converted(text, float, "a number")
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number of at least 1."""
    value = _converted(text, int, "a whole number")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _converted(text: str, kind: Callable[[str], T], what: str) -> T:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def _setting(parser: argparse.ArgumentParser, key: str) -> None:
    """The flag of a setting, its help and type from zchat.config.OPTIONS (written once, there).
    It defaults to None: zchat.config fills it in from env, file and defaults."""
    opt = config.OPTIONS[key]
    if opt.kind == "bool":
        parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction, default=None,
                            help=config.flag_help(key))
        return
    kinds: dict[str, type] = {"int": int, "float": float, "str": str, "path": Path}
    parser.add_argument(opt.flag, type=kinds[opt.kind], default=None, metavar=opt.metavar,
                        help=config.flag_help(key))


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help="settings file (default $ZCHAT_CONFIG, else <config dir>/zchat.toml)")
    for key in ("host", "port", "pub_port", "config_dir"):
        _setting(parser, key)


def _client_options(parser: argparse.ArgumentParser) -> None:
    for key in ("name", "server_key", "broker_key", "key"):
        _setting(parser, key)


def _chat_options(parser: argparse.ArgumentParser) -> None:
    """What the chat's screen looks like, and its logs (`zchat` and `zchat client`)."""
    for key in ("timestamp_format", "hyperlinks", "log_dir"):
        _setting(parser, key)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="zchat", description="Secure command-line chat on ZeroMQ. Without a subcommand: join the "
        "local chat, starting a broker in the background if none is running.")
    _common(parser)
    _client_options(parser)
    _chat_options(parser)
    parser.add_argument("--idle-exit", type=_seconds_or_zero, default=AUTOSTART_IDLE_EXIT, metavar="SECONDS",
                        help="a broker started here stops this long after the last user leaves "
                        f"(default {AUTOSTART_IDLE_EXIT:g})")
    sub = parser.add_subparsers(dest="command",
                                metavar="{broker,relay,client,send,tap,history,keygen,stats,health}")

    broker = sub.add_parser("broker", help="run the broker in the foreground")
    _common(broker)
    broker.add_argument("--stop", action="store_true", help="stop the broker running for this config dir")
    broker.add_argument("--print-config", action="store_true",
                        help="print the effective settings and where each came from, then exit")
    for key in config.BROKER_KEYS:
        if config.OPTIONS[key].section == "broker":  # _common added the shared ones
            _setting(broker, key)

    relay = sub.add_parser("relay", help="run a relay: clients connect to it as to a broker; it "
                           "forwards to the broker (or another relay) upstream")
    relay.add_argument("--upstream", required=True, metavar="HOST[:PORT]",
                       help="the broker's (or upstream relay's) address and input port (default port "
                       f"{DEFAULT_PORT}); its publish port is PORT + 1 unless --upstream-pub-port")
    relay.add_argument("--upstream-pub-port", type=int, default=None, metavar="PORT")
    relay.add_argument("--server-key", required=True, metavar="KEY",
                       help="the upstream's public key (hex or z85), as its banner prints it")
    relay.add_argument("--broker-key", default=None, metavar="KEY",
                       help="the broker's public key, for the client command line printed (clients "
                       "open their sealed private streams with it; default: --server-key)")
    relay.add_argument("--host", default=DEFAULT_HOST, help="interface to bind (default %(default)s)")
    relay.add_argument("--port", type=int, default=DEFAULT_PORT + 10, help="input (PULL) port "
                       "(default %(default)s)")
    relay.add_argument("--pub-port", type=int, default=None, help="publish (XPUB) port (default port + 1)")
    relay.add_argument("--config-dir", type=Path, default=None, metavar="DIR",
                       help="the relay's key pair lives in DIR/relay (default: the usual config dir)")
    relay.add_argument("--authorized-keys", type=Path, default=None, metavar="FILE",
                       help="closed mode: only keys in FILE may connect (same format as the broker's)")
    relay.add_argument("--relay-keys", type=Path, default=None, metavar="FILE",
                       help="keys of downstream relays whose marks are kept (chaining; default "
                       "DIR/relay/relay-keys if present)")
    relay.add_argument("--log-level", default="INFO", metavar="LEVEL")

    keygen = sub.add_parser("keygen", help="make a key pair and print the line for an operator's "
                            "authorized-keys file")
    keygen.add_argument("--config-dir", type=Path, default=None, help="where client keys live")
    keygen.add_argument("--name", help="the chat name the key is for (default: your login name)")
    keygen.add_argument("--output", type=Path, metavar="PATH",
                        help="write the secret key file at PATH and the public key at PATH.pub, "
                        "for use with --key PATH (default: the key zchat uses for NAME in the config dir)")

    history = sub.add_parser("history", help="search and export the stored public history and the "
                             "private messages kept for offline users (sealed); with --host, --port or "
                             "--pub-port: a room's history, asked of that broker with your key")
    _setting(history, "config_dir")
    history.add_argument("--config", type=Path, default=None, metavar="FILE", help="settings file")
    _setting(history, "db")
    for key in ("host", "port", "pub_port", "server_key", "name"):
        _setting(history, key)
    history.add_argument("--timeout", type=_seconds, default=10.0, metavar="SECONDS",
                         help="with --host/--port: how long to wait for each answer (default 10)")
    history.add_argument("--room", help="only this room (required with --host/--port)")
    history.add_argument("--since", help="only events since a date (2026-11-26, '2026-11-26 14:00') "
                         "or an age (90m, 2h, 7d)")
    history.add_argument("--grep", metavar="TEXT", help="only events whose text or name contains TEXT")
    history.add_argument("--limit", type=_count, default=None, metavar="N", help="only the newest N events")
    history.add_argument("--json", action="store_true", help="one JSON object per line")
    history.add_argument("--key", type=Path, metavar="FILE",
                         help="a recipient's secret key file: open the kept private messages sealed to "
                         "that key (all others show as '(private, sealed)'); with --host/--port: the "
                         "key to ask with (default: the key kept for --name, else your login name)")

    client = sub.add_parser("client", help="join the chat (terminal UI; plain lines when piped)")
    _common(client)
    _client_options(client)
    _chat_options(client)
    client.add_argument("--history", type=int, default=None, metavar="N",
                        choices=range(L.MAX_HISTORY_PER_REQUEST + 1),
                        help=f"events of each room's history shown on joining (default {L.DEFAULT_HISTORY} "
                        "on a terminal; 0 when piped, where your own arrival is not shown either)")

    send = sub.add_parser("send", help="send one message and exit once the broker accepted it")
    _common(send)
    _client_options(send)
    target = send.add_mutually_exclusive_group()
    target.add_argument("--room", help=f"the room to send to (default {DEFAULT_ROOM})")
    target.add_argument("--to", metavar="NAME", help="send a private message to NAME instead")
    send.add_argument("--timeout", type=_seconds, default=10.0, help="seconds to wait (default 10)")
    send.add_argument("--create", action="store_true",
                      help="send to the room even if it does not exist yet (nobody in it, nothing said)")
    send.add_argument("--split", action="store_true",
                      help=f"send a text over {L.MAX_TEXT_CHARS} characters as several messages, "
                      "cut at spaces")
    send.add_argument("text", nargs="+", help="the message")

    tap = sub.add_parser("tap", help="log every public event (JSON lines or text), gaps backfilled or "
                         "recorded, with size or time rotation")
    _common(tap)
    tap.add_argument("--name", help="use the key kept for this name (default: tap); a tap never joins")
    _setting(tap, "server_key")
    _setting(tap, "broker_key")
    tap.add_argument("--key", type=Path, help="secret key file to use instead")
    tap.add_argument("--format", default="jsonl", metavar="jsonl|text|TEMPLATE",
                     help="jsonl: one JSON object per event (default); text: [date time] #room name: text; "
                     "or a template naming the JSON record's fields, like "
                     "'{time:%%H:%%M:%%S} {room} <{name}> {text}' (time: a datetime from ts; "
                     "a field a record lacks renders empty)")
    tap.add_argument("--room", action="append", metavar="ROOM",
                     help="subscribe to this room only (repeatable; default: every room)")
    tap.add_argument("--type", metavar="TYPE,...",
                     help="keep only these record types: the JSON type values (message, action, joined "
                     "or join, left or leave, renamed, gap, epoch, ...)")
    tap.add_argument("--resume", action="store_true",
                     help="continue the jsonl FILE of --output: fetch from the broker's history what was "
                     "published after the last seq of each room in it, then go on live")
    tap.add_argument("--since", metavar="TIME",
                     help="first replay the stored events from TIME (a date like 2026-11-26, '2026-11-26 "
                     "14:00' or 2026-11-26T14:00, or an age like 10m, 2h, 7d), then go on live")
    tap.add_argument("-C", "--count", type=_count, metavar="N", help="exit after N events")
    tap.add_argument("-W", "--seconds", type=_seconds, metavar="SECONDS", help="exit after SECONDS")
    tap.add_argument("--output", "-o", type=Path, metavar="FILE", help="append to FILE (default stdout)")
    tap.add_argument("--mode", metavar="OCTAL", help="permission bits of FILE and the rotated files "
                     "(default 600: only you can read the log)")
    rotation = tap.add_mutually_exclusive_group()
    rotation.add_argument("--rotate-bytes", type=int, metavar="N",
                          help="rotate FILE when it would exceed N bytes")
    rotation.add_argument("--rotate-when", metavar="WHEN",
                          help="rotate FILE by time: S, M, H, D, W0-W6 or midnight")
    tap.add_argument("--backups", type=int, default=5, metavar="K",
                     help="rotated files to keep (default 5; with --rotate-when, 0 keeps all)")
    tap.add_argument("--heartbeats", action="store_true", help="include broker heartbeats and stats")

    stats = sub.add_parser("stats", help="show the broker's live statistics (from sys/)")
    _common(stats)
    _monitor_options(stats)
    stats.add_argument("--watch", action="store_true", help="keep printing each stats event")
    stats.add_argument("--json", action="store_true", help="print the stats events as JSON lines")
    stats.add_argument("--timeout", type=_seconds, default=15.0, metavar="SECONDS",
                       help="give up when no stats arrive within this long (default 15)")

    health = sub.add_parser("health", help="exit 0 when the broker answers, else non-zero with the reason")
    _common(health)
    _monitor_options(health)
    health.add_argument("--timeout", type=_seconds, default=5.0, metavar="SECONDS",
                        help="how long to wait for the broker (default 5)")
    return parser


def _monitor_options(parser: argparse.ArgumentParser) -> None:
    _setting(parser, "server_key")
    parser.add_argument("--key", type=Path, help="secret key file to use (default: a 'monitor' key made in "
                        "the config dir)")


def _endpoints(args: argparse.Namespace) -> Endpoints:
    """The broker's endpoints (the first of --host a,b); a host name that does not resolve is
    an error here, at once (ZeroMQ would keep retrying it silently)."""
    return _endpoint_list(args)[0]


def _endpoint_list(args: argparse.Namespace) -> list[Endpoints]:
    """Every endpoint of `--host a,b,...`: each HOST, HOST:PORT or HOST:PORT:PUB_PORT (an IPv6
    address with ports in brackets, [::1]:PORT); --port and --pub-port are the defaults."""
    found = []
    for entry in str(args.host).split(","):
        host, port, pub_port = entry, args.port, args.pub_port
        rest = ""
        if entry.startswith("[") and "]" in entry:
            host, rest = entry[1:].split("]", 1)
        elif 1 <= entry.count(":") <= 2 and entry.split(":", 1)[0]:
            host, rest = entry.split(":", 1)
            rest = ":" + rest
        if rest:
            numbers = rest.lstrip(":").split(":")
            if not all(n.isdigit() for n in numbers) or len(numbers) > 2:
                raise ValueError(f"--host {entry!r}: expected HOST[:PORT[:PUB_PORT]]")
            port = int(numbers[0])
            pub_port = int(numbers[1]) if len(numbers) == 2 else (pub_port if port == args.port else None)
        try:
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            raise ValueError(f"--host {host!r}: no such host ({getattr(exc, 'strerror', None) or exc})") \
                from None
        found.append(Endpoints(host=host, port=port, pub_port=pub_port))
    return found


def _alternates(args: argparse.Namespace, server_key: bytes) -> list[tuple[Endpoints, bytes]]:
    """The endpoints after the first of --host a,b, each with its key (the --server-key list's
    entry at the same place, else its last one)."""
    endpoints = _endpoint_list(args)[1:]
    keys_given = [keys.parse_public_key(k) for k in args.server_key.split(",")] if args.server_key \
        else [server_key]
    return [(ep, keys_given[min(i + 1, len(keys_given) - 1)]) for i, ep in enumerate(endpoints)]


def _config_dir(args: argparse.Namespace) -> Path:
    return args.config_dir or keys.default_config_dir()


def _server_key(args: argparse.Namespace) -> bytes:
    if args.server_key:
        return keys.parse_public_key(args.server_key.split(",")[0])
    path = keys.broker_public_key_path(_config_dir(args))
    if not path.exists():
        raise SystemExit(f"zchat: no broker key at {path}; pass --server-key (the broker prints it "
                         "when it starts)")
    return keys.load_public(path)


def _broker_key(args: argparse.Namespace) -> bytes | None:
    """The broker's key when it differs from the server key (connected through a relay)."""
    text = getattr(args, "broker_key", None)
    return keys.parse_public_key(text) if text else None


def _keypair(args: argparse.Namespace, name: str) -> keys.KeyPair:
    if args.key:
        return keys.load(args.key)
    directory = keys.client_keys_dir(_config_dir(args))
    try:
        return keys.load_or_create(directory, keys.client_key_file_name(name))
    except OSError as exc:
        raise ValueError(f"cannot make a key for {name!r} in {directory}: {exc.strerror}") from None


def cmd_broker(args: argparse.Namespace) -> int:
    from zchat.broker import BrokerSettings, serve
    from zchat.launcher import stop_broker

    if args.stop:
        print(stop_broker(_config_dir(args)))
        return 0
    if args.print_config:
        print(config.render(args.settings))
        return 0
    from zchat import logsetup

    def settings_from(resolved: config.Settings) -> BrokerSettings:
        v = resolved.values
        unlimited = v["rate_per_second"] <= 0
        limits = Limits(rate_burst=10**9 if unlimited else v["rate_burst"],
                        rate_per_second=1e9 if unlimited else v["rate_per_second"],
                        client_timeout=v["client_timeout"], max_peers=v["max_peers"])
        return BrokerSettings(
            endpoints=Endpoints(host=v["host"], port=v["port"], pub_port=v["pub_port"]),
            config_dir=v["config_dir"], idle_exit=v["idle_exit"] or None, limits=limits, db_path=v["db"],
            authorized_keys=v["authorized_keys"],
            relay_keys=v["relay_keys"],
            retention=Retention(per_room=v["history_keep"], days=v["history_days"]),
            stats_interval=v["stats_interval"], log_level=v["log_level"], log_json=v["log_json"],
            connections_per_key=v["connections_per_key"], new_keys_per_minute=v["new_keys_per_minute"],
            config=dict(v))

    settings = settings_from(args.settings)
    settings.reload = lambda: settings_from(config.load("broker", args.flags))  # SIGHUP
    logsetup.configure(settings.log_level, settings.log_json)
    return serve(settings)


def parse_since(text: str, now: float) -> float:
    """An absolute local date/time, an age like 90m, 2h, 7d, or @SECONDS since the epoch."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text.startswith("@") and text[1:].replace(".", "", 1).isdigit():
        return float(text[1:])
    if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
        return now - float(text[:-1]) * units[text[-1]]
    for layout in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text, layout))
        except ValueError:
            continue
    raise ValueError(f"--since {text!r}: use a date like 2026-11-26 or '2026-11-26 14:00', or an age like 2h")


def cmd_relay(args: argparse.Namespace) -> int:
    from zchat import logsetup
    from zchat.relay import RelaySettings, serve

    single_colon = args.upstream.count(":") == 1  # host:port (an IPv6 address alone has more)
    host, _, port = args.upstream.rpartition(":") if single_colon else (args.upstream, "", "")
    if port and not port.isdigit():
        raise ValueError(f"--upstream {args.upstream!r}: expected HOST[:PORT]")
    upstream = Endpoints(host=host or args.upstream, port=int(port) if port else DEFAULT_PORT,
                         pub_port=args.upstream_pub_port)
    try:  # ZeroMQ would retry a name that does not resolve silently, for ever
        socket.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"--upstream {upstream.host!r}: no such host "
                         f"({getattr(exc, 'strerror', None) or exc})") from None
    settings = RelaySettings(
        upstream=upstream, server_key=keys.parse_public_key(args.server_key),
        broker_key=keys.parse_public_key(args.broker_key or args.server_key),
        endpoints=Endpoints(host=args.host, port=args.port, pub_port=args.pub_port),
        config_dir=args.config_dir or keys.default_config_dir(), authorized_keys=args.authorized_keys,
        relay_keys=args.relay_keys, log_level=args.log_level)
    logsetup.configure(settings.log_level)
    return serve(settings)


def cmd_keygen(args: argparse.Namespace) -> int:
    import getpass

    from zchat.protocol import valid_name

    name = args.name or getpass.getuser()
    if not valid_name(name):
        raise ValueError(f"invalid name {name!r}: ASCII letters, digits, '.', '-' or '_'")
    if args.output is not None:
        path = args.output.expanduser()
        public_path = path.with_name(path.name + ".pub")
        for existing in (path, public_path):
            if existing.exists() or existing.is_symlink():
                raise ValueError(f"{existing} exists; not overwriting a key")
        try:
            keypair = keys.create(path, public_path)
        except OSError as exc:
            raise ValueError(f"cannot write {exc.filename}: {exc.strerror}") from None
        print(f"{name} {keypair.identity}")
        print(f"# secret key: {path} (keep it private; use it with --key {path}); public key: "
              f"{public_path}", file=sys.stderr)
        return 0
    directory, stem = keys.client_keys_dir(_config_dir(args)), keys.client_key_file_name(name)
    try:
        keypair = keys.load_or_create(directory, stem)
    except OSError as exc:
        raise ValueError(f"cannot make a key in {directory}: {exc.strerror}") from None
    path = directory / f"{stem}.key_secret"
    print(f"{name} {keypair.identity}")
    print(f"# secret key: {path} (keep it private; zchat uses it for --name {name})", file=sys.stderr)
    return 0


def _open_kept_mail(rows: list[StoredEvent], key_file: Path | None,
                    grep: str | None) -> list[tuple[StoredEvent, dict | None]]:
    """Kept private messages as (row, event): opened when sealed to `key_file`'s key, else
    left sealed; with `grep`, those whose names (or opened text) contain it."""
    import json

    from zmq.utils import z85

    from zchat.e2e import Keyring, OpenError

    keyring = Keyring(z85.decode(keys.load(key_file).secret)) if key_file else None
    mine = f"u/{keyring.identity}/" if keyring else None
    shown: list[tuple[StoredEvent, dict | None]] = []
    for row in rows:
        event = json.loads(row.body)
        if keyring is not None and row.topic == mine:
            try:
                event["text"] = keyring.open_from(str(event.get("from", "")), str(event.get("box", "")))
            except OpenError:
                pass
        words = f"{event.get('name', '')} {event.get('to', '')} {event.get('text', '')}".lower()
        if not grep or grep.lower() in words:
            shown.append((row, event))
    return shown


REMOTE_FLAGS = ("host", "port", "pub_port")  # given any of these, `history` asks that broker


def cmd_remote_history(args: argparse.Namespace) -> int:
    """A room's history from the broker at --host/--port, as the user's own key may read it."""
    import getpass
    import json

    from zchat.protocol import normalize_room
    from zchat.remote_history import HistoryPager, NoAnswer, fetch_history
    from zchat.tap import text_line

    for key, value in config.load("send", args.flags).values.items():  # the client's settings
        setattr(args, key, value)
    if not args.room:
        print("zchat history: --room is required with --host/--port (a broker lists only the "
              "rooms people are in, not those with history)", file=sys.stderr)
        return 2
    room = normalize_room(args.room)
    if room is None:
        raise ValueError(f"invalid room {args.room!r}")
    endpoints = _endpoints(args)
    since = parse_since(args.since, time.time()) if args.since else None
    pager = HistoryPager(room, limit=args.limit, since=since, grep=args.grep)
    try:
        bodies = fetch_history(endpoints, _server_key(args), _keypair(args, args.name or getpass.getuser()),
                               pager, args.timeout)
    except NoAnswer as exc:
        print(f"zchat history: {exc}", file=sys.stderr)
        return exc.code
    if not pager.found_any:  # a typo must not look like an empty room
        print(f"zchat history: no history of #{room} at {endpoints.input} (no such room?)", file=sys.stderr)
        return 1
    topic = f"r/{room}/"
    for body in bodies:
        if args.json:  # the tap's jsonl shape: the event's own fields with its topic first
            sys.stdout.write('{"topic":"' + topic + '",' + body.decode()[1:] + "\n")
        else:
            sys.stdout.write(text_line(topic, json.loads(body)) + "\n")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    import json

    if any(args.flags.get(key) is not None for key in REMOTE_FLAGS):
        return cmd_remote_history(args)
    from zchat.history import kept_mail, search, stored_rooms
    from zchat.protocol import normalize_room
    from zchat.tap import text_line

    db = args.db or keys.broker_dir(_config_dir(args)) / "history.sqlite3"
    if not db.exists():
        print(f"zchat history: no history database at {db}", file=sys.stderr)
        return 1
    if args.key is not None and not args.key.is_file():
        print(f"zchat history: no key file at {args.key}", file=sys.stderr)
        return 1
    room = None
    if args.room:
        room = normalize_room(args.room)
        if room is None:
            raise ValueError(f"invalid room {args.room!r}")
        try:
            known = stored_rooms(db)
        except sqlite3.Error as exc:
            print(f"zchat history: cannot read the history database {db}: {exc}", file=sys.stderr)
            return 1
        if room not in known:  # a typo must not look like an empty room
            listing = ", ".join(f"#{name}" for name in known) or "none yet"
            print(f"zchat history: no room #{room} in the history (rooms: {listing})", file=sys.stderr)
            return 1
    since = parse_since(args.since, time.time()) if args.since else None
    try:
        listed: list[tuple[StoredEvent, dict | None]] = [
            (row, None) for row in search(db, room=room, since=since, grep=args.grep, limit=args.limit)]
        if room is None:  # private messages kept for offline users belong to no room
            mail = _open_kept_mail(kept_mail(db, since=since, limit=None if args.grep else args.limit),
                                   args.key, args.grep)
            listed = sorted(listed + mail, key=lambda item: item[0].ts)
            if args.limit is not None:
                listed = listed[-args.limit:] if args.limit > 0 else []
        for row, opened in listed:
            if args.json:
                # The tap's jsonl shape: the event's own fields with its topic first.
                body = row.body.decode() if opened is None else json.dumps(opened, separators=(",", ":"))
                sys.stdout.write('{"topic":"' + row.topic + '",' + body[1:] + "\n")
            else:
                event = json.loads(row.body) if opened is None else opened
                sys.stdout.write(text_line(row.topic, event) + "\n")  # as the tap writes it
    except sqlite3.Error as exc:
        print(f"zchat history: cannot read the history database {db}: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from zchat.client import ChatClient, ClientSettings
    from zchat.render import DEFAULT_CLOCK
    from zchat.tui import Look, run_interactive, run_plain

    endpoints = _endpoints(args)
    server_key = _server_key(args)

    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    history = getattr(args, "history", None)  # absent for the bare `zchat` start
    if history is None:
        history = L.DEFAULT_HISTORY if interactive else 0

    def make_client(name: str, on_event):  # type: ignore[no-untyped-def]
        keypair = _keypair(args, name)
        # /ignore's list belongs to the key it was made with (a config dir may hold several).
        ignore_file = _config_dir(args) / "ignored" / keypair.identity
        settings = ClientSettings(endpoints=endpoints, server_key=server_key, keypair=keypair,
                                  history=history, ignore_file=ignore_file, broker_key=_broker_key(args),
                                  alternates=_alternates(args, server_key))
        return ChatClient(settings, on_event)

    look = Look(clock_format=getattr(args, "timestamp_format", None) or DEFAULT_CLOCK,
                hyperlinks=getattr(args, "hyperlinks", True) is not False,
                log_dir=getattr(args, "log_dir", None))
    if interactive:
        return run_interactive(make_client, args.name, look)
    return run_plain(make_client, args.name, look=look)


def cmd_send(args: argparse.Namespace) -> int:
    from zchat.client import ChatClient, ClientSettings
    from zchat.send import EXIT_INVALID, run_send

    if not args.name:
        print("zchat send: --name is required", file=sys.stderr)
        return EXIT_INVALID
    endpoints, server_key = _endpoints(args), _server_key(args)
    keypair = _keypair(args, args.name)

    def make_client(rooms, on_event):  # type: ignore[no-untyped-def]
        settings = ClientSettings(endpoints=endpoints, server_key=server_key, keypair=keypair, rooms=rooms,
                                  broker_key=_broker_key(args))
        return ChatClient(settings, on_event)

    return run_send(make_client, args.name, " ".join(args.text), args.room, args.to, args.timeout,
                    split=args.split, create=args.create)


def cmd_tap(args: argparse.Namespace) -> int:
    from zchat.tap import (
        ReaderGone,
        TapLog,
        make_handler,
        parse_file_mode,
        parse_types,
        resume_points,
        room_topics,
        run_tap,
    )

    file_mode = parse_file_mode(args.mode) if args.mode is not None else None
    types = parse_types(args.type) if args.type is not None else None
    topics = room_topics(args.room)  # an invalid name: one line, before connecting
    resume = None
    if args.resume:
        if args.output is None or args.format != "jsonl":
            raise ValueError("--resume needs --output FILE in the jsonl format (it reads FILE's last seqs)")
        resume = resume_points(args.output, topics)
    if args.since is not None and args.resume:
        raise ValueError("--since and --resume cannot go together: --resume starts where FILE ends")
    since = parse_since(args.since.removeprefix("-"), time.time()) if args.since is not None else None
    TapLog(None, args.format)  # an unknown format or template field: said now, before connecting
    endpoints, server_key = _endpoints(args), _server_key(args)
    keypair = _keypair(args, args.name or "tap")
    try:
        handler = make_handler(args.output, args.rotate_bytes, args.rotate_when, args.backups, file_mode)
    except OSError as exc:
        print(f"zchat tap: cannot write {args.output}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        out = TapLog(handler, args.format, types=types, count=args.count)
        heartbeats = args.heartbeats or bool(types and types & {"heartbeat", "stats"})
        return run_tap(endpoints, server_key, keypair, out, heartbeats=heartbeats, rooms=args.room,
                       broker_key=_broker_key(args),
                       seconds=args.seconds, resume=resume, since=since)
    except ReaderGone:  # `zchat tap | head -3`
        _silence_stdout()
        return 0


def _monitor_keypair(args: argparse.Namespace) -> keys.KeyPair:
    """--key, else the config dir's 'monitor' key (made on first use), else a throwaway one."""
    if args.key:
        return keys.load(args.key)
    try:
        return keys.load_or_create(keys.client_keys_dir(_config_dir(args)), "monitor")
    except OSError:  # a read-only config dir: any key does in open mode
        import zmq

        public, secret = zmq.curve_keypair()
        return keys.KeyPair(public, secret)


def cmd_stats(args: argparse.Namespace) -> int:
    from zchat.stats import run_stats

    return run_stats(_endpoints(args), _server_key(args), _monitor_keypair(args), watch=args.watch,
                     as_json=args.json, timeout=args.timeout)


def cmd_health(args: argparse.Namespace) -> int:
    from zchat.stats import run_health

    return run_health(_endpoints(args), _server_key(args), _monitor_keypair(args), timeout=args.timeout)


def cmd_start(args: argparse.Namespace) -> int:
    from zchat.launcher import ensure_broker

    if args.config is not None:  # a broker started in the background reads the same file
        os.environ[config.CONFIG_ENV] = str(args.config)
    try:
        note = ensure_broker(_config_dir(args), _endpoints(args), args.idle_exit)
    except RuntimeError as exc:
        print(f"zchat: {exc}", file=sys.stderr)
        return 1
    if note:
        print(note)
    return cmd_client(args)


def _settings(args: argparse.Namespace) -> None:
    """Resolve the command's settings (flag > env > file > default) into `args`."""
    args.flags = {key: value for key, value in vars(args).items() if value is not None}
    args.settings = config.load(args.command, args.flags)
    for key, value in args.settings.values.items():
        setattr(args, key, value)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "relay":  # its own flags only (no settings file)
        try:
            return cmd_relay(args)
        except ValueError as exc:
            print(f"zchat: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"zchat: {exc}", file=sys.stderr)
            return 1
    handlers = {"broker": cmd_broker, "client": cmd_client, "send": cmd_send, "tap": cmd_tap,
                "history": cmd_history, "keygen": cmd_keygen, "stats": cmd_stats, "health": cmd_health}
    try:
        _settings(args)
    except config.ConfigError as exc:
        if not getattr(args, "stop", False):  # `broker --stop` still works with a broken file
            print(f"zchat: {exc}", file=sys.stderr)
            return 2
    try:
        if getattr(args, "key", None):  # a bad --key file: one line, before anything else
            keys.load(args.key)
        return handlers.get(args.command, cmd_start)(args)
    except (ValueError, config.ConfigError) as exc:  # a bad key or setting, a host that does not resolve
        print(f"zchat: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `zchat history | head`: the reader has all it wanted
        _silence_stdout()
        return 0
    except OSError as exc:  # a file or directory named on the command line that cannot be used
        print(f"zchat: {exc}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered
    for a reader that went away does not print a second error on the way out."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
