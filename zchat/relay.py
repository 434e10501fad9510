"""The relay: a process clients connect to exactly as to a broker, which forwards to a broker
(or to another relay) upstream. ZeroMQ's extended pub/sub (a tree of proxies), with zchat's
security kept (docs/PROTOCOL.md "Relays"):

- downstream it binds the same two CURVE server sockets as a broker (PULL, XPUB manual) with
  its own key pair and its own ZAP (open mode, or closed mode with an authorized-keys file;
  banned keys refused);
- each frame a client sends goes upstream on a PUSH, marked with the client's identity
  (zchat.relaying); the body is never decoded;
- subscriptions are policed as on the broker (zchat.core.topic_allowed) and installed
  downstream first, then the relay subscribes upstream (XSUB) to the union of what its clients
  need and reports each client's subscription (mark S), so the broker completes a join only
  when the path to the client is live;
- publications are copied from upstream to downstream without decoding;
- a client's connection closing is reported upstream (mark X), within the broker's bounds.

One thread, one poll loop, like the broker.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from zchat import keys, logsetup
from zchat import limits as L
from zchat.accounts import Account
from zchat.admission import LogFold, remember_until
from zchat.auth import (
    DATA_SENDER,
    NOT_AUTHORIZED,
    PUBLISH_ZAP_DOMAIN,
    ZAP_DOMAIN,
    ZAP_ENDPOINT,
    KeyFileError,
    Refusal,
    load_authorized_keys,
    zap_reply,
)
from zchat.broker import (
    DATA_SENDER_REFUSAL,
    DATA_SENDERS_KEPT,
    BrokerError,
    read_bans,
    read_relay_keys,
    user_id,
)
from zchat.connections import Connections, remember_fd, shutdown_fd
from zchat.core import topic_allowed
from zchat.endpoints import Endpoints
from zchat.relaying import (
    ALL_UNSUBSCRIBED,
    BAN,
    CUT,
    GONE,
    MESSAGE,
    SUBSCRIBED,
    UNSUBSCRIBED,
    MarkError,
    Subscriptions,
    control_topic,
    cut_notice,
    mark,
    mark_prefix,
    parse_control,
    parse_mark,
)
from zchat.transport import curve_client

log = logging.getLogger("zchat.relay")

RELAY_KEY_NAME = "relay"
DRAIN_BATCH = 5000  # frames taken from one socket before looking at the others
KEEPALIVE = 0.5  # seconds between the relay's own keep-alives upstream
TICK = 0.25  # seconds between housekeeping passes
CLOSE_GRACE = 0.05  # seconds between a client's input connection closing and its "gone" report
PARKED_PER_RELAY = 10_000  # a downstream relay's reports waiting for its own subscription
MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
KEEPALIVE_BODY = b"relay keep-alive"  # unmarked: the relay's own frame, never decoded


def relay_dir(config_dir: Path) -> Path:
    return config_dir / "relay"


UPSTREAM_CUT_SOON = 2.0  # an upstream connection closed this soon after its handshake was cut on purpose
UPSTREAM_LOG_EVERY = 10.0  # "connected upstream" at most once in this long

@dataclass
class RelaySettings:
    upstream: Endpoints  # the broker's (or another relay's) input and publish ports
    server_key: bytes  # upstream's public key, z85
    broker_key: bytes | None = None  # the broker's (it seals private streams), for the banner
    endpoints: Endpoints = field(default_factory=Endpoints)  # where clients connect
    config_dir: Path = field(default_factory=keys.default_config_dir)
    authorized_keys: Path | None = None  # closed mode: only these keys (role relay: may mark)
    relay_keys: Path | None = None  # downstream relays (chaining); default <config>/relay/relay-keys
    client_timeout: float = L.CLIENT_TIMEOUT  # connections that never send a frame are cut after it
    log_level: str = "INFO"


class Relay:
    def __init__(self, settings: RelaySettings) -> None:
        self.settings = settings
        directory = relay_dir(settings.config_dir)
        self.keypair = keys.load_or_create(directory, RELAY_KEY_NAME)
        self.identity = self.keypair.identity
        self.accounts: dict[str, Account] | None = None
        if settings.authorized_keys is not None:
            try:
                self.accounts = load_authorized_keys(settings.authorized_keys)
            except KeyFileError as exc:
                raise BrokerError(str(exc)) from None
        self.relays = read_relay_keys(settings.relay_keys or directory / "relay-keys")
        if self.accounts is not None:
            self.relays |= {i for i, account in self.accounts.items() if account.role == "relay"}
        self.banned = read_bans(directory / "banned-keys")
        self.ctx = zmq.Context()
        self.subs = Subscriptions()
        self.inputs, self.outputs = Connections(), Connections()
        self.prefixes: dict[str, bytes] = {}  # client -> its mark (M), made once
        self.origin: dict[str, str] = {}  # client of a downstream relay -> that relay
        self.parked: dict[str, dict[str, list[bytes]]] = {}  # downstream relay -> topic -> S marks
        self._closing: dict[tuple[str, int], float] = {}
        self._cuts: list[tuple[float, str]] = []
        self._data_senders: dict[str, float] = {}
        self._xpub_shifted = False
        self._stopping = False
        self.up_frames = self.down_frames = self.dropped_up = 0
        self._fold = LogFold(60.0)  # a hostile peer must not fill the log
        self._up_since = 0.0  # when the upstream handshake last succeeded (monotonic)
        self._up_logged = 0.0  # when that was last logged: a relay cut over and over logs once in a while

    # --- start-up ------------------------------------------------------------

    def bind(self) -> None:
        ctx, ep, up = self.ctx, self.settings.endpoints, self.settings.upstream
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)
        self.pull = self._curve_server(zmq.PULL, ZAP_DOMAIN)
        self.pull.rcvhwm = L.PULL_RCVHWM
        self.pull.maxmsgsize = L.MAX_FRAME_BYTES
        self.xpub = self._curve_server(zmq.XPUB, PUBLISH_ZAP_DOMAIN)
        self.xpub.sndhwm = L.XPUB_SNDHWM
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.xpub.heartbeat_ivl = L.ZMQ_HEARTBEAT_IVL_MS
        self.xpub.heartbeat_timeout = L.ZMQ_HEARTBEAT_TIMEOUT_MS
        self.monitor = self.pull.get_monitor_socket(MONITOR_EVENTS)
        self.xpub_monitor = self.xpub.get_monitor_socket(MONITOR_EVENTS)
        for sock, endpoint in ((self.pull, ep.input), (self.xpub, ep.publish)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                raise BrokerError(f"cannot bind {endpoint}: {exc.strerror}") from None
        # Upstream: a CURVE client with the relay's own key, like any client of the broker.
        self.push = curve_client(ctx, zmq.PUSH, up, self.settings.server_key, self.keypair)
        self.push.sndhwm = L.PULL_RCVHWM * 10
        self.xsub = curve_client(ctx, zmq.XSUB, up, self.settings.server_key, self.keypair)
        self.xsub.rcvhwm = L.XPUB_SNDHWM
        self.up_monitor = self.push.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_DISCONNECTED)
        self.xsub.connect(up.publish)
        self.push.connect(up.input)
        self.xsub.send(b"\x01" + control_topic(self.identity).encode())

    def _curve_server(self, kind: int, domain: bytes) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.zap_domain = domain  # before bind, or it is ignored
        sock.handshake_ivl = L.HANDSHAKE_IVL_MS
        sock.backlog = L.LISTEN_BACKLOG
        if self.settings.endpoints.ipv6:
            sock.ipv6 = True
        return sock

    def banner(self) -> str:
        ep, up = self.settings.endpoints, self.settings.upstream
        host = socket.gethostname() if ep.host in ("0.0.0.0", "::", "*") else ep.host
        port_args = f"--port {ep.port}"
        if ep.pub_port is not None and ep.pub_port != ep.port + 1:
            port_args += f" --pub-port {ep.pub_port}"
        return "\n".join([
            "Relay started, waiting for clients...",
            f"  input   (PULL) {ep.input}",
            f"  publish (XPUB) {ep.publish}",
            f"  upstream {up.input} / {up.publish}",
            f"  relay public key {self.identity}",
            f"  clients: zchat client --host {host} {port_args} --server-key {self.identity} "
            f"--broker-key {keys.identity_of(self.settings.broker_key or self.settings.server_key)}",
            "  (the upstream broker must list this key as a relay: relay-keys file or role relay)",
        ])

    # --- admission and policy ----------------------------------------------------------

    def _admit(self, identity: str, domain: bytes, address: str) -> Refusal | None:
        if identity in self.banned or (self.accounts is not None and identity not in self.accounts):
            return NOT_AUTHORIZED
        if self._data_senders.get(identity, 0.0) > time.monotonic():
            return DATA_SENDER
        return None

    def _role(self, identity: str) -> str:
        if identity in self.relays:
            return "relay"
        account = self.accounts.get(identity) if self.accounts is not None else None
        return account.role if account is not None else "user"

    def _allowed(self, identity: str, topic: str) -> bool:
        """The broker's policy (zchat.core.topic_allowed); a downstream relay also gets its own
        control topic."""
        if identity in self.relays:
            return topic == control_topic(identity) or topic_allowed(identity, topic, True, "relay")
        return topic_allowed(identity, topic, self.accounts is not None, self._role(identity))

    def _once(self, what: str, *args: object) -> None:
        """Log a line at most once a minute per kind; the repeats are counted and said then."""
        if self._fold.first(what, time.monotonic()):
            log.warning(what, *args)

    # --- the loop --------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def run(self) -> int:
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        poller = zmq.Poller()
        for sock in (self.zap, self.xpub, self.pull, self.xsub, self.monitor, self.xpub_monitor,
                     self.up_monitor):
            poller.register(sock, zmq.POLLIN)
        poller.register(wake_r.fileno(), zmq.POLLIN)
        next_tick = next_keepalive = 0.0
        try:
            while not self._stopping:
                ready = dict(poller.poll(TICK * 1000))
                now = time.monotonic()
                if self.monitor in ready or self.pull in ready or self.zap in ready:
                    self._drain_monitor(self.monitor, self.inputs, now)
                if self.xpub_monitor in ready or self.xpub in ready or self.zap in ready:
                    self._drain_monitor(self.xpub_monitor, self.outputs, now)
                if self.zap in ready:
                    self._serve_zap()
                if self.xpub in ready:
                    self._drain_subscriptions()
                if self.pull in ready:
                    self._drain_messages()
                if self.xsub in ready:
                    self._drain_upstream()
                if self.up_monitor in ready:
                    self._upstream_connected()
                if wake_r.fileno() in ready:
                    try:
                        wake_r.recv(512)
                    except BlockingIOError:
                        pass
                if self._closing:
                    self._announce_closed(now)
                if now >= next_keepalive:
                    next_keepalive = now + KEEPALIVE
                    self._up(KEEPALIVE_BODY)
                if now >= next_tick:
                    next_tick = now + TICK
                    self._housekeeping(now)
            return 0
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            self.close()

    def _serve_zap(self) -> None:
        while True:
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(zap_reply(request, self._admit))

    def _up(self, data: bytes) -> None:
        """Send one frame upstream; dropped (and counted) when upstream is away and the queue full."""
        try:
            self.push.send(data, zmq.NOBLOCK)
            self.up_frames += 1
        except zmq.Again:
            self.dropped_up += 1

    # --- clients -> upstream -----------------------------------------------------------

    def _drain_messages(self) -> None:
        recv, inputs, relays, prefixes, up = self.pull.recv, self.inputs, self.relays, self.prefixes, self._up
        for _ in range(DRAIN_BATCH):
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            identity = user_id(frame)
            if identity is None:
                continue
            if inputs.unattributed or not inputs.knows(identity):
                remember_fd(inputs, frame, identity)
            if frame.more:  # one frame per message: the rest is read and dropped
                part = frame
                while part.more:
                    part = recv(copy=False)
                self._once("dropped a multipart message from %s", identity[:12])
                continue
            body = frame.bytes
            if body and body[0] == 0:
                if identity in relays:
                    self._from_relay(identity, body)
                else:
                    self._once("key %s, not a relay, sent a marked frame: cut", identity[:12])
                    self._cut(identity)
                continue
            if identity in relays:
                continue  # a downstream relay's keep-alive
            prefix = prefixes.get(identity)
            if prefix is None:
                prefix = prefixes[identity] = mark_prefix(MESSAGE, identity)
            up(prefix + body)

    def _from_relay(self, relay: str, data: bytes) -> None:
        """A downstream relay's marked frame: kept as it is (not marked again). Its reports of
        subscriptions wait until its own subscription to the topic is installed here."""
        try:
            marked = parse_mark(data)
            client, kind = marked.identity, marked.kind
            if kind in (MESSAGE, SUBSCRIBED):
                self.origin[client] = relay
            if kind == SUBSCRIBED:
                topic = bytes(marked.payload).decode()
                if not self.subs.has(relay, topic):
                    waiting = self.parked.setdefault(relay, {})
                    if sum(map(len, waiting.values())) < PARKED_PER_RELAY:
                        waiting.setdefault(topic, []).append(data)
                    return
        except (MarkError, UnicodeDecodeError) as exc:
            self._once("relay %s sent a bad mark: %s", relay[:12], exc)
            return
        self._up(data)

    # --- subscriptions -------------------------------------------------------------

    def _drain_subscriptions(self) -> None:
        xpub = self.xpub
        for _ in range(DRAIN_BATCH):
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                self._xpub_shifted = False
                return
            data = frame.bytes
            identity = user_id(frame)
            if len(data) < 1 or data[0] not in (0, 1):
                self._xpub_shifted = True  # see zchat.broker: approvals could land on another pipe
                if identity is not None:
                    remember_fd(self.outputs, frame, identity)
                    self._data_sender(identity)
                continue
            if identity is None:
                continue  # unsubscribes of a closing connection: handled at DISCONNECTED
            try:
                topic = data[1:].decode()
            except UnicodeDecodeError:
                continue
            if data[0] == 1:
                remember_fd(self.outputs, frame, identity)
                if self._xpub_shifted or not self._allowed(identity, topic):
                    continue
                xpub.setsockopt(zmq.SUBSCRIBE, data[1:])  # downstream first...
                self._subscribed(identity, topic)  # ...then upstream
            else:
                if not self._xpub_shifted:
                    xpub.setsockopt(zmq.UNSUBSCRIBE, data[1:])
                if self.subs.remove(identity, topic):
                    self.xsub.send(b"\x00" + topic.encode())
                if identity not in self.relays:
                    self._up(mark(UNSUBSCRIBED, identity, topic.encode()))

    def _subscribed(self, identity: str, topic: str) -> None:
        if identity in self.relays and topic == control_topic(identity):
            return  # ours to publish, not upstream's
        if self.subs.add(identity, topic):
            self.xsub.send(b"\x01" + topic.encode())
        if identity in self.relays:
            for data in self.parked.get(identity, {}).pop(topic, []):
                self._up(data)
        else:
            self._up(mark(SUBSCRIBED, identity, topic.encode()))

    def _upstream_connected(self) -> None:
        """A new upstream connection (its first, or after a broker restart): the XSUB resends
        our subscriptions by itself; the clients' reports are sent again here. A refusal, or a
        connection closed right after its handshake (the broker does not list this relay's key
        yet: it cuts it at its first frame), is said in the log."""
        connected = False
        now = time.monotonic()
        while True:
            try:
                event = recv_monitor_message(self.up_monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = event["event"]
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                self._once("the upstream refused this relay's key (status %s)", event["value"])
            elif kind == zmq.EVENT_DISCONNECTED:
                if now - self._up_since < UPSTREAM_CUT_SOON:
                    self._once("the upstream closes this relay's connection right after the handshake: is "
                               "its key listed there as a relay (the relay-keys file, or the role relay in "
                               "closed mode, then SIGHUP)?")
            else:
                connected = True
        if not connected:
            return
        self._up_since = now
        if now - self._up_logged >= UPSTREAM_LOG_EVERY:
            self._up_logged = now
            log.info("connected upstream: reporting %d subscriber(s) again", len(self.subs.topics_of))
        for subscriber, topics in self.subs.topics_of.items():
            if subscriber in self.relays:
                continue  # a downstream relay reports its own clients
            for topic in topics:
                self._up(mark(SUBSCRIBED, subscriber, topic.encode()))

    # --- upstream -> clients -----------------------------------------------------------

    def _drain_upstream(self) -> None:
        recv, send = self.xsub.recv, self.xpub.send
        count = 0
        for count in range(1, DRAIN_BATCH + 1):  # noqa: B007
            try:
                data = recv(zmq.NOBLOCK)
            except zmq.Again:
                count -= 1
                break
            if not data or data[0] == 0:  # our control topic (an empty frame: dropped there)
                self._control(data)
                continue
            send(data)
        self.down_frames += count

    def _control(self, data: bytes) -> None:
        """A publication on our control topic: `cut <id>` (kicked, banned...)."""
        found = parse_control(data)
        if found is None or found[0] not in (CUT, BAN):
            return
        command, client = found
        if command == BAN:  # refused here from now on (in memory: the broker keeps the list)
            self.banned.add(client)
            for relay in self.relays:
                self.xpub.send(cut_notice(relay, client, BAN))
        relay = self.origin.get(client)
        if relay is not None:
            self.xpub.send(cut_notice(relay, client))  # the relay it came through cuts it
        else:
            self._cut(client)

    # --- connections ---------------------------------------------------------------

    def _drain_monitor(self, monitor: zmq.Socket, connections: Connections, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_ACCEPTED:
                connections.accepted(event["value"], now)
                continue
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            identity = connections.closed(event["value"])
            if identity is None:
                continue
            if connections is self.inputs:
                self._closing[(identity, event["value"])] = now + CLOSE_GRACE
            elif not self.outputs.knows(identity):
                self._outputs_closed(identity)

    def _outputs_closed(self, identity: str) -> None:
        """Its subscriber connection closed: its topics are no longer wanted by it."""
        for topic in self.subs.remove_all(identity):
            self.xsub.send(b"\x00" + topic.encode())
        if identity in self.relays:
            self.parked.pop(identity, None)
        else:
            self._up(mark(ALL_UNSUBSCRIBED, identity))

    def _announce_closed(self, now: float) -> None:
        for key, due in list(self._closing.items()):
            if due > now:
                continue
            del self._closing[key]
            identity = key[0]
            if self.inputs.knows(identity):
                continue  # it has another connection
            self.prefixes.pop(identity, None)
            if identity in self.relays:
                clients = [c for c, by in self.origin.items() if by == identity]
                log.info("downstream relay %s gone: %d client(s) through it", identity[:12], len(clients))
                for client in clients:
                    del self.origin[client]
                    self._up(mark(GONE, client))
            else:
                self._up(mark(GONE, identity))

    def _cut(self, identity: str) -> None:
        self._cuts.append((time.monotonic(), identity))

    def _data_sender(self, identity: str) -> None:
        now = time.monotonic()
        if self._data_senders.get(identity, 0.0) <= now:
            log.warning("cut key %s: it sent data frames on its subscriber connection", identity[:12])
        remember_until(self._data_senders, identity, now + DATA_SENDER_REFUSAL, now, DATA_SENDERS_KEPT)
        self._cut(identity)

    def _housekeeping(self, now: float) -> None:
        while self._cuts and self._cuts[0][0] <= now:
            _, identity = self._cuts.pop(0)
            count = self.inputs.cut(identity) + self.outputs.cut(identity)
            log.info("cut %d connection(s) of %s", count, identity[:12])
        # Connections that never sent a frame (a raw TCP or CURVE peer holding a descriptor).
        for connections in (self.inputs, self.outputs):
            for fd in connections.silent(now - self.settings.client_timeout):
                connections.closed(fd)
                shutdown_fd(fd)
        for what, repeats in self._fold.due(now):
            log.warning("... and %d more like it (%s) in the last %g s", repeats, what, self._fold.interval)

    def close(self) -> None:
        for sock in (getattr(self, name, None) for name in ("pull", "xpub", "push")):
            if sock is not None:
                sock.disable_monitor()
        for sock in (getattr(self, name, None) for name in (
                "monitor", "xpub_monitor", "up_monitor", "zap", "pull", "xpub", "push", "xsub")):
            if sock is not None:
                sock.close(0)
        self.ctx.term()


def serve(settings: RelaySettings) -> int:
    logsetup.configure(settings.log_level)
    try:
        relay = Relay(settings)
        relay.bind()
    except BrokerError as exc:
        print(f"zchat relay: {exc}", file=sys.stderr)
        return 1
    print(relay.banner(), flush=True)
    log.info("relay started: pid %d, key %s, upstream %s, %s mode, %d downstream relay key(s)",
             os.getpid(), relay.identity, settings.upstream.input,
             "open" if settings.authorized_keys is None else "closed", len(relay.relays))
    code = relay.run()
    log.info("relay stopped (exit %d): %d frames up, %d down, %d dropped upstream", code,
             relay.up_frames, relay.down_frames, relay.dropped_up)
    return code
