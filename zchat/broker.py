"""The broker shell: sockets, ZAP, monitor, signals and the poll loop.

One thread, one poll loop. All chat state lives in `BrokerCore`; this module
only moves bytes between ZeroMQ and the core, reads the clock once per loop
turn, and installs the subscriptions the core approves (XPUB_MANUAL).
"""

from __future__ import annotations

import fcntl
import gc
import json
import logging
import os
import secrets
import signal
import socket
import sqlite3
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from zchat import keys, logsetup
from zchat import limits as L
from zchat.auth import ZAP_DOMAIN, ZAP_ENDPOINT, KeyFileError, load_authorized_keys, zap_reply
from zchat.connections import Connections
from zchat.core import BrokerCore, Limits, Out
from zchat.dispatch import Dispatcher
from zchat.endpoints import Endpoints
from zchat.history import HistoryStore, Retention
from zchat.protocol import SYSTEM_TOPIC, Stats

log = logging.getLogger("zchat.broker")

DRAIN_BATCH = 5000  # messages taken from one socket before looking at the others
STATE_FILE = "broker.json"
LOCK_FILE = "broker.lock"  # flock-ed by the running broker for its whole life
PRUNE_INTERVAL = 60.0  # seconds between retention passes
CLOSE_GRACE = 0.05  # seconds between an input connection closing and its leave notice
CUT_GRACE = 0.3  # seconds between telling someone they are removed and cutting them off
STATS_MIN_GAP = 1.0  # a new sys/ subscriber gets stats this soon, but no more often than this


@dataclass
class BrokerSettings:
    endpoints: Endpoints = field(default_factory=Endpoints)
    config_dir: Path = field(default_factory=keys.default_config_dir)
    idle_exit: float | None = None  # stop after this long with nobody online
    limits: Limits = field(default_factory=Limits)
    db_path: Path | None = None  # default: <config>/broker/history.sqlite3; ":memory:" keeps nothing
    retention: Retention = field(default_factory=Retention)
    authorized_keys: Path | None = None  # closed mode: only these keys, with fixed names and roles
    stats_interval: float = L.STATS_INTERVAL  # seconds between stats events on sys/; 0 = none
    log_level: str = "INFO"
    log_json: bool = False
    # The settings as the operator wrote them (zchat.config keys): what a reload compares.
    config: dict = field(default_factory=dict)
    # SIGHUP: settings read afresh (raises zchat.config.ConfigError when they are invalid).
    reload: Callable[[], BrokerSettings] | None = None


class BrokerError(Exception):
    """A start-up problem with a one-line explanation for the operator."""


def user_id(frame: zmq.Frame) -> str | None:
    try:
        return frame.get("User-Id")
    except zmq.ZMQError:  # no ZAP identity (e.g. unsubscribes on disconnect)
        return None


