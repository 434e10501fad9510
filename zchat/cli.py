"""Command line: `zchat [broker|client|tap] ...`; no subcommand = start chatting."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from zchat import keys
from zchat.endpoints import DEFAULT_HOST, DEFAULT_PORT, Endpoints
from zchat.launcher import AUTOSTART_IDLE_EXIT


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"broker address (default {DEFAULT_HOST}; broker: 0.0.0.0 for all interfaces)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"input (PULL) port (default {DEFAULT_PORT})")
    parser.add_argument("--pub-port", type=int, default=None,
                        help="publish (XPUB) port (default: --port + 1)")
    parser.add_argument("--config-dir", type=Path, default=None,
                        help="keys and broker state (default $ZCHAT_CONFIG_DIR or ~/.config/zchat)")


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", help="your chat name (asked when not given)")
    parser.add_argument("--server-key", help="the broker's public key (hex or z85); found by itself "
                        "when the broker runs on this machine with the same config dir")
    parser.add_argument("--key", type=Path, help="your secret key file (default: one per name, made "
                        "on first use in the config dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zchat", description="Secure command-line chat on ZeroMQ. Without a subcommand: join the "
        "local chat, starting a broker in the background if none is running.")
    _common(parser)
    _client_options(parser)
    parser.add_argument("--idle-exit", type=float, default=AUTOSTART_IDLE_EXIT, metavar="SECONDS",
                        help="a broker started here stops this long after the last user leaves "
                        f"(default {AUTOSTART_IDLE_EXIT:g})")
    sub = parser.add_subparsers(dest="command", metavar="{broker,client,send,tap}")

    broker = sub.add_parser("broker", help="run the broker in the foreground")
    _common(broker)
    broker.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                        help="stop after this long with nobody online")
    broker.add_argument("--stop", action="store_true", help="stop the broker running for this config dir")
    broker.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")

    client = sub.add_parser("client", help="join the chat (terminal UI; plain lines when piped)")
    _common(client)
    _client_options(client)

    send = sub.add_parser("send", help="send one message and exit once the broker accepted it")
    _common(send)
    _client_options(send)
    target = send.add_mutually_exclusive_group()
    target.add_argument("--room", help="the room to send to (default lobby)")
    target.add_argument("--to", metavar="NAME", help="send a private message to NAME instead")
    send.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    send.add_argument("text", nargs="+", help="the message")

    tap = sub.add_parser("tap", help="print every public event as JSON lines")
    _common(tap)
    _client_options(tap)
    tap.add_argument("--heartbeats", action="store_true", help="include broker heartbeats")
    return parser


def _endpoints(args: argparse.Namespace) -> Endpoints:
    return Endpoints(host=args.host, port=args.port, pub_port=args.pub_port)


def _config_dir(args: argparse.Namespace) -> Path:
    return args.config_dir or keys.default_config_dir()


def _server_key(args: argparse.Namespace) -> bytes:
    if args.server_key:
        return keys.parse_public_key(args.server_key)
    path = keys.broker_public_key_path(_config_dir(args))
    if not path.exists():
        raise SystemExit(f"zchat: no broker key at {path}; pass --server-key (the broker prints it "
                         "when it starts)")
    return keys.load_public(path)


def _keypair(args: argparse.Namespace, name: str) -> keys.KeyPair:
    if args.key:
        return keys.load(args.key)
    return keys.load_or_create(keys.client_keys_dir(_config_dir(args)), keys.client_key_file_name(name))


def cmd_broker(args: argparse.Namespace) -> int:
    from zchat.broker import BrokerSettings, serve
    from zchat.launcher import stop_broker

    if args.stop:
        print(stop_broker(_config_dir(args)))
        return 0
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return serve(BrokerSettings(endpoints=_endpoints(args), config_dir=_config_dir(args),
                                idle_exit=args.idle_exit))


def cmd_client(args: argparse.Namespace) -> int:
    from zchat.client import ChatClient, ClientSettings
    from zchat.tui import run_interactive, run_plain

    endpoints = _endpoints(args)
    server_key = _server_key(args)

    def make_client(name: str, on_event):  # type: ignore[no-untyped-def]
        settings = ClientSettings(endpoints=endpoints, server_key=server_key, keypair=_keypair(args, name))
        return ChatClient(settings, on_event)

    if sys.stdin.isatty() and sys.stdout.isatty():
        return run_interactive(make_client, args.name)
    return run_plain(make_client, args.name)


def cmd_send(args: argparse.Namespace) -> int:
    from zchat.client import ChatClient, ClientSettings
    from zchat.send import EXIT_INVALID, run_send

    if not args.name:
        print("zchat send: --name is required", file=sys.stderr)
        return EXIT_INVALID
    endpoints, server_key = _endpoints(args), _server_key(args)
    keypair = _keypair(args, args.name)

    def make_client(rooms, on_event):  # type: ignore[no-untyped-def]
        settings = ClientSettings(endpoints=endpoints, server_key=server_key, keypair=keypair, rooms=rooms)
        return ChatClient(settings, on_event)

    return run_send(make_client, args.name, " ".join(args.text), args.room, args.to, args.timeout)


def cmd_tap(args: argparse.Namespace) -> int:
    from zchat.tap import run_tap

    keypair = _keypair(args, args.name or "tap")
    return run_tap(_endpoints(args), _server_key(args), keypair, heartbeats=args.heartbeats)


def cmd_start(args: argparse.Namespace) -> int:
    from zchat.launcher import ensure_broker

    try:
        note = ensure_broker(_config_dir(args), _endpoints(args), args.idle_exit)
    except RuntimeError as exc:
        print(f"zchat: {exc}", file=sys.stderr)
        return 1
    if note:
        print(note)
    return cmd_client(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"broker": cmd_broker, "client": cmd_client, "send": cmd_send, "tap": cmd_tap}
    try:
        return handlers.get(args.command, cmd_start)(args)
    except ValueError as exc:  # bad key text, unreadable key file
        print(f"zchat: {exc}", file=sys.stderr)
        return 2
