"""The broker shell: sockets, ZAP, monitor, signals and the poll loop.

One thread, one poll loop. All chat state lives in `BrokerCore`; this module
only moves bytes between ZeroMQ and the core, reads the clock once per loop
turn, and installs the subscriptions the core approves (XPUB_MANUAL).
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import resource
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
from zchat.admission import LogFold, NewKeyLimiter, remember_until
from zchat.auth import (
    CONNECTIONS_FULL,
    DATA_SENDER,
    EVICTED,
    KEY_CONNECTIONS,
    NEW_KEYS,
    NOT_AUTHORIZED,
    PEERS_FULL,
    PUBLISH_ZAP_DOMAIN,
    ZAP_DOMAIN,
    ZAP_ENDPOINT,
    KeyFileError,
    Refusal,
    load_authorized_keys,
    zap_reply,
)
from zchat.brokerstate import LOCK_FILE, STATE_FILE, read_state, state_path  # noqa: F401  (read_state: re-exported)
from zchat.connections import Connections, bytes_received, drained, remember_fd, shutdown_fd
from zchat.core import BrokerCore, Disconnect, Limits, Out, topic_allowed
from zchat.dispatch import Dispatcher
from zchat.endpoints import Endpoints
from zchat.history import HistoryStore, Retention, open_to_others
from zchat.lockfile import Locked, LockFile
from zchat.protocol import PRIVATE_PREFIX, SYSTEM_TOPIC, Stats
from zchat.relaying import (
    ALL_UNSUBSCRIBED,
    BAN,
    GONE,
    MESSAGE,
    SUBSCRIBED,
    MarkError,
    RelayBook,
    control_topic,
    cut_notice,
    parse_mark,
)
from zchat.sealing import BoxCache

log = logging.getLogger("zchat.broker")

DRAIN_BATCH = 5000  # messages taken from one socket before looking at the others
PRUNE_INTERVAL = 60.0  # seconds between retention passes
CLOSE_GRACE = 0.05  # seconds between an input connection closing and its leave notice
CUT_GRACE = 0.3  # seconds between telling someone they are removed and cutting them off
STATS_MIN_GAP = 1.0  # a new sys/ subscriber gets stats this soon, but no more often than this...
# ...and, as each one goes to everyone on sys/, no more often than this many deliveries a second
# (thousands joining at once: no stats storm; 10,000 online: brought forward every 10 s at most).
STATS_FORWARD_DELIVERIES = 1_000
DATA_SENDER_REFUSAL = 60.0  # seconds a key cut for sending data on its subscriber connection is refused
DATA_SENDERS_KEPT = 10_000  # such keys remembered at once (the oldest forgotten first)
# A key that marks frames without being a relay is cut, logged and counted once in this long; when
# it comes back sooner (a relay whose key is not listed yet reconnects several times a second) it is
# cut again quietly. Not refused at the handshake: libzmq never reconnects after a ZAP refusal, so
# a relay refused once would stay cut off after the operator lists it.
FORGER_QUIET = 10.0
SILENCE_SCAN = 1.0  # seconds between looks for input connections of keys that went silent
SHED_EVERY = 0.1  # least seconds between two sheddings of silent connections on accept failures
MONITOR_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_DISCONNECTED
INPUT_CHECK_INTERVAL = 1.0  # seconds between looks at the bytes each input connection sent...
INPUT_CHECK_GROWTH = 16 * 2**20  # ...and a look at once when the broker grew this much since
# A look is a TCP_INFO getsockopt per connection, some 10-30 us in the kernel: with thousands of
# connections the looks are spaced out to at most this many a second (10,000 inputs: every 5 s),
# each connection's allowance growing with the interval (the growth trigger still looks at once).
INPUT_LOOKS_PER_SECOND = 2_000


@dataclass
class BrokerSettings:
    endpoints: Endpoints = field(default_factory=Endpoints)
    config_dir: Path = field(default_factory=keys.default_config_dir)
    idle_exit: float | None = None  # stop after this long with nobody online
    limits: Limits = field(default_factory=Limits)
    db_path: Path | None = None  # default: <config>/broker/history.sqlite3; ":memory:" keeps nothing
    retention: Retention = field(default_factory=Retention)
    authorized_keys: Path | None = None  # closed mode: only these keys, with fixed names and roles
    # Keys of relays (may mark their clients' identities), one per line; in closed mode the
    # authorized-keys file's `relay` role counts too. None: <config>/broker/relay-keys if present.
    relay_keys: Path | None = None
    stats_interval: float = L.STATS_INTERVAL  # seconds between stats events on sys/; 0 = none
    log_level: str = "INFO"
    log_json: bool = False
    connections_per_key: int = L.CONNECTIONS_PER_KEY  # on each socket
    new_keys_per_minute: int = L.NEW_KEYS_PER_MINUTE  # per source address; 0 = no limit
    max_connections: int | None = None  # both sockets together; None: RLIMIT_NOFILE - FD_RESERVE
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


PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def resident_bytes() -> int:
    """This process's resident memory (0 where /proc does not tell)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def read_relay_keys(path: Path) -> set[str]:
    """Identities from a relay-keys file: `public-key [comment]` lines (hex or z85), `#`
    comments. A missing file lists none; a bad line is a start-up error."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return set()
    except OSError as exc:
        raise BrokerError(f"cannot read the relay keys {path}: {exc.strerror}") from None
    found: set[str] = set()
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        try:
            found.add(keys.identity_of(keys.parse_public_key(words[0])))
        except ValueError as exc:
            raise BrokerError(f"{path}:{number}: {exc}") from None
    return found


def read_bans(path: Path) -> set[str]:
    try:
        return {line.split()[0] for line in path.read_text().splitlines() if line.strip()}
    except OSError:
        return set()


def raise_fd_limit() -> tuple[int, int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one where allowed: each client holds two
    connections. Returns (soft before, soft now, hard)."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:  # Linux refuses more than fs.nr_open
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            target = 1 << 20
    if before != resource.RLIM_INFINITY and before < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the descriptor limit from %d to %d: %s", before, target, exc)
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return before, soft, hard


def connection_cap(soft_limit: int) -> int:
    """Connections (both sockets) the broker admits: below the descriptor limit, with a
    reserve for its own files and for handshakes in progress."""
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1 << 20
    return max(soft_limit - L.FD_RESERVE, soft_limit // 2)


def warn_if_exposed(store: HistoryStore) -> None:
    """The database files are 0600; say so when that had to be fixed, and warn when their
    directory lets others in (they see the files come and go, and with write access could
    delete or replace them)."""
    for path in store.tightened:
        log.warning("made %s private (mode 0600): it holds offline private messages", path)
    if str(store.path) == ":memory:":
        return
    directory = Path(store.path).resolve().parent
    if open_to_others(directory):
        log.warning("the history database's directory %s is open to others (mode %04o): "
                    "make it private with chmod go-rwx %s", directory,
                    os.stat(directory).st_mode & 0o7777, directory)


class Broker:
    def __init__(self, settings: BrokerSettings) -> None:
        self.settings = settings
        db_path = settings.db_path or keys.broker_dir(settings.config_dir) / "history.sqlite3"
        self._locks = self._lock(db_path)  # before anything is created or read
        self.keypair = keys.load_or_create(keys.broker_dir(settings.config_dir), keys.BROKER_KEY_NAME)
        self.epoch = secrets.token_hex(8)
        try:
            self.store = HistoryStore(db_path, settings.retention)
        except (sqlite3.Error, OSError) as exc:
            self._unlock()
            raise BrokerError(f"cannot open the history database {db_path}: {exc}") from None
        warn_if_exposed(self.store)
        accounts = None
        if settings.authorized_keys is not None:
            try:
                accounts = load_authorized_keys(settings.authorized_keys)
            except KeyFileError as exc:
                self.store.close()
                self._unlock()
                raise BrokerError(str(exc)) from None
        self.bans_path = keys.broker_dir(settings.config_dir) / "banned-keys"
        try:
            self.relays = self._relay_keys(accounts)
        except BrokerError:
            self.store.close()
            self._unlock()
            raise
        self.book = RelayBook()  # relays' clients and subscriptions
        self.core = BrokerCore(self.epoch, time.monotonic(), settings.limits, stored_seq=self.store.last_seq,
                               known_names=self.store.known_names(), accounts=accounts,
                               banned=read_bans(self.bans_path), topics=self.store.topics())
        self.boxes = BoxCache(self.keypair.secret)  # seals every u/<id>/ publication to <id>
        self.ctx = zmq.Context()
        self._stopping = False
        self._reload_requested = False
        # Input (PULL) and output (XPUB) connections apart: presence follows the input one.
        self.inputs, self.outputs = Connections(), Connections()
        self._pending_cuts: list[tuple[float, str]] = []
        # An upstream data frame read from the XPUB shifts libzmq's record of the pipe last read
        # (it is queued without its pipe): until the socket's queue is empty again, an approval
        # could be installed on someone else's connection. Meanwhile none is installed; the
        # clients whose subscriptions are skipped subscribe again.
        self._xpub_shifted = False
        # Keys cut for sending data on their subscriber connection: monotonic time until which
        # ZAP refuses them.
        self._data_senders: dict[str, float] = {}
        self._forgers: dict[str, float] = {}  # keys that marked frames, not being relays -> quiet until
        self.data_cuts = 0  # such cuts, for the stats
        # Input connections seen closing, (identity, fd) -> when to announce the leave. The
        # monitor can report a close before the main loop has read the connection's last
        # frames (a /quit's leave message): those are read first, and do not count as a
        # new connection of that identity.
        self._closing: dict[tuple[str, int], float] = {}
        self._internal_errors = logsetup.Folded(log, logging.ERROR, "internal errors")
        # Bytes each input connection sent, as the kernel counts them: fd -> (total at the last
        # look, what is left of its allowance); see _check_inputs.
        self._input_looks: dict[int, tuple[int, float]] = {}
        self._inputs_checked_at = time.monotonic()
        self._rss_at_check = resident_bytes()
        self._sockets_open = False
        # Admission: connection caps, new keys per address, silent and surplus connections cut.
        self.max_connections = settings.max_connections or connection_cap(
            resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        self.new_keys = NewKeyLimiter(settings.new_keys_per_minute)
        self.refused: dict[str, int] = {}  # by reason, since start-up (stats)
        self._fold = LogFold()
        self._next_silence_scan = 0.0
        self._next_shed = 0.0
        self._local_ports: frozenset[int] = frozenset()
        # Keys evicted to make room -> until when they are refused (monotonic), oldest first: cut,
        # they would reconnect at once and evict another key that has not joined, in a loop.
        self._evicted_until: dict[str, float] = {}
        # Statistics: totals here, in the core and in the dispatcher; rates since the last event.
        self.started = time.monotonic()
        self.frames_in = 0
        self._stats_at = self.started
        self._stats_last = (0, 0, 0)  # frames_in, messages, published at _stats_at
        self._next_stats = self.started + (settings.stats_interval or L.STATS_INTERVAL)

    # --- start-up ------------------------------------------------------------

    def _relay_keys(self, accounts: dict | None) -> set[str]:
        """Keys whose marks are believed: the relay-keys file, and `relay` accounts."""
        path = self.settings.relay_keys or keys.broker_dir(self.settings.config_dir) / "relay-keys"
        relays = read_relay_keys(path)
        if accounts is not None:
            relays |= {identity for identity, account in accounts.items() if account.role == "relay"}
        if relays:
            log.info("%d relay key(s) may mark their clients' identities", len(relays))
        return relays

    def _lock(self, db_path: Path) -> list[LockFile]:
        """One broker per config dir and per database: a second one would number events from
        the same stored seqs and overwrite the first one's history."""
        ep = self.settings.endpoints
        holder = {"pid": os.getpid(), "port": ep.port, "pub_port": ep.publish_port}
        paths = [keys.broker_dir(self.settings.config_dir) / LOCK_FILE]
        if str(db_path) != ":memory:":
            paths.append(db_path.with_name(db_path.name + ".lock"))
        locks: list[LockFile] = []
        try:
            for path in paths:
                lock = LockFile(path)
                lock.acquire(holder)
                locks.append(lock)
        except Locked as exc:
            for lock in locks:
                lock.release()
            raise BrokerError(f"{exc.describe()}; stop it first (zchat broker --stop) or use "
                              "another --config-dir / --db") from None
        except OSError as exc:
            for lock in locks:
                lock.release()
            raise BrokerError(f"cannot lock {exc.filename}: {exc.strerror}") from None
        return locks

    def _unlock(self) -> None:
        for lock in self._locks:
            lock.release()

    def bind(self) -> None:
        """ZAP first, then the two CURVE server sockets (zap_domain before bind)."""
        ctx = self.ctx
        # Made before the ports are open: a flood of connections may take every descriptor.
        self._wake = socket.socketpair()
        self.zap = ctx.socket(zmq.REP)
        self.zap.linger = 0
        self.zap.bind(ZAP_ENDPOINT)
        self.pull = self._curve_server(zmq.PULL)
        self.pull.rcvhwm = L.PULL_RCVHWM
        self.pull.maxmsgsize = L.MAX_FRAME_BYTES
        self.xpub = self._curve_server(zmq.XPUB)
        self.xpub.sndhwm = L.XPUB_SNDHWM
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.monitor = self.pull.get_monitor_socket(MONITOR_EVENTS)
        self.xpub_monitor = self.xpub.get_monitor_socket(MONITOR_EVENTS)
        self.dispatch = Dispatcher(self.core, self.store, self.xpub.send, self.boxes, self._cut, self._ban,
                                   self._unban)
        self._sockets_open = True
        ep = self.settings.endpoints
        for sock, endpoint in ((self.pull, ep.input), (self.xpub, ep.publish)):
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                self.close()
                hint = " (is another broker running?)" if exc.errno == zmq.EADDRINUSE else ""
                raise BrokerError(f"cannot bind {endpoint}: {exc.strerror}{hint}") from None
        ports = (_port_of(sock) for sock in (self.pull, self.xpub))
        self._local_ports = frozenset(port for port in ports if port is not None)
        self._write_state()

    def _curve_server(self, kind: int) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_secretkey = self.keypair.secret
        sock.curve_publickey = self.keypair.public
        # Must precede bind, or it is ignored. One per socket: ZAP requests say which.
        sock.zap_domain = PUBLISH_ZAP_DOMAIN if kind == zmq.XPUB else ZAP_DOMAIN
        sock.handshake_ivl = L.HANDSHAKE_IVL_MS
        sock.backlog = L.LISTEN_BACKLOG  # a crowd joining at once must not overflow the accept queue
        # No ZMTP heartbeats from the broker: libzmq 4.3.5 keeps every connection's heartbeat
        # timer in one ordered map per I/O thread and cancels one (on each PONG) by walking
        # that map: with some four thousand subscribers that walk was a third of the I/O thread.
        # (On PULL they could also abort libzmq, stream_engine_base.cpp:310 !_io_error, when a
        # flooding sender goes away.) Presence comes from application pings and the socket
        # monitor; dead peers are the kernel's to find: keepalive probes on an idle connection,
        # and TCP_USER_TIMEOUT (ZMQ_TCP_MAXRT) on one whose data goes unacknowledged.
        sock.tcp_keepalive = 1
        sock.tcp_keepalive_idle = L.TCP_KEEPALIVE_IDLE_S
        sock.tcp_keepalive_intvl = L.TCP_KEEPALIVE_INTVL_S
        sock.tcp_keepalive_cnt = L.TCP_KEEPALIVE_CNT
        sock.setsockopt(zmq.TCP_MAXRT, L.TCP_MAXRT_MS)
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
            self._reload_relays(None)
            return
        try:
            accounts = load_authorized_keys(path)
        except KeyFileError as exc:
            log.error("SIGHUP: keeping the current keys: %s", exc)
            return
        self._reload_relays(accounts)
        log.info("SIGHUP: %d authorized keys (was %d)", len(accounts), len(self.core.accounts or {}))
        self._publish(self.core.set_accounts(accounts, now))

    def _reload_relays(self, accounts: dict | None) -> None:
        """SIGHUP: the relay keys afresh. A relay no longer listed is cut: its clients leave."""
        try:
            relays = self._relay_keys(accounts)
        except BrokerError as exc:
            log.error("SIGHUP: keeping the current relay keys: %s", exc)
            return
        for gone in self.relays - relays:
            self.inputs.cut(gone)
            self.outputs.cut(gone)
        self.relays = relays

    def _admit(self, identity: str, domain: bytes, address: str) -> Refusal | None:
        """The ZAP decision for one handshake (see zchat.auth.Refusal for what a client sees)."""
        connections = self.outputs if domain == PUBLISH_ZAP_DOMAIN else self.inputs
        now = time.monotonic()
        refusal = self._refusal(identity, connections, address, now)
        if refusal is None:
            connections.admitted(identity, now)
            return None
        self.refused[refusal.reason] = self.refused.get(refusal.reason, 0) + 1
        if self._fold.first(refusal.reason, now):
            log.info("refused key %s from %s at the handshake: %s", identity[:12], address, refusal.text)
        return refusal

    def _refusal(self, identity: str, connections: Connections, address: str, now: float) -> Refusal | None:
        core = self.core
        if identity in core.banned or (core.accounts is not None and identity not in core.accounts):
            return NOT_AUTHORIZED
        if connections.count(identity, now - core.limits.client_timeout) >= self.settings.connections_per_key:
            return KEY_CONNECTIONS
        if self.inputs.live + self.outputs.live > self.max_connections:
            return CONNECTIONS_FULL
        if self._evicted_until.get(identity, 0.0) > now:
            return EVICTED
        if self._data_senders and self._data_senders.get(identity, 0.0) > now:
            return DATA_SENDER
        known = identity in core.peers or self.inputs.holds(identity) or self.outputs.holds(identity)
        if not known:
            if not core.room_for_new_key():
                return PEERS_FULL
            if not self.new_keys.allow(address, now):
                return NEW_KEYS
        return None

    def _cut(self, identity: str) -> None:
        # A moment's grace so the notice telling them why leaves the queue first.
        self._pending_cuts.append((time.monotonic() + CUT_GRACE, identity))

    def _run_cuts(self) -> None:
        now = time.monotonic()
        while self._pending_cuts and self._pending_cuts[0][0] <= now:
            _, identity = self._pending_cuts.pop(0)
            count = self.inputs.cut(identity) + self.outputs.cut(identity)
            relay = self.book.via.get(identity)
            if relay is not None:  # its connections are the relay's: have the relay cut them
                self.xpub.send(cut_notice(relay, identity))
            log.info("cut %d connection(s) of %s%s", count, identity[:12],
                     f" (relay {relay[:12]} told)" if relay else "")

    def _check_inputs(self, now: float) -> None:
        """Cut input connections that send more bytes a second than the frame ceiling's worth
        of full-size messages (a token bucket of one second; of one interval between looks when
        thousands of connections space them out), as the kernel counts them. Above
        all one unfinished multipart message: libzmq keeps its parts, unseen by us until the
        last one, and no socket option bounds them."""
        checked_at, self._inputs_checked_at = self._inputs_checked_at, time.monotonic()
        self._rss_at_check = resident_bytes()
        rate = self._input_rate()
        elapsed = self._inputs_checked_at - checked_at
        refill = elapsed * rate
        capacity = rate * max(1.0, min(elapsed, self._input_check_interval()))  # one look's worth
        looks: dict[int, tuple[int, float]] = {}
        unnamed = self.inputs.unattributed  # accepted, key not known yet
        for fd in self.inputs.all() + list(unnamed):
            if self.relays and self.inputs.owner(fd) in self.relays:
                continue  # a relay carries many clients: each is limited at its own frames
            received = bytes_received(fd)
            if received is None:
                continue
            # Not seen yet: one that completed no message counts from its start; one named since
            # the last look has its count from then.
            last, allowance = self._input_looks.get(fd, (0 if fd in unnamed else received, rate))
            allowance = min(capacity, allowance + refill) - (received - last)
            if allowance >= 0:
                looks[fd] = (received, allowance)
                continue
            identity = self.inputs.owner(fd)
            shutdown_fd(fd)
            log.warning("input connection of %s sent %d bytes in %.1f s: cut", (identity or "?")[:12],
                        received - last, self._inputs_checked_at - checked_at)
            if identity is not None:
                self._publish(self.core.on_input_flood(identity, int(rate), now))
        self._input_looks = looks

    def _input_check_interval(self) -> float:
        """Seconds between two looks at every input connection: 1 s, longer past
        INPUT_LOOKS_PER_SECOND connections."""
        return max(INPUT_CHECK_INTERVAL, len(self._input_looks) / INPUT_LOOKS_PER_SECOND)

    def _input_rate(self) -> float:
        """Bytes a second one input connection may send: the frame ceiling's worth of
        full-size messages."""
        return self.core.limits.frame_ceiling * L.MAX_BODY_BYTES

    def _check_unread(self) -> None:
        """Forget what was sent to keys whose publish connections drained since; cut those of a
        key with more than its budget unread (a slow consumer: what waits for it grows the
        broker), and tell it why once it subscribes again."""
        unread, budget = self.dispatch.unread, self.core.limits.max_backlog_bytes
        for topic, size in list(unread.items()):
            identity = topic[len(PRIVATE_PREFIX):-1]
            fds = self.outputs.fds(identity)
            if not fds or all(drained(fd) for fd in fds):
                del unread[topic]
            elif size > budget:
                del unread[topic]
                self.core.slow_consumer(identity, f"{size} bytes waited for you unread (limit {budget}): "
                                        "the broker cut your subscriptions; read faster or ask for less")
                count = self.outputs.cut(identity)
                log.warning("slow consumer %s: %d bytes unread on its private stream; cut %d publish "
                            "connection(s)", identity[:12], size, count)

    def _ban(self, identity: str) -> None:
        for relay in self.book.last_seen:  # it must not come back through any relay either
            self.xpub.send(cut_notice(relay, identity, BAN))
        # Called mid-flush: a full disk or an unwritable directory must not stop the broker.
        # The ban holds in memory either way; only its survival across a restart is lost.
        try:
            with open(self.bans_path, "a") as bans:
                bans.write(identity + "\n")
        except OSError as exc:
            log.error("cannot record the ban of %s in %s: %s; it holds until the broker stops",
                      identity[:12], self.bans_path, exc.strerror or exc)

    def _unban(self, identity: str) -> None:
        # An admin's /unban: the file loses the key's lines (replaced whole, so a crash leaves
        # the old file or the new one). A failure leaves the ban lifted until the broker stops.
        try:
            lines = self.bans_path.read_text().splitlines(keepends=True)
            kept = [line for line in lines if line.split()[:1] != [identity]]
            temporary = self.bans_path.with_name(self.bans_path.name + ".new")
            temporary.write_text("".join(kept))
            os.replace(temporary, self.bans_path)
        except OSError as exc:
            log.error("cannot remove the ban of %s from %s: %s; it comes back when the broker restarts",
                      identity[:12], self.bans_path, exc.strerror or exc)

    def run(self) -> int:
        """Serve until a signal, --idle-exit or request_stop; returns the exit code."""
        gc.freeze()  # start-up objects never need collecting: keep them out of every GC pass
        wake_r, wake_w = self._wake
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        old_fd = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        old_handlers = {sig: signal.signal(sig, self.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self.request_reload)
        poller = zmq.Poller()
        for sock in (self.zap, self.xpub, self.pull, self.monitor, self.xpub_monitor):
            poller.register(sock, zmq.POLLIN)
        poller.register(wake_r.fileno(), zmq.POLLIN)
        # Schedules run on the monotonic clock: a wall clock stepped back must not stop the
        # heartbeats (or drain rate buckets). Wall time is only what events and rows carry.
        idle_since = time.monotonic()
        next_tick = 0.0
        next_prune = idle_since + PRUNE_INTERVAL
        try:
            while not self._stopping:
                wake_at = min(next_tick, *self._closing.values()) if self._closing else next_tick
                timeout_ms = max(0.0, wake_at - time.monotonic()) * 1000
                ready = dict(poller.poll(timeout_ms))
                now = time.monotonic()
                wall = time.time()
                self.core.wall_offset = wall - now
                # The monitors first: a closed connection's descriptor may already serve a new
                # connection whose frames are waiting; its old events must not apply to them.
                # A new connection's ACCEPTED precedes its handshake (ZAP) and its frames: read
                # it even when poll() looked at the monitor a moment before it came.
                if self.monitor in ready or self.pull in ready or self.zap in ready:
                    self._drain_monitor(self.monitor, self.inputs, now)
                if self.xpub_monitor in ready or self.xpub in ready or self.zap in ready:
                    self._drain_monitor(self.xpub_monitor, self.outputs, now)
                if self.zap in ready:
                    self._serve_zap()
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
                # What this turn received goes out before the housekeeping below (a tick costs
                # 0.1-0.2 ms, ten times a second: at 1k msg/s, 1% of messages waited for one).
                if self.dispatch.pending:
                    self.dispatch.flush(wall)
                if now >= next_tick:
                    next_tick = now + L.TICK_INTERVAL
                    self._publish(self.core.tick(now))
                    if self._pending_cuts:
                        self._run_cuts()
                    self._police_connections(now)
                    if self.dispatch.unread:
                        self._check_unread()
                    if (time.monotonic() - self._inputs_checked_at >= self._input_check_interval()
                            or resident_bytes() - self._rss_at_check > INPUT_CHECK_GROWTH):
                        self._check_inputs(now)
                    self._internal_errors.flush(time.monotonic())
                    if self.core.online:
                        idle_since = now
                    elif self.settings.idle_exit is not None and now - idle_since >= self.settings.idle_exit:
                        log.info("nobody online for %.0f s: stopping", self.settings.idle_exit)
                        break
                if now >= self._next_stats:
                    self._stats(now)
                if self.core.evictions:
                    self._evicted()
                self.dispatch.flush(wall)  # what the housekeeping produced (stored first, too)
                if now >= next_prune:
                    next_prune = now + PRUNE_INTERVAL
                    dropped = self.store.retain(wall)
                    if dropped:
                        log.info("retention: dropped %d old events", dropped)
            self.core.wall_offset = time.time() - time.monotonic()
            self._publish(self.core.shutdown(time.monotonic(), "the broker is shutting down"))
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
                self._xpub_shifted = False  # libzmq's queues are empty: its bookkeeping is in step
                return
            data = frame.bytes
            if len(data) < 1 or data[0] not in (0, 1):
                self._xpub_shifted = True
                self._cut_data_sender(frame)
                continue
            identity = user_id(frame)
            if self._data_senders and self._data_senders.get(identity or "", 0.0) > time.monotonic():
                self._cut_data_sender(frame)  # another connection of a key cut for data frames
                continue
            try:
                topic = data[1:].decode()
            except UnicodeDecodeError:
                continue
            if identity in self.relays:
                self._relay_subscription(identity, frame, data, topic, now)
                continue
            if data[0] == 1:
                if identity is not None:
                    remember_fd(self.outputs, frame, identity)
                if self._xpub_shifted:  # it would land on another connection: the client retries
                    log.debug("subscription %r from %s skipped after a data frame", topic[:80],
                              (identity or "?")[:12])
                    continue
                allowed, out = core.on_subscribe(identity, topic, now)
                log.debug("subscription %r from %s: %s", topic[:80], (identity or "?")[:12],
                          "installed" if allowed else "refused")
                if allowed:
                    # Manual mode: applies to the peer whose subscription we just read.
                    xpub.setsockopt(zmq.SUBSCRIBE, data[1:])
                    if topic == SYSTEM_TOPIC:  # e.g. `zchat stats` or `health`: answer it soon
                        gap = max(STATS_MIN_GAP, core.online / STATS_FORWARD_DELIVERIES)
                        self._next_stats = min(self._next_stats, max(now, self._stats_at + gap))
                else:
                    # Subscriptions are not rate-limited: log a key's refusals once per interval.
                    who = (identity or "?")[:12]
                    if self._fold.first(f"refused subscription from {who}", time.monotonic()):
                        log.info("refused subscription %r from %s", topic[:80], who)
                self._publish(out)
            elif identity is not None:
                core.on_unsubscribe(identity, topic)
                if not self._xpub_shifted:  # else it could remove someone else's subscription
                    xpub.setsockopt(zmq.UNSUBSCRIBE, data[1:])

    def _cut_data_sender(self, frame: zmq.Frame) -> None:
        """An upstream data frame on the publishing socket, which an honest SUB never sends (it
        is how an attacker shifts libzmq's bookkeeping): cut every connection of its key, which
        the frame's User-Id names, and refuse that key at the handshake for a while."""
        identity = user_id(frame)
        if identity is None:
            return
        now = time.monotonic()
        first = self._data_senders.get(identity, 0.0) <= now  # not cut already in this window
        remember_fd(self.outputs, frame, identity)  # its data connection may have sent nothing else
        count = self.inputs.cut(identity) + self.outputs.cut(identity)
        if not first:
            return  # frames queued before the cut, or a connection of it we had not seen before
        remember_until(self._data_senders, identity, now + DATA_SENDER_REFUSAL, now, DATA_SENDERS_KEPT)
        self.data_cuts += 1
        log.warning("cut key %s: it sent data frames on its subscriber connection (%d connection(s) "
                    "shut; refused for %.0f s)", identity[:12], count, DATA_SENDER_REFUSAL)

    def _drain_messages(self, now: float) -> None:
        # The hot loop: names bound once, no helper calls on the common path.
        recv, on_message, add, inputs = self.pull.recv, self.core.on_message, self.dispatch.add, self.inputs
        relays = self.relays
        for _ in range(DRAIN_BATCH):
            try:
                frame = recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self.frames_in += 1
            try:
                identity: str | None = frame.get("User-Id")
            except zmq.ZMQError:
                identity = None
            # A new connection (accepted, not yet attributed) or a new identity: whose is it?
            # A new connection of this key (admitted, not yet seen), or a key not seen yet: the
            # descriptor is looked up then only, not for every message of a known key.
            if identity is not None and (not inputs.knows(identity) or inputs.expects(identity)):
                self._remember_input(frame, identity)
            frames = 1
            if frame.more:  # a multipart message arrives whole: drain it, reject below
                frames, size = self._drain_parts(frame)
                if frames > L.MAX_MESSAGE_PARTS or size > L.MAX_MESSAGE_BYTES:
                    log.info("dropped a message of %d frames, %d bytes from %s", frames, size,
                             (identity or "?")[:12])
                    add(self.core.on_oversized(identity, frames, size, now))
                    continue
            # A copy (`bytes`), not the frame's `buffer`: pyzmq makes that memoryview ten
            # times slower than copying a chat message's few hundred bytes.
            body = frame.bytes
            if identity in relays or (body and body[0] == 0):  # marked: see zchat.relaying
                self._relayed(identity, body, now)
                continue
            try:
                out = on_message(identity, body, frames, now)
            except Exception as exc:  # a bug must not take the chat down for everyone
                self._internal_error(identity, exc)
                continue
            if out:
                add(out)

    # --- relays (docs/PROTOCOL.md "Relays") ------------------------------------------

    def _relayed(self, relay: str | None, body: bytes, now: float) -> None:
        """A frame from a relay key (marked: a client's; unmarked: its own keep-alive), or a
        marked frame from any other key, which is refused: only relays may mark."""
        if relay is None:
            return
        if relay not in self.relays:
            moment = time.monotonic()
            if self._forgers.get(relay, 0.0) > moment:
                self.inputs.cut(relay)  # back again (it reconnects): cut quietly
                self.outputs.cut(relay)
                return
            if self._fold.first(f"forged mark from {relay[:12]}", moment):
                log.warning("key %s, not a relay, sent a marked frame: dropped, key cut", relay[:12])
            self.refused["forged_mark"] = self.refused.get("forged_mark", 0) + 1
            remember_until(self._forgers, relay, moment + FORGER_QUIET, moment, DATA_SENDERS_KEPT)
            self._cut(relay)
            return
        book, core = self.book, self.core
        book.seen(relay, now)
        if not body or body[0] != 0:
            return
        try:
            marked = parse_mark(body)
            client, kind = marked.identity, marked.kind
            topic = "" if kind in (MESSAGE, GONE, ALL_UNSUBSCRIBED) else bytes(marked.payload).decode()
        except (MarkError, UnicodeDecodeError) as exc:
            if self._fold.first(f"bad mark from {relay[:12]}", time.monotonic()):
                log.warning("relay %s sent a bad mark: %s", relay[:12], exc)
            return
        if client in self.relays:
            return  # a relay is never a client through another one
        if kind == MESSAGE:
            if book.via.get(client) != relay:
                book.came_through(relay, client)
            try:
                out = core.on_message(client, marked.payload, 1, now)
            except Exception as exc:  # a bug must not take the chat down for everyone
                self._internal_error(client, exc)
                return
            self._publish(out)
        elif kind == SUBSCRIBED:
            if book.client_subscribed(relay, client, topic) and book.via.get(client) == relay:
                self._relayed_subscription(client, topic, now)
        elif kind == GONE:
            if book.client_gone(relay, client):
                log.debug("client %s left relay %s", client[:12], relay[:12])
                self._publish(core.on_disconnect(client, now))
        elif kind == ALL_UNSUBSCRIBED:
            book.client_unsubscribed_all(relay, client)
            if book.via.get(client) == relay:
                core.on_unsubscribed_all(client)
        else:  # UNSUBSCRIBED
            book.client_unsubscribed(relay, client, topic)
            if book.via.get(client) == relay:
                core.on_unsubscribe(client, topic)

    def _relayed_subscription(self, client: str, topic: str, now: float) -> None:
        """A relayed client's subscription is live (reported by its relay, and the relay's
        own installed here): judged by the same policy as a direct one's."""
        allowed, out = self.core.on_subscribe(client, topic, now)
        if not allowed and self._fold.first(f"refused subscription from {client[:12]}", time.monotonic()):
            log.info("refused relayed subscription %r from %s", topic[:80], client[:12])
        self._publish(out)

    def _relay_subscription(self, relay: str, frame: zmq.Frame, data: bytes, topic: str, now: float) -> None:
        """A relay's own (un)subscription: the union of what its clients need. It may have
        any private stream (sealed to each client) and its own control topic."""
        book = self.book
        if data[0] == 1:
            remember_fd(self.outputs, frame, relay)
            if self._xpub_shifted:
                return
            if topic != control_topic(relay) and not topic_allowed(relay, topic, True, "relay"):
                if self._fold.first(f"refused subscription from {relay[:12]}", time.monotonic()):
                    log.info("refused subscription %r from relay %s", topic[:80], relay[:12])
                return
            self.xpub.setsockopt(zmq.SUBSCRIBE, data[1:])
            for client in book.relay_subscribed(relay, topic):
                if book.via.get(client) == relay:
                    self._relayed_subscription(client, topic, now)
            return
        for client in book.relay_unsubscribed(relay, topic):
            if book.via.get(client) == relay:
                self.core.on_unsubscribe(client, topic)
        if not self._xpub_shifted:
            self.xpub.setsockopt(zmq.UNSUBSCRIBE, data[1:])

    def _relay_gone(self, relay: str, now: float) -> None:
        """A relay's input connection closed (or it went silent): its clients have left."""
        clients = self.book.relay_gone(relay)
        log.info("relay %s gone: %d client(s) through it announced as left", relay[:12], len(clients))
        for client in clients:
            self._publish(self.core.on_disconnect(client, now))

    def _drain_parts(self, first: zmq.Frame) -> tuple[int, int]:
        """Read the rest of a multipart message, keeping none of it: (frames, bytes)."""
        recv = self.pull.recv
        frames, size, part = 1, len(first), first
        while part.more:
            part = recv(copy=False)
            frames += 1
            size += len(part)
        return frames, size

    def _internal_error(self, identity: str | None, exc: Exception) -> None:
        # The stack and the exception's type, not its message: that could quote the text. At
        # most a few a minute: a peer that found a bug must not fill the disk with it.
        stack = "".join(traceback.format_tb(exc.__traceback__)).rstrip()
        self._internal_errors(time.monotonic(), "internal error handling a message from %s: %s\n%s",
                              (identity or "?")[:12], type(exc).__name__, stack)

    def _remember_input(self, frame: zmq.Frame, identity: str) -> None:
        """Record the input connection this frame came on (every one of a key: so that it
        leaves only with its last, and a cut reaches them all)."""
        try:
            fd = frame.get(zmq.SRCFD)
        except zmq.ZMQError:
            return
        if (identity, fd) in self._closing:
            return  # a late frame of a connection now closed
        if self.inputs.attribute(identity, fd) and fd not in self._input_looks:
            self._input_looks[fd] = (bytes_received(fd) or 0, self._input_rate())  # its first message

    def _announce_closed_inputs(self, now: float) -> None:
        """Leave notices for identities whose input connection closed a moment ago and that
        have not come back on another one since."""
        for key, due in list(self._closing.items()):
            if due <= now:
                del self._closing[key]
                identity = key[0]
                if not self.inputs.knows(identity):
                    if identity in self.relays:
                        self._relay_gone(identity, now)
                    self._publish(self.core.on_disconnect(identity, now))

    def _drain_monitor(self, monitor: zmq.Socket, connections: Connections, now: float) -> None:
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = event["event"]
            if kind == zmq.EVENT_ACCEPTED:
                connections.accepted(event["value"], time.monotonic())
                continue
            if kind == zmq.EVENT_ACCEPT_FAILED:
                self._accept_failed(event["value"])
                continue
            if kind != zmq.EVENT_DISCONNECTED:
                continue
            if connections is self.inputs:
                self._input_looks.pop(event["value"], None)  # the descriptor may serve another
            identity = connections.closed(event["value"])
            if identity is not None and connections is self.outputs and not self.outputs.knows(identity):
                self.core.on_unsubscribed_all(identity)
                if identity in self.relays:
                    for client in self.book.relay_output_closed(identity):
                        if self.book.via.get(client) == identity:
                            self.core.on_unsubscribed_all(client)
            if identity is not None and connections is self.inputs:  # the input one counts
                self._closing[(identity, event["value"])] = now + CLOSE_GRACE

    def _publish(self, out: list[Out]) -> None:
        self.dispatch.add(out)  # sent at the end of the loop turn, after storage

    # --- connections: silence, pressure, accept failures ---------------------------------

    def _police_connections(self, now: float) -> None:
        """Cut connections that never sent a frame within the client timeout (a raw TCP or
        CURVE peer holding a descriptor), the input connections of keys that stopped
        pinging, and, above the connection cap, the oldest silent ones sooner."""
        mono = time.monotonic()
        timeout = self.core.limits.client_timeout
        cut = self._cut_silent(mono - timeout)
        if self.inputs.live + self.outputs.live > self.max_connections:
            cut += self._cut_silent(mono - L.SHED_MIN_AGE, reason="shed")
        if mono >= self._next_silence_scan:
            self._next_silence_scan = mono + SILENCE_SCAN
            deadline = now - timeout
            peers = self.core.peers
            for identity in self.inputs.identities():
                if identity in self.relays:  # a relay is no peer: its keep-alives count
                    if self.book.last_seen.get(identity, now) < deadline:
                        cut += self._count_cut("silent", self.inputs.cut(identity), identity)
                        self._relay_gone(identity, now)
                    continue
                peer = peers.get(identity)
                if peer is None or peer.last_seen < deadline:
                    cut += self._count_cut("silent", self.inputs.cut(identity), identity)
            for connections in (self.inputs, self.outputs):
                connections.expire_pending(mono - timeout)
            evicted = self._evicted_until
            while evicted and next(iter(evicted.values())) <= mono:
                del evicted[next(iter(evicted))]
        for reason, repeats in self._fold.due(mono):
            log.info("... and %d more like it (%s) in the last %g s", repeats, reason, self._fold.interval)

    def _cut_silent(self, before: float, reason: str = "silent", limit: int | None = None) -> int:
        """Cut connections accepted before `before` that never delivered a frame."""
        count = 0
        for connections in (self.inputs, self.outputs):
            for fd in connections.silent(before, limit):
                connections.closed(fd)  # forgotten now; its DISCONNECTED follows
                count += self._count_cut(reason, int(shutdown_fd(fd, self._local_ports)))
        return count

    def _count_cut(self, reason: str, count: int, identity: str | None = None) -> int:
        if count:
            self.refused[reason] = self.refused.get(reason, 0) + count
            if self._fold.first(reason, time.monotonic()):
                whose = f" of {identity[:12]}" if identity else ""
                log.info("cut %d %s connection(s)%s (%d open, cap %d)", count, reason, whose,
                         self.inputs.live + self.outputs.live, self.max_connections)
        return count

    def _accept_failed(self, error: int) -> None:
        """libzmq could not accept a connection (EMFILE: out of descriptors). It retries at once,
        spinning, while the queue holds connections: free descriptors by cutting the oldest
        silent connections, and log once per interval."""
        self.refused["accept_failed"] = self.refused.get("accept_failed", 0) + 1
        mono = time.monotonic()
        if self._fold.first("accept_failed", mono):
            log.warning("cannot accept connections: %s (%d open, cap %d, descriptor limit %d)",
                        os.strerror(error) if error in errno.errorcode else error,
                        self.inputs.live + self.outputs.live, self.max_connections,
                        resource.getrlimit(resource.RLIMIT_NOFILE)[0])
        if mono >= self._next_shed:
            self._next_shed = mono + SHED_EVERY
            self._cut_silent(mono - L.SHED_MIN_AGE, reason="shed")

    def _evicted(self) -> None:
        out = self.core.take_evictions()
        self._publish(out)
        mono = time.monotonic()
        evicted = self._evicted_until
        for item in out:
            if isinstance(item, Disconnect):
                evicted.pop(item.identity, None)  # re-inserted last: the dict stays in expiry order
                evicted[item.identity] = mono + L.EVICTED_COOLDOWN
                if len(evicted) > self.core.limits.max_peers:
                    del evicted[next(iter(evicted))]
                if self._fold.first("evicted", mono):
                    log.info("evicted key %s, which had not joined, to make room (%d keys tracked)",
                             item.identity[:12], len(self.core.peers))

    # --- statistics and reloading ----------------------------------------------------

    def _stats(self, now: float) -> None:
        """Publish a stats event on sys/ (unless disabled) and start a new interval."""
        interval = self.settings.stats_interval
        # Each stats event is one delivery per member on sys/: spaced out with thousands online.
        spread = self.core.online / STATS_FORWARD_DELIVERIES
        self._next_stats = now + max(interval or L.STATS_INTERVAL, spread)
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
            seq=seq, ts=core.ts(now), epoch=self.epoch, uptime=round(now - self.started, 3),
            interval=round(span, 3), online=core.online, rooms=len(core.rooms),
            messages_in=dispatch.messages, messages_in_rate=messages_rate,
            frames_in=self.frames_in, frames_in_rate=frames_rate,
            published=dispatch.published, published_rate=published_rate,
            drops=sum(core.rejected.values()), drops_by_kind=dict(core.rejected),
            rate_limited=limited, rate_limited_total=core.rate_limited_total,
            errors=dict(dispatch.errors), history=self.store.stored,
            connections=self.inputs.live + self.outputs.live, refused=self._refused_totals(),
            evicted=core.evicted_total, data_cuts=self.data_cuts))])

    def _refused_totals(self) -> dict[str, int]:
        totals = dict(self.refused)
        if self.core.turned_away:  # admitted when there was room, none left at the first frame
            totals["peers"] = totals.get("peers", 0) + self.core.turned_away
        return totals

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
            for end in self._wake:
                end.close()
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
        self._unlock()


def _port_of(sock: zmq.Socket) -> int | None:
    endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        return int(endpoint.rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None  # not tcp


def serve(settings: BrokerSettings) -> int:
    """Start a broker, print the banner and serve until stopped."""
    before, soft, hard = raise_fd_limit()
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
    log.info("descriptors: soft limit %d (was %d), hard limit %s; up to %d connections, %d per key "
             "and socket, %s new keys per address a minute", soft, before,
             "unlimited" if hard == resource.RLIM_INFINITY else hard, broker.max_connections,
             settings.connections_per_key, settings.new_keys_per_minute or "any")
    code = broker.run()
    log.info("broker stopped (exit %d)", code)
    return code