def read_bans(path: Path) -> set[str]:
    try:
        return {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
    except OSError:
        return set()


def state_path(config_dir: Path) -> Path:
    return keys.broker_dir(config_dir) / STATE_FILE


def read_state(config_dir: Path) -> dict | None:
    """The running broker's pid and endpoints, if its state file is current."""
    try:
        state = json.loads(state_path(config_dir).read_text())
        os.kill(int(state["pid"]), 0)
        return state
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Broker:
    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        self.keypair = keys.load_or_create(keys.broker_dir(settings.config_dir), keys.BROKER_KEY_NAME)
        self.epoch = secrets.token_hex(8)
        db_path = settings.db_path or keys.broker_dir(settings.config_dir) / "history.sqlite3"
        try:
            self.store = HistoryStore(db_path, settings.retention)
        except sqlite3.Error as exc:
            raise BrokerError(f"cannot open the history database {db_path}: {exc}") from None
        accounts = None
        if settings.authorized_keys is not None:
            try:
                accounts = load_authorized_keys(settings.authorized_keys)
            except KeyFileError as exc:
                raise BrokerError(str(exc)) from None
        self.bans_path = keys.broker_dir(settings.config_dir) / "banned-keys"
        self.core = BrokerCore(self.epoch, time.time(), settings.limits, stored_seq=self.store.last_seq,
                               known_names=self.store.known_names(), accounts=accounts,
                               banned=read_bans(self.bans_path))
        self.ctx = zmq.Context()
        self._stopping = False
        self._reload_requested = False
        # Input (PULL) and output (XPUB) connections apart: presence follows the input one.
        self.inputs, self.outputs = Connections(), Connections()
        self._pending_cuts: list[tuple[float, str]] = []
        # Input connections seen closing, (identity, fd) -> when to announce the leave. The
        # monitor can report a close before the main loop has read the connection's last
        # frames (a /quit's leave message): those are read first, and do not count as a
        # new connection of that identity.
        self._closing: dict[tuple[str, int], float] = {}
        self._sockets_open = False
        self._lock_file: int | None = None
        # Statistics: totals here, in the core and in the dispatcher; rates since the last event.
        self.started = time.time()
        self.frames_in = 0
        self._stats_at = self.started
        self._stats_last = (0, 0, 0)  # frames_in, messages, published at _stats_at
        self._next_stats = self.started + (settings.stats_interval or L.STATS_INTERVAL)

    # --- start-up ------------------------------------------------------------

    def bind(self) -> None:
        """ZAP first, then the two CURVE server sockets (zap_domain before bind)."""
        self._lock_config_dir()
        ctx = self.ctx
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)
        self.pull = self._curve_server(zmq.PULL)
        self.pull.rcvhwm = L.PULL_RCVHWM
        self.pull.maxmsgsize = L.MAX_FRAME_BYTES
        self.xpub = self._curve_server(zmq.XPUB)
        self.xpub.sndhwm = L.XPUB_SNDHWM
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.monitor = self.pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.xpub_monitor = self.xpub.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.dispatch = Dispatcher(self.core, self.store, self.xpub.send, self._cut, self._ban)
        self._sockets_open = True
        ep = self.settings.endpoints
        for sock, endpoint in ((self.pull, ep.input), (self.xpub, ep.publish)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                hint = " (is another broker running?)" if exc.errno == zmq.EADDRINUSE else ""
                raise BrokerError(f"cannot bind {endpoint}: {exc.strerror}{hint}") from None
        self._write_state()

    def _lock_config_dir(self) -> None:
        """Hold the broker lock: `zchat broker --stop` signals only a broker that holds it, and
        two brokers never share one config dir (its keys, state file and history)."""
        path = keys.broker_dir(self.settings.config_dir) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            other = read_state(self.settings.config_dir)
            who = f" (pid {other['pid']})" if other else ""
            self.close()
            raise BrokerError(f"another broker{who} is running with config dir {self.settings.config_dir}; "
                              "stop it (zchat broker --stop) or use another --config-dir") from None
        self._lock_file = fd

    def _curve_server(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        sock.zap_domain = ZAP_DOMAIN  # must precede bind, or it is ignored
        sock.handshake_ivl = L.HANDSHAKE_IVL_MS
        sock.backlog = L.LISTEN_BACKLOG  # a crowd joining at once must not overflow the accept queue
        if kind == zmq.XPUB:
            # ZMTP heartbeats close dead subscribers' pipes. Not on PULL: there libzmq 4.3.5 can
            # abort (stream_engine_base.cpp:310 !_io_error) when a flooding sender goes away,
            # and presence comes from application pings and the socket monitor anyway.
            sock.heartbeat_ivl = L.ZMQ_HEARTBEAT_IVL_MS
            sock.heartbeat_timeout = L.ZMQ_HEARTBEAT_TIMEOUT_MS
        if self.settings.endpoints.ipv6:
            sock.ipv6 = True
        return sock

    def _write_state(self) -> None:
        ep = self.settings.endpoints
        state = {"pid": os.getpid(), "input": ep.input, "publish": ep.publish,
                 "host": ep.host, "port": ep.port, "pub_port": ep.publish_port,
                 "public_key": self.keypair.public.decode(), "epoch": self.epoch}
        path = state_path(self.settings.config_dir)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def banner(self) -> str:
        ep = self.settings.endpoints
        key_hex = self.keypair.identity
        host = ep.host
        if host in ("0.0.0.0", "::", "*"):
            host = socket.gethostname()
        port_args = f"--port {ep.port}"
        if ep.pub_port is not None and ep.pub_port != ep.port + 1:
            port_args += f" --pub-port {ep.pub_port}"
        lines = [
            "Server started, waiting for clients...",
            f"  input   (PULL) {ep.input}",
            f"  publish (XPUB) {ep.publish}",
            f"  broker public key {key_hex}",
            "  clients on this machine find the key by themselves: zchat client",
            f"  clients on other machines: zchat client --host {host} {port_args} --server-key {key_hex}",
        ]
        if ep.host in ("127.0.0.1", "::1", "localhost"):
            lines.append("  (bound to loopback only; use --host 0.0.0.0 to accept other machines)")
        return "\n".join(lines)

    # --- the loop --------------------------------------------------------------

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def request_reload(self, *_: object) -> None:
        self._reload_requested = True

    def reload(self, now: float) -> None:
        """SIGHUP: re-read the authorized-keys file without dropping anyone still listed."""
        self._reload_settings(now)
        path = self.settings.authorized_keys
        if path is None:
            log.info("SIGHUP: open mode, no authorized-keys file to re-read")
            return
        try:
            accounts = load_authorized_keys(path)
        except KeyFileError as exc:
            log.error("SIGHUP: keeping the current keys: %s", exc)
            return
        log.info("SIGHUP: %d authorized keys (was %d)", len(accounts), len(self.core.accounts or {}))
        self._publish(self.core.set_accounts(accounts, now))

    def _admit(self, identity: str) -> bool:
        accounts = self.core.accounts
        if identity in self.core.banned or (accounts is not None and identity not in accounts):
            log.info("refused key %s at the handshake", identity[:12])
            return False
        return True

    def _cut(self, identity: str) -> None:
        # A moment's grace so the notice telling them why leaves the queue first.
        self._pending_cuts.append((time.monotonic() + CUT_GRACE, identity))

    def _run_cuts(self) -> None:
        now = time.monotonic()
        while self._pending_cuts and self._pending_cuts[0][0] <= now:
            _, identity = self._pending_cuts.pop(0)
            count = self.inputs.cut(identity) + self.outputs.cut(identity)
            log.info("cut %d connection(s) of %s", count, identity[:12])

    def _ban(self, identity: str) -> None:
        # Called mid-flush: a full disk or an unwritable directory must not stop the broker.
        # The ban holds in memory either way; only its survival across a restart is lost.
        try:
            with open(self.bans_path, "a") as bans:
                bans.write(identity + "\n")
        except OSError as exc:
            log.error("cannot record the ban of %s in %s: %s; it holds until the broker stops",
                      identity[:12], self.bans_path, exc.strerror or exc)

    def run(self) -> int:
        """Serve until a signal, --idle-exit or request_stop; returns the exit code."""
        gc.freeze()  # start-up objects never need collecting: keep them out of every GC pass
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.request_reload)
        poller = zmq.Poller()
        for sock in (self.zap, self.xpub, self.pull, self.monitor, self.xpub_monitor):
            poller.register(sock, zmq.POLLIN)
        poller.register(wake_r.fileno(), zmq.POLLIN)
        idle_since = time.time()
        next_tick = 0.0
        next_prune = time.time() + PRUNE_INTERVAL
        try:
            while not self._stopping:
                wake_at = min(next_tick, *self._closing.values()) if self._closing else next_tick
                timeout_ms = max(0.0, wake_at - time.time()) * 1000
                ready = dict(poller.poll(timeout_ms))
                now = time.time()
                if self.zap in ready:
                    self._serve_zap()
                # Disconnects first: a closed connection's descriptor may already serve a new
                # connection whose frames are waiting; its old events must not apply to them.
                if self.monitor in ready:
                    self._drain_monitor(self.monitor, self.inputs, now)
                if self.xpub_monitor in ready:
                    self._drain_monitor(self.xpub_monitor, self.outputs, now)
                if self.xpub in ready:
                    self._drain_subscriptions(now)
                if self.pull in ready:
                    self._drain_messages(now)
                if self._closing:
                    self._announce_closed_inputs(now)
                if self._reload_requested:
                    self._reload_requested = False
                    self.reload(now)
                if wake_r.fileno() in ready:
                    try:
                        wake_r.recv(512)
                    except BlockingIOError:
                        pass
                if now >= next_tick:
                    next_tick = now + L.TICK_INTERVAL
                    self._publish(self.core.tick(now))
                    if self._pending_cuts:
                        self._run_cuts()
                    if self.core.online:
                        idle_since = now
                    elif self.settings.idle_exit is not None and now - idle_since >= self.settings.idle_exit:
                        log.info("nobody online for %.0f s: stopping", self.settings.idle_exit)
                        break
                if now >= self._next_stats:
                    self._stats(now)
                self.dispatch.flush(now)
                if now >= next_prune:
                    next_prune = now + PRUNE_INTERVAL
                    dropped = self.store.retain(now)
                    if dropped:
                        log.info("retention: dropped %d old events", dropped)
            self._publish(self.core.shutdown(time.time(), "the broker is shutting down"))
            self.dispatch.flush(time.time())
            return 0
        finally:
            signal.set_wakeup_fd(old_fd)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            wake_r.close()
            wake_w.close()
            self.close(linger_ms=500)

    def _serve_zap(self) -> None:
        while True:
            try:
                request = self.zap.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.zap.send_multipart(zap_reply(request, self._admit))

    def _drain_subscriptions(self, now: float) -> None:
        xpub, core = self.xpub, self.core
        for _ in range(DRAIN_BATCH):
            try:
                frame = xpub.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            data = frame.bytes
            if len(data) < 1 or data[0] not in (0, 1):
                continue
            identity = user_id(frame)
            try:
                topic = data[1:].decode()
            except UnicodeDecodeError:
                continue
            if data[0] == 1:
                if identity is not None:
                    self._remember_fd(self.outputs, frame, identity)
                allowed, out = core.on_subscribe(identity, topic, now)
                log.debug("subscription %r from %s: %s", topic[:80], (identity or "?")[:12],
                          "installed" if allowed else "refused")
                if allowed:
                    # Manual mode: applies to the peer whose subscription we just read.
                    xpub.setsockopt(zmq.SUBSCRIBE, data[1:])
                    if topic == SYSTEM_TOPIC:  # e.g. `zchat stats` or `health`: answer it soon
                        self._next_stats = min(self._next_stats, max(now, self._stats_at + STATS_MIN_GAP))
                else:
                    # DEBUG: subscriptions are not rate-limited, so one peer could flood the log.
                    log.debug("refused subscription %r from %s", topic[:80], (identity or "?")[:12])
                self._publish(out)
            elif identity is not None:
                core.on_unsubscribe(identity, topic)
                xpub.setsockopt(zmq.UNSUBSCRIBE, data[1:])

    def _drain_messages(self, now: float) -> None:
        # The hot loop: names bound once, no helper calls on the common path.
        recv, on_message, add, inputs = self.pull.recv, self.core.on_message, self.dispatch.add, self.inputs
        for _ in range(DRAIN_BATCH):
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = 1
            part = frame
            while part.more:  # a multipart message arrives whole: drain it, reject below
                part = recv(copy=False)
                frames += 1
            self.frames_in += 1
            try:
                identity: str | None = frame.get("User-Id")
            except zmq.ZMQError:
                identity = None
            if identity is not None and not inputs.knows(identity):
                self._remember_input(frame, identity)
            try:
                out = on_message(identity, frame.buffer, frames, now)
            except Exception as exc:  # a bug must not take the chat down for everyone
                # The stack and the exception's type, not its message: that could quote the text.
                log.error("internal error handling a message from %s: %s\n%s", (identity or "?")[:12],
                          type(exc).__name__, "".join(traceback.format_tb(exc.__traceback__)).rstrip())
                continue
            if out:
                add(out)

    def _remember_input(self, frame: zmq.Frame, identity: str) -> None:
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        if (identity, fd) not in self._closing:  # else a late frame of a connection now closed
            self.inputs.seen(identity, fd)

    def _announce_closed_inputs(self, now: float) -> None:
        """Leave notices for identities whose input connection closed a moment ago and that
        have not come back on another one since."""
        for key, due in list(self._closing.items()):
            if due <= now:
                del self._closing[key]
                identity = key[0]
                if not self.inputs.knows(identity):
                    self._publish(self.core.on_disconnect(identity, now))

    @staticmethod
    def _remember_fd(connections: Connections, frame: zmq.Frame, identity: str) -> None:
        try:
            connections.seen(identity, frame.get(zmq.SRCFD))
        except zmq.ZMQError:
            pass

    def _drain_monitor(self, monitor: zmq.Socket, connections: Connections, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            identity = connections.closed(event["value"])
            if identity is not None and connections is self.outputs and not self.outputs.knows(identity):
                self.core.on_unsubscribed_all(identity)
            if identity is not None and connections is self.inputs:  # the input one counts
                self._closing[(identity, event["value"])] = now + CLOSE_GRACE

    def _publish(self, out: list[Out]) -> None:
        self.dispatch.add(out)  # sent at the end of the loop turn, after storage

    # --- statistics and reloading ----------------------------------------------------

    def _stats(self, now: float) -> None:
        """Publish a stats event on sys/ (unless disabled) and start a new interval."""
        interval = self.settings.stats_interval
        self._next_stats = now + (interval or L.STATS_INTERVAL)
        core, dispatch = self.core, self.dispatch
        totals = (self.frames_in, dispatch.messages, dispatch.published)
        span = max(now - self._stats_at, 1e-3)
        frames_rate, messages_rate, published_rate = (
            round((total - last) / span, 3) for total, last in zip(totals, self._stats_last, strict=True))
        limited = len(core.rate_limited)
        core.rate_limited.clear()  # emptied even when disabled: it must not grow
        self._stats_at, self._stats_last = now, totals
        if interval <= 0:
            return
        self._publish([core.publish_system(lambda seq: Stats(
            seq=seq, ts=now, epoch=self.epoch, uptime=round(now - self.started, 3),
            interval=round(span, 3), online=core.online, rooms=len(core.rooms),
            messages_in=dispatch.messages, messages_in_rate=messages_rate,
            frames_in=self.frames_in, frames_in_rate=frames_rate,
            published=dispatch.published, published_rate=published_rate,
            drops=sum(core.rejected.values()), drops_by_kind=dict(core.rejected),
            rate_limited=limited, rate_limited_total=core.rate_limited_total,
            errors=dict(dispatch.errors), history=self.store.stored))])

    def _reload_settings(self, now: float) -> None:
        """SIGHUP: read the settings again; apply what can change live, log the rest."""
        if self.settings.reload is None:
            return
        try:
            new = self.settings.reload()
        except Exception as exc:  # an invalid file: one line, and nothing changes
            log.error("SIGHUP: keeping the current settings: %s", exc)
            return
        old_config, new_config = self.settings.config, new.config
        changed = [key for key in new_config if new_config[key] != old_config.get(key)]
        from zchat.config import OPTIONS

        live = [key for key in changed if OPTIONS[key].live]
        later = [key for key in changed if not OPTIONS[key].live]
        kept = {key: old_config[key] for key in later if key in old_config}
        self.settings = replace(
            self.settings, idle_exit=new.idle_exit, retention=new.retention,
            stats_interval=new.stats_interval, log_level=new.log_level, log_json=new.log_json,
            limits=replace(self.core.limits, rate_burst=new.limits.rate_burst,
                           rate_per_second=new.limits.rate_per_second,
                           client_timeout=new.limits.client_timeout),
            config={**new_config, **kept})  # what needs a restart still differs next time
        logsetup.configure(new.log_level, new.log_json)
        self.core.limits = self.settings.limits
        self.store.retention = new.retention
        if "stats_interval" in live:
            self._next_stats = now + (new.stats_interval or L.STATS_INTERVAL)
        for key in live:
            log.info("SIGHUP: %s: %s -> %s (applied)", key, old_config.get(key), new_config[key])
        for key in later:
            log.warning("SIGHUP: %s: %s -> %s needs a restart (not applied)", key, old_config.get(key),
                        new_config[key])
        if not changed:
            log.info("SIGHUP: settings unchanged")

    def close(self, linger_ms: int = 0) -> None:
        if self._sockets_open:
            self._sockets_open = False
            self.pull.disable_monitor()
            self.xpub.disable_monitor()
            for sock in (self.monitor, self.xpub_monitor, self.pull, self.zap):
                sock.close(0)
            self.xpub.close(linger_ms)
            try:
                state = json.loads(state_path(self.settings.config_dir).read_text())
                if state.get("pid") == os.getpid():
                    state_path(self.settings.config_dir).unlink()
            except (OSError, ValueError):
                pass
        self.store.close()
        self.ctx.term()
        if self._lock_file is not None:  # last: the state file is gone by now
            os.close(self._lock_file)
            self._lock_file = None


def serve(settings: BrokerSettings) -> int:
    """Start a broker, print the banner and serve until stopped."""
    try:
        broker = Broker(settings)
        broker.bind()
    except BrokerError as exc:
        print(f"zchat broker: {exc}", file=sys.stderr)
        return 1
    print(broker.banner(), flush=True)
    ep = settings.endpoints
    log.info("broker started: pid %d, input %s, publish %s, epoch %s, key %s, %s mode, history %s",
             os.getpid(), ep.input, ep.publish, broker.epoch, broker.keypair.identity,
             "open" if settings.authorized_keys is None else "closed", broker.store.path)
    code = broker.run()
    log.info("broker stopped (exit %d)", code)
    return code
