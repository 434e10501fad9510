#!/usr/bin/env python3
"""The zchat broker side by side with a C `zmq.proxy`, in one run, on the same settings.

    python benchmarks/bench.py [--quick] [--json OUT] [--plot FILE.png] [--profile [FILE]]
                               [--broker-args "ARGS"]

Both systems run as separate processes with CurveZMQ on, a ZAP handler, the
broker's high-water marks and 100-byte message texts; every load generator is
a separate process too. Measured: throughput (1 and 4 senders x 1, 4 and 10
subscribers), one-way latency at offered loads of 1k/10k/50k msg/s with 10
subscribers, scale (1k/5k/10k joined clients: broker RSS per client, join
time, a probe delivered to all), a chatty room (N members x 1 msg/s) and the
start-to-joined time of the real ChatClient library, and what sealing private
events costs (per event, and private messages through the broker). See
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import array
import ctypes
import heapq
import json
import math
import multiprocessing as mp
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from time import monotonic_ns as mono

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import zmq  # noqa: E402

from zchat import keys  # noqa: E402
from zchat import limits as L  # noqa: E402
from zchat.auth import zap_reply  # noqa: E402
from zchat.e2e import Keyring  # noqa: E402
from zchat.sealing import SealError, box_for, key_bytes, open_publication  # noqa: E402

# --- what is measured -----------------------------------------------------------

THROUGHPUT_CONFIGS = [(1, 1), (1, 4), (1, 10), (4, 1), (4, 4), (4, 10)]  # (senders, subscribers)
LATENCY_LOADS = [1_000, 10_000, 50_000]  # offered msg/s, one sender, 10 subscribers
LATENCY_SUBSCRIBERS = 10
# Issue 11's targets, printed beside the figures: 1x1 msg/s in at least this multiple of the proxy's
# (then this stretch goal), and the p99 at 10k msg/s x 10 subscribers at most this (ms) and this
# multiple of the proxy's p99 in the same run.
TARGET_1X1_RATIO, STRETCH_1X1_RATIO = 0.5, 0.6
TARGET_P99_10K_MS, TARGET_P99_10K_RATIO = 2.0, 1.3
PROFILES = {
    "quick": dict(tp_warmup=0.5, tp_duration=1.0, lat_warmup=0.5, lat_duration=1.5,
                  scale=[1_000], scale_join_timeout=45.0, chatty=[100], chatty_warmup=0.5,
                  chatty_duration=2.0, joins=10, profile_duration=3.0, seal_events=20_000,
                  seal_dms=5_000, seal_rate=1_000),
    "full": dict(tp_warmup=1.0, tp_duration=3.0, lat_warmup=1.0, lat_duration=4.0,
                 scale=[1_000, 5_000, 10_000], scale_join_timeout=60.0, chatty=[100, 300, 1_000],
                 chatty_warmup=1.0, chatty_duration=5.0, joins=30, profile_duration=6.0, seal_events=100_000,
                 seal_dms=30_000, seal_rate=2_000),
}
SUBS_PER_PROCESS = 5  # subscriber sockets per load-generator process (throughput/latency)
CLIENTS_PER_GENERATOR = 1_250  # scale: each client holds 4 fds in its generator (2 sockets x (tcp + mbox)),
# and few per process: libzmq walks all of a context's timers to cancel one (a handshake done, a PONG)
SCALE_ROOM_SIZE = 100  # scale clients join rooms of this many (see README: no N^2 join storm)
JOIN_WINDOW = 25  # joins in flight per generator process (the broker listens with a backlog of 1024)
BROKER_FD_HEADROOM = 100  # fds the broker keeps for itself (listeners, mailboxes, std streams)
IDLE_WINDOW = 5.0  # scale: seconds over which the broker's idle CPU is measured, all joined
SCALE_SETTLE = 10.0  # scale: seconds after the last join before RSS and idle CPU are measured
# Issue 11's targets for one broker, printed beside the figures.
SCALE_JOIN_TARGET_S = 60.0  # every client joined within this
SCALE_IDLE_CPU_TARGET = 20.0  # % of one core, all broker threads, all joined, nobody talking
SCALE_RSS_TARGET_RATIO = 1.1  # broker RSS per client / the libzmq floor's
PING_INTERVAL_NS = int(L.CLIENT_PING_INTERVAL * 1e9)  # app pings, as the client library sends them
JOIN_RETRY_NS = int(L.JOIN_RETRY_INTERVAL * 1e9)
JOIN_RETRY_MAX_NS = int(getattr(L, "JOIN_RETRY_MAX", L.JOIN_RETRY_INTERVAL) * 1e9)  # older trees: no backoff
IDLE_NS = 600_000_000  # a receiver is done when nothing arrived for this long after the senders stopped

# --- the messages ----------------------------------------------------------------

ROOM = "bench"
TOPIC = b"r/bench/"
TEXT_BYTES = 100  # the say text: 20-digit send timestamp (ns), "|", padding
PAD = b"|" + b"x" * (TEXT_BYTES - 21)
SAY_PREFIX = b'{"type":"say","room":"%s","text":"'
SAY_SUFFIX = PAD + b'"}'
# What the proxy's senders send: the same bytes the broker publishes for a say (topic,
# space, the Message event), so both systems move frames of the same size out.
PUB_PREFIX = b'%s {"type":"message","seq":1234567,"ts":1747000000.123456,"room":"%s","name":"s1x0","text":"'
MESSAGE_MARK = b'{"type":"message"'
TEXT_MARK = b'"text":"'
PING = b'{"type":"ping"}'

CHILDREN: list = []  # every process started here, killed on exit


def say_prefix(room: str) -> bytes:
    return SAY_PREFIX % room.encode()


def pub_prefix(room: str) -> bytes:
    return PUB_PREFIX % (f"r/{room}/".encode(), room.encode())


def text_ts(data: bytes, start: int) -> int:
    """The send timestamp embedded at the start of a message's text (0 for probes)."""
    i = data.find(TEXT_MARK, start) + len(TEXT_MARK)
    try:
        return int(data[i:i + 20])
    except ValueError:
        return 0


# --- process plumbing --------------------------------------------------------------


def die_with_parent() -> None:
    """Linux: get SIGKILL when the process that started us dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def raise_nofile() -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, *args) -> mp.Process:  # type: ignore[no-untyped-def]
    proc = MP.Process(target=_child, args=(target, *args), daemon=True)
    proc.start()
    CHILDREN.append(proc)
    return proc


def _child(target, *args) -> None:  # type: ignore[no-untyped-def]
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        target(*args)
    except Exception:
        results = args[-1]  # by convention the result queue is the last argument
        results.put({"error": traceback.format_exc()})
        raise


def reap(procs: list, timeout: float) -> None:
    """Wait for each load-generator process a while, then kill what is left."""
    for p in procs:
        p.join(timeout)
        if p.is_alive():
            p.kill()


def kill_children() -> None:
    for child in reversed(CHILDREN):
        try:
            if isinstance(child, subprocess.Popen):
                if child.poll() is None:
                    child.kill()
                child.wait(5)
            elif child.is_alive():
                child.kill()
                child.join(5)
        except Exception:
            pass
    CHILDREN.clear()


def collect(results, count: int, timeout: float, procs: list) -> list[dict]:  # type: ignore[no-untyped-def]
    """`count` result dicts from child processes; raise with the child's traceback on error."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"timed out waiting for {count - len(out)} load-generator results")
        try:
            item = results.get(timeout=min(left, 1.0))
        except Exception:  # queue.Empty
            dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
            if dead:
                raise RuntimeError(f"a load generator died (exit {dead[0].exitcode})") from None
            continue
        if "error" in item:
            raise RuntimeError("load generator failed:\n" + item["error"])
        out.append(item)
    return out


def wait_value(value, target: int, timeout: float, procs: list, results) -> None:  # type: ignore[no-untyped-def]
    """Wait for a shared counter; if a child died meanwhile, raise with its traceback."""
    deadline = time.monotonic() + timeout
    while value.value < target:
        if any(not p.is_alive() and p.exitcode not in (0, None) for p in procs):
            errors = []
            try:
                while True:
                    item = results.get(timeout=1)
                    if "error" in item:
                        errors.append(item["error"])
            except Exception:  # queue.Empty
                pass
            raise RuntimeError("load generator failed:\n" + "\n".join(errors or ["(no traceback)"]))
        if time.monotonic() > deadline:
            raise RuntimeError(f"load generators not ready ({value.value}/{target}) after {timeout:.0f} s")
        time.sleep(0.01)


def start_window(times, go, warmup: float, duration: float) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Tell the generators when to start, measure and stop (monotonic ns in `times`), let them
    go, and return once warm-up is over: (window start, window end)."""
    t0 = mono() + 300_000_000
    w0 = t0 + int(warmup * 1e9)
    w1 = w0 + int(duration * 1e9)
    times[:] = [t0, w0, w1, w1 + 50_000_000]
    go.set()
    sleep_until(w0)
    return w0, w1


def sleep_until(t_ns: int) -> None:
    left = (t_ns - mono()) / 1e9
    if left > 0:
        time.sleep(left)


# --- /proc readings ---------------------------------------------------------------------


def vmrss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def thread_ticks(pid: int) -> dict[str, int]:
    """CPU clock ticks per thread role: main (the Python loop / zmq_proxy), io (ZMQbg/IO)."""
    ticks: Counter[str] = Counter()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return {}
    for tid in tids:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            comm = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        used = int(fields[11]) + int(fields[12])
        role = "main" if tid == str(pid) else ("io" if comm.startswith("ZMQbg/IO") else "other")
        ticks[role] += used
    return dict(ticks)


def cpu_percent(before: dict[str, int], after: dict[str, int], seconds: float) -> dict[str, float]:
    hz = os.sysconf("SC_CLK_TCK")
    out = {role: round(100.0 * (after.get(role, 0) - before.get(role, 0)) / hz / seconds, 1)
           for role in ("main", "io")}
    out["total"] = round(100.0 * (sum(after.values()) - sum(before.values())) / hz / seconds, 1)
    return out


def listen_overflows() -> int:
    """System-wide count of connections dropped because a listen queue was full (Linux)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return -1
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        names, nums = head.split(), values.split()
        if names and names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(nums[names.index("ListenOverflows")])
    return -1


def percentiles(samples_ns: list[int] | array.array) -> dict[str, float | int | None]:
    data = sorted(samples_ns)
    n = len(data)
    if not n:
        return {"samples": 0, "p50_ms": None, "p99_ms": None, "p999_ms": None, "max_ms": None}

    def at(q: float) -> float:
        return round(data[min(n - 1, int(q * n))] / 1e6, 3)

    return {"samples": n, "p50_ms": at(0.50), "p99_ms": at(0.99), "p999_ms": at(0.999),
            "max_ms": round(data[-1] / 1e6, 3)}


# --- the two systems under test --------------------------------------------------------

BROKER_LAUNCHER = r"""
import ctypes, logging, resource, signal, sys
from pathlib import Path
try:
    ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
except (OSError, AttributeError):
    pass
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
from zchat.broker import BrokerSettings, serve
from zchat.core import Limits
from zchat.endpoints import Endpoints
logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                    format="%(asctime)s %(levelname)s %(name)s: %(message)s")
port, pub_port, config_dir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
limits = Limits(rate_burst=10**9, rate_per_second=1e9)  # benchmark only: no per-sender rate limit
sys.exit(serve(BrokerSettings(endpoints=Endpoints(port=port, pub_port=pub_port),
                              config_dir=config_dir, limits=limits)))
"""


class ServiceDied(RuntimeError):
    """The system under test exited during a measurement (e.g. a libzmq assertion)."""

    def __init__(self, svc: Service, detail: str = "") -> None:
        self.log_tail = svc.log_path.read_text(errors="replace")[-1500:]
        self.exit_code = svc.proc.poll()
        super().__init__(f"{svc.name} died (exit {self.exit_code}){': ' + detail if detail else ''}\n"
                         f"--- log tail ---\n{self.log_tail}")


class Service:
    """The zchat broker or the C proxy, running as a separate process on loopback."""

    def __init__(self, kind: str, workdir: Path, broker_args: list[str] | None = None,
                 label: str | None = None) -> None:
        """zchat: `python -m zchat broker ... ARGS` when `broker_args` is a list, else the launcher."""
        self.kind = kind
        self.label = label or kind
        self.port, self.pub_port = free_port(), free_port()
        self.input = f"tcp://127.0.0.1:{self.port}"
        self.publish = f"tcp://127.0.0.1:{self.pub_port}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=workdir))
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        env = dict(os.environ, PYTHONPATH=path)
        ports = [str(self.port), str(self.pub_port)]
        if kind == "zchat":
            if broker_args is not None:
                argv = [sys.executable, "-m", "zchat", "broker", "--port", ports[0], "--pub-port", ports[1],
                        "--config-dir", str(self.dir), *broker_args]
            else:
                argv = [sys.executable, "-c", BROKER_LAUNCHER, *ports, str(self.dir)]
            ready = "Server started"
        else:
            public, secret = zmq.curve_keypair()
            self.server_key = public
            argv = [sys.executable, str(Path(__file__).resolve()), "_proxy", *ports,
                    public.decode(), secret.decode()]
            ready = "proxy ready"
        self.log_path = self.dir / "service.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        CHILDREN.append(self.proc)
        deadline = time.monotonic() + 15
        while ready not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{kind} did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)
        if kind == "zchat":
            self.server_key = keys.load_public(keys.broker_public_key_path(self.dir))
        self.name = f"zchat broker ({self.label})" if kind == "zchat" else "C zmq.proxy"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, graceful: bool = True) -> None:
        if self.proc.poll() is None:
            if graceful and self.kind == "zchat":
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(3)
                except subprocess.TimeoutExpired:
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def proxy_main(port: str, pub_port: str, public: str, secret: str) -> None:
    """The baseline: C zmq.proxy from a CURVE PULL to a CURVE PUB, ZAP handler first."""
    die_with_parent()
    raise_nofile()
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.linger = 0
    zap.bind("inproc://zeromq.zap.01")

    def serve_zap() -> None:
        while True:
            try:
                zap.send_multipart(zap_reply(zap.recv_multipart()))
            except zmq.ZMQError:
                return

    threading.Thread(target=serve_zap, daemon=True).start()

    def server(kind: int) -> zmq.Socket:
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_publickey = public.encode()
        sock.curve_secretkey = secret.encode()
        sock.zap_domain = b"bench"
        sock.handshake_ivl = L.HANDSHAKE_IVL_MS
        if hasattr(L, "TCP_MAXRT_MS"):  # as the broker: no ZMTP heartbeats, the kernel finds dead peers
            sock.tcp_keepalive = 1
            sock.setsockopt(zmq.TCP_MAXRT, L.TCP_MAXRT_MS)
        else:
            sock.heartbeat_ivl = L.ZMQ_HEARTBEAT_IVL_MS
            sock.heartbeat_timeout = L.ZMQ_HEARTBEAT_TIMEOUT_MS
        sock.backlog = L.LISTEN_BACKLOG  # as the broker's: thousands connecting must not overflow it
        return sock

    frontend = server(zmq.PULL)
    frontend.rcvhwm = L.PULL_RCVHWM
    frontend.maxmsgsize = L.MAX_FRAME_BYTES
    backend = server(zmq.PUB)
    backend.sndhwm = L.XPUB_SNDHWM
    frontend.bind(f"tcp://127.0.0.1:{port}")
    backend.bind(f"tcp://127.0.0.1:{pub_port}")
    print("proxy ready", flush=True)
    while True:
        try:
            zmq.proxy(frontend, backend)
        except zmq.Again:
            # libzmq's proxy can give up with EAGAIN (libzmq#1653; seen here with 1,000 CURVE
            # clients connecting at once): carry on, as a real forwarder would.
            continue


# --- clients of either system ----------------------------------------------------------------


def curve_client(ctx: zmq.Context, kind: int, server_key: bytes, public: bytes, secret: bytes) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.curve_serverkey = server_key
    sock.curve_publickey = public
    sock.curve_secretkey = secret
    sock.heartbeat_ivl = L.ZMQ_HEARTBEAT_IVL_MS
    sock.heartbeat_timeout = L.ZMQ_HEARTBEAT_TIMEOUT_MS
    return sock


class Member:
    """One zchat client as raw sockets: a CURVE PUSH + SUB pair with its own key."""

    __slots__ = ("sub", "push", "identity", "utopic", "welcome", "join", "t_start", "next_join",
                 "joined_ns", "error", "box", "secret", "join_wait")

    def __init__(self, ctx: zmq.Context, svc: dict, name: str, rooms: list[str],
                 extra_topics: tuple[bytes, ...] = ()) -> None:
        public, secret = zmq.curve_keypair()
        self.identity = keys.identity_of(public)
        self.utopic = f"u/{self.identity}/".encode()
        self.welcome = self.utopic + b' {"type":"welcome"'
        self.box = box_for(secret, svc.get("box_key", svc["key"]))  # opens our sealed private stream
        self.secret = secret  # for end-to-end private messages (zchat.e2e), made when needed
        self.sub = curve_client(ctx, zmq.SUB, svc["key"], public, secret)
        self.sub.linger = 0
        for topic in [b"sys/", self.utopic, *(f"r/{r}/".encode() for r in rooms), *extra_topics]:
            self.sub.subscribe(topic)
        self.push = curve_client(ctx, zmq.PUSH, svc["key"], public, secret)
        self.push.sndhwm = L.CLIENT_SNDHWM
        self.push.linger = 2000  # let queued messages reach the broker when closing
        self.join = json.dumps({"type": "join", "name": name, "rooms": rooms}).encode()
        self.t_start = mono()
        self.sub.connect(svc["publish"])
        self.push.connect(svc["input"])
        self.next_join = 0
        self.join_wait = JOIN_RETRY_NS
        self.joined_ns = 0
        self.error = ""

    def send_join(self, now: int) -> None:
        try:
            self.push.send(self.join, zmq.NOBLOCK)
        except zmq.Again:
            pass
        self.next_join = now + self.join_wait  # backing off as the client library does
        self.join_wait = min(JOIN_RETRY_MAX_NS, 2 * self.join_wait)

    def ping(self) -> None:
        try:
            self.push.send(PING, zmq.NOBLOCK)
        except zmq.Again:
            pass

    def drain(self) -> None:
        while True:
            try:
                self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return

    def check(self) -> bool:
        """Drain the SUB; True once the welcome (or a join error) arrived."""
        while True:
            try:
                data = self.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return False
            data = self.readable(data)
            if data.startswith(self.welcome):
                self.joined_ns = mono()
                return True
            if data.startswith(self.utopic) and b'"type":"error"' in data:
                code = data.split(b'"code":"', 1)[-1].split(b'"', 1)[0].decode()
                if code in ("name_taken", "invalid_name", "invalid_room"):
                    self.error = code
                    return True

    def readable(self, data: bytes) -> bytes:
        """A u/ publication opened with our key; anything else as it is (an older broker's
        private events are in clear: kept as they are, so it can still be measured)."""
        try:
            return open_publication(self.box, data)
        except SealError:
            return data

    def close(self) -> None:
        self.sub.close(0)
        self.push.close()


def join_members(ctx: zmq.Context, svc: dict, specs: list[tuple[str, list[str], tuple[bytes, ...]]],
                 window: int = JOIN_WINDOW, timeout: float = 120.0) -> tuple[list[Member], list[float], int]:
    """Join many members, `window` handshakes in flight; returns (members, join ms, failures).

    Each join is resent until its welcome arrives, after 200 ms, then backing off (doubling up
    to JOIN_RETRY_MAX) as the client library does.
    Members already joined are pinged meanwhile so the broker does not time them out.
    """
    members: list[Member] = []
    joined: list[Member] = []
    join_ms: list[float] = []
    failed = 0
    pending: dict[zmq.Socket, Member] = {}
    poller = zmq.Poller()
    todo = iter(specs)
    exhausted = False
    deadline = mono() + int(timeout * 1e9)
    next_ping = mono() + PING_INTERVAL_NS
    while True:
        while not exhausted and len(pending) < window:
            spec = next(todo, None)
            if spec is None:
                exhausted = True
                break
            m = Member(ctx, svc, *spec)
            members.append(m)
            m.send_join(mono())
            pending[m.sub] = m
            poller.register(m.sub, zmq.POLLIN)
        if exhausted and not pending:
            break
        now = mono()
        if now > deadline:
            failed += len(pending)
            break
        for sock, _ in poller.poll(10):
            m = pending[sock]
            if m.check():
                del pending[sock]
                poller.unregister(sock)
                if m.error:
                    failed += 1
                else:
                    join_ms.append((m.joined_ns - m.t_start) / 1e6)
                    joined.append(m)
        now = mono()
        for m in pending.values():
            if now >= m.next_join:
                m.send_join(now)
        if now >= next_ping:
            for m in joined:
                m.ping()
            next_ping = now + PING_INTERVAL_NS
    return members, join_ms, failed


# --- throughput and latency flows: senders -> system -> subscribers ------------------------------


def sender_proc(svc: dict, kind: str, name: str, idx: int, rate: float | None, snd_ready, sub_ready,
                n_sub_procs: int, go, times, drained, results) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.Context()
    member = None
    if kind == "zchat":
        members, _, failed = join_members(ctx, svc, [(name, [ROOM], ())], timeout=30)
        member = members[0]
        if failed:
            raise RuntimeError(f"{name} could not join: {member.error or 'timeout'}")
        member.sub.unsubscribe(TOPIC)  # a send-only member: no echo of the room (see README)
        push = member.push
        prefix = say_prefix(ROOM)
    else:
        public, secret = zmq.curve_keypair()
        push = curve_client(ctx, zmq.PUSH, svc["key"], public, secret)
        push.sndhwm = L.CLIENT_SNDHWM
        push.linger = 2000
        push.connect(svc["input"])
        prefix = pub_prefix(ROOM)
    with snd_ready.get_lock():
        snd_ready.value += 1
    probe = prefix + b"%020d" % 0 + SAY_SUFFIX
    next_ping = 0.0
    while not go.wait(0.02):  # probe until every subscriber hears us; keep our membership alive
        if idx == 0 and sub_ready.value < n_sub_procs:
            push.send(probe)
        if member is not None and time.monotonic() >= next_ping:
            member.ping()
            next_ping = time.monotonic() + 0.5
    t0, w0, w1, stop = times[:]
    sleep_until(t0)
    sent = 0
    at_w0 = at_w1 = -1
    send = push.send
    skipped = 0
    if rate is None:  # flat out: the PUSH blocks at its high-water mark
        body = prefix + b"%020d" % 1 + SAY_SUFFIX
        while True:
            for _ in range(64):
                send(body)
            sent += 64
            now = mono()
            if at_w0 < 0 and now >= w0:
                at_w0 = sent
            if at_w1 < 0 and now >= w1:
                at_w1 = sent
            if now >= stop:
                break
    else:  # open loop at `rate`, timestamp in the text; catch up in bursts after a sleep
        interval = 1e9 / rate
        n = 0
        while True:
            now = mono()
            if at_w0 < 0 and now >= w0:
                at_w0 = sent
            if at_w1 < 0 and now >= w1:
                at_w1 = sent
            if now >= stop:
                break
            due = t0 + int(n * interval)
            if now < due:
                time.sleep((due - now) / 1e9)
                continue
            if now - due > 20_000_000:  # more than 20 ms behind: drop the missed slots
                missed = int((now - t0) / interval) - n
                skipped += missed
                n += missed
            send(prefix + b"%020d" % mono() + SAY_SUFFIX)
            sent += 1
            n += 1
    if drained is not None:
        # Stay connected until the subscribers have heard everything: closing while the system
        # still holds a backlog of our messages (in the TCP buffers) would throw that backlog away.
        next_ping = 0.0
        while not drained.wait(0.1):
            if member is not None and time.monotonic() >= next_ping:
                member.ping()
                next_ping = time.monotonic() + 0.5
    errors: Counter[str] = Counter()
    if member is not None:  # anything the broker said to us privately (e.g. rate_limited)
        while True:
            try:
                data = member.sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            data = member.readable(data)
            if data.startswith(member.utopic) and b'"type":"error"' in data:
                errors[data.split(b'"code":"', 1)[-1].split(b'"', 1)[0].decode()] += 1
        member.push.send(b'{"type":"leave"}')
    push.close(2000)
    if member is not None:
        member.sub.close(0)
    ctx.term()
    results.put({"role": "sender", "sent": sent, "window": max(0, at_w1 - at_w0), "skipped": skipped,
                 "errors": dict(errors)})


def subscriber_proc(svc: dict, n_socks: int, latency: bool, sub_ready, go, times,
                    results) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.Context()
    socks = []
    for _ in range(n_socks):
        public, secret = zmq.curve_keypair()
        sock = curve_client(ctx, zmq.SUB, svc["key"], public, secret)
        sock.linger = 0
        sock.subscribe(TOPIC)
        sock.connect(svc["publish"])
        socks.append(sock)
    poller = zmq.Poller()
    for sock in socks:
        poller.register(sock, zmq.POLLIN)
    waiting = set(socks)
    deadline = time.monotonic() + 30
    while waiting and time.monotonic() < deadline:
        for sock, _ in poller.poll(100):
            while True:
                try:
                    sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
            waiting.discard(sock)
    if waiting:
        raise RuntimeError(f"{len(waiting)} subscriber(s) never received the probe")
    with sub_ready.get_lock():
        sub_ready.value += 1
    go.wait(120)
    t0, w0, w1, stop = times[:]
    start = len(TOPIC) + 1
    total = window = 0
    lat = array.array("q")
    size = 0
    last_rx = mono()
    hard_end = stop + 20_000_000_000
    while True:
        ready = poller.poll(50)
        now = mono()
        if not ready:
            if (now > stop and now - last_rx > IDLE_NS) or now > hard_end:
                break
            continue
        for sock, _ in ready:
            for _ in range(2000):
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                now = mono()
                if now < t0 or not data.startswith(MESSAGE_MARK, start):
                    continue
                total += 1
                size = len(data)
                if w0 <= now < w1:
                    window += 1
                    if latency:
                        ts = text_ts(data, start)
                        if ts:
                            lat.append(now - ts)
        last_rx = now
        if now > hard_end:
            break
    ctx.destroy(0)
    results.put({"role": "sub", "sockets": n_socks, "total": total, "window": window,
                 "lat": lat.tobytes(), "frame_bytes": size})


def run_flow(svc: Service, n_senders: int, n_subs: int, warmup: float, duration: float,
             rate: float | None = None, on_window=None,  # type: ignore[no-untyped-def]
             abrupt: bool = False) -> dict:
    """One measurement: subscribers up, senders joined, then a timed window."""
    run_flow.counter = getattr(run_flow, "counter", 0) + 1  # type: ignore[attr-defined]
    spec = {"key": svc.server_key, "input": svc.input, "publish": svc.publish}
    sub_ready, snd_ready = MP.Value("i", 0), MP.Value("i", 0)
    times = MP.Array("q", 4)
    go = MP.Event()
    drained = MP.Event()
    results = MP.Queue()
    groups = [min(SUBS_PER_PROCESS, n_subs - i) for i in range(0, n_subs, SUBS_PER_PROCESS)]
    procs = [spawn(subscriber_proc, spec, g, rate is not None, sub_ready, go, times, results) for g in groups]
    per_sender = None if rate is None else rate / n_senders
    procs += [spawn(sender_proc, spec, svc.kind, f"s{run_flow.counter}x{i}", i, per_sender,  # type: ignore[attr-defined]
                    snd_ready, sub_ready, len(groups), go, times, None if abrupt else drained, results)
              for i in range(n_senders)]
    try:
        wait_value(snd_ready, n_senders, 60, procs, results)
        wait_value(sub_ready, len(groups), 60, procs, results)
        _, w1 = start_window(times, go, warmup, duration)
        cpu0 = thread_ticks(svc.pid)
        gen0 = [thread_ticks(p.pid) for p in procs]
        if on_window is not None:
            on_window()
        sleep_until(w1)
        cpu1 = thread_ticks(svc.pid)
        gen_cpu = round(sum(cpu_percent(g0, thread_ticks(p.pid), duration)["total"]
                            for g0, p in zip(gen0, procs, strict=True)))
        outs: list[dict] = []
        while sum(o["role"] == "sub" for o in outs) < len(groups):  # subscribers stop when idle
            outs += collect(results, 1, 60 + duration, procs)
        drained.set()  # now the senders may leave
        outs += collect(results, len(procs) - len(outs), 60, procs)
    except RuntimeError as exc:
        if not svc.alive():
            raise ServiceDied(svc, str(exc).splitlines()[0]) from None
        tail = svc.log_path.read_text()[-3000:]
        raise RuntimeError(f"{exc}\n--- {svc.name} log (tail) ---\n{tail}") from None
    finally:
        reap(procs, 10)
    senders = [o for o in outs if o["role"] == "sender"]
    subs = [o for o in outs if o["role"] == "sub"]
    sent = sum(o["sent"] for o in senders)
    received = sum(o["total"] for o in subs)
    lat = array.array("q")
    for o in subs:
        lat.frombytes(o["lat"])
    errors: Counter[str] = Counter()
    for o in senders:
        errors.update(o["errors"])
    result = {
        "system": svc.label, "senders": n_senders, "subscribers": n_subs, "offered": rate,
        "in_per_s": round(sum(o["window"] for o in senders) / duration),
        "out_per_s": round(sum(o["window"] for o in subs) / duration),
        "sent": sent, "delivered": received,
        "loss": round(max(0.0, 1.0 - received / (sent * n_subs)), 4) if sent else None,
        "skipped": sum(o["skipped"] for o in senders),
        "frame_bytes_out": max(o["frame_bytes"] for o in subs),
        "cpu": cpu_percent(cpu0, cpu1, duration), "generators_cpu": gen_cpu, "errors": dict(errors),
    }
    if rate is not None:
        result.update(percentiles(lat))
    if not svc.alive():
        raise ServiceDied(svc, "during the run")
    return result


# --- scale: many joined clients ------------------------------------------------------------------


def scale_gen_proc(svc: dict, gen: int, first: int, count: int, join_timeout: float, armed, fire_ready,
                   stop, results) -> None:  # type: ignore[no-untyped-def]
    raise_nofile()
    ctx = zmq.Context()
    ctx.max_sockets = 2 * count + 64
    specs = [(f"g{gen}c{i}", [f"s{(first + i) // SCALE_ROOM_SIZE}"], (b"r/all/",)) for i in range(count)]
    t_begin = mono()
    members, join_ms, failed = join_members(ctx, svc, specs, timeout=join_timeout)
    joined = [m for m in members if m.joined_ns and not m.error]
    for m in members:  # given up on: gone, not left to reconnect each time the broker cuts them
        if not m.joined_ns or m.error:
            m.sub.close(0)
            m.push.close(0)
    members = joined
    results.put({"role": "joined", "gen": gen, "join_ms": join_ms, "joined": len(joined),
                 "not_joined": count - len(joined), "seconds": (mono() - t_begin) / 1e9})
    next_ping = 0
    while not armed.wait(0.05):
        if mono() >= next_ping:
            for m in joined:
                m.ping()
            next_ping = mono() + PING_INTERVAL_NS
    poller = zmq.Poller()
    by_sock = {}
    for m in joined:
        poller.register(m.sub, zmq.POLLIN)
        by_sock[m.sub] = m
    for m in joined:  # drain heartbeats and notices queued so far
        m.drain()
    with fire_ready.get_lock():
        fire_ready.value += 1
    got: dict[zmq.Socket, int] = {}
    deadline = mono() + 30_000_000_000
    while len(got) < len(joined) and mono() < deadline and not stop.is_set():
        for sock, _ in poller.poll(20):
            while True:
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if data.startswith(b"r/all/ ") and sock not in got:
                    ts = text_ts(data, 7)
                    if ts:
                        got[sock] = mono() - ts
        if mono() >= next_ping:
            for m in joined:
                m.ping()
            next_ping = mono() + PING_INTERVAL_NS
    results.put({"role": "probe", "gen": gen, "received": len(got), "lat": list(got.values())})
    while not stop.wait(0.05):
        if mono() >= next_ping:
            for m in joined:
                m.ping()
            next_ping = mono() + PING_INTERVAL_NS
    for m in members:
        m.sub.close(0)
        m.push.close(0)
    ctx.term()


def prober_proc(svc: dict, fire, results) -> None:  # type: ignore[no-untyped-def]
    ctx = zmq.Context()
    members, _, failed = join_members(ctx, svc, [("prober", ["all"], ())], timeout=PROBER_JOIN_TIMEOUT)
    member = members[0]
    results.put({"role": "prober_ready", "ok": not failed})
    if failed:
        member.close()
        ctx.term()
        return
    while not fire.wait(0.2):
        member.ping()
    member.push.send(say_prefix("all") + b"%020d" % mono() + b"|PROBE" + b'"}')
    results.put({"role": "fired"})
    time.sleep(1)
    member.close()
    ctx.term()


PROBER_JOIN_TIMEOUT = 30.0


def split_clients(n: int, per_generator: int = CLIENTS_PER_GENERATOR) -> tuple[list[int], list[int]]:
    """Spread `n` clients over generator processes: each one's first client index and count."""
    gens = math.ceil(n / per_generator)
    sizes = [n // gens + (1 if g < n % gens else 0) for g in range(gens)]
    return [sum(sizes[:g]) for g in range(gens)], sizes


def run_scale(workdir: Path, asked: int, broker_args: list[str] | None, join_timeout: float) -> dict:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fit = scale_fit(hard)
    n = min(asked, fit)
    armed, stop, fire = MP.Event(), MP.Event(), MP.Event()
    fire_ready = MP.Value("i", 0)
    results = MP.Queue()
    svc = Service("zchat", workdir, broker_args)
    procs: list = []
    try:
        time.sleep(1.0)
        rss0, fds0 = vmrss_kb(svc.pid), fd_count(svc.pid)
        spec = {"key": svc.server_key, "input": svc.input, "publish": svc.publish}
        firsts, sizes = split_clients(n)
        gens = len(sizes)
        t_begin = time.monotonic()
        overflows0 = listen_overflows()
        procs = [spawn(scale_gen_proc, spec, g, firsts[g], sizes[g], join_timeout, armed, fire_ready, stop,
                       results) for g in range(gens)]
        joined = collect(results, gens, join_timeout + 60, procs)
        join_wall = time.monotonic() - t_begin
        overflows = listen_overflows() - overflows0
        join_ms = sorted(x for o in joined for x in o["join_ms"])
        members = sum(o["joined"] for o in joined)
        # Settle: pings flowing, nothing joining. After thousands of joins the broker works off
        # a tail (the last welcomes, notices and history pages) for several seconds.
        time.sleep(SCALE_SETTLE)
        rss1, fds1 = vmrss_kb(svc.pid), fd_count(svc.pid)
        connected = max(0, (fds1 - fds0) // 2)  # two TCP connections per client
        cpu0 = thread_ticks(svc.pid)
        gen0 = [thread_ticks(p.pid) for p in procs]
        time.sleep(IDLE_WINDOW)
        idle_cpu = cpu_percent(cpu0, thread_ticks(svc.pid), IDLE_WINDOW)
        gen_cpu = round(sum(cpu_percent(g0, thread_ticks(p.pid), IDLE_WINDOW)["total"]
                            for g0, p in zip(gen0, procs, strict=True)))
        procs.append(spawn(prober_proc, spec, fire, results))
        prober = collect(results, 1, PROBER_JOIN_TIMEOUT + 30, procs)[0]
        armed.set()
        probe_error = None
        if prober["ok"]:
            wait_value(fire_ready, gens, 60, procs, results)
            fire.set()
            outs = collect(results, gens + 1, 60, procs)
        else:  # the broker is too busy to admit one more member: report, do not hang
            probe_error = f"the prober could not join within {PROBER_JOIN_TIMEOUT:.0f} s"
            stop.set()
            outs = collect(results, gens, 60, procs)
        probe = [o for o in outs if o["role"] == "probe"]
        delivered = sum(o["received"] for o in probe)
        lat = [x for o in probe for x in o["lat"]]
        result = {
            "asked": asked, "clients": n, "joined": members, "not_joined": n - members,
            "connected": connected, "generators": gens, "fd_limit": hard, "fit": fit,
            "join_timeout_s": join_timeout,
            "join_p50_ms": round(pct(join_ms, 0.5), 1), "join_p99_ms": round(pct(join_ms, 0.99), 1),
            "join_wall_s": round(join_wall, 2), "listen_overflows": overflows,
            "rss_before_kb": rss0, "rss_after_kb": rss1, "fds_before": fds0, "fds_after": fds1,
            "rss_per_client_kb": round((rss1 - rss0) / max(1, connected), 1),
            "idle_cpu": idle_cpu, "generators_cpu": gen_cpu,
            "probe_delivered": delivered, "probe_expected": members, "probe_error": probe_error,
            "probe": percentiles(lat),
        }
        if not svc.alive():
            raise ServiceDied(svc, "during the run")
        return result
    finally:
        svc.stop(graceful=False)
        stop.set()
        reap(procs, 20)


def floor_gen_proc(svc: dict, count: int, first: int, connected, stop) -> None:  # type: ignore[no-untyped-def]
    """Client socket pairs like the scale test's (same keys, options and subscriptions), with no
    join: what the C proxy holds for them is libzmq's own cost per client."""
    raise_nofile()
    ctx = zmq.Context()
    ctx.max_sockets = 2 * count + 64
    pairs = []
    for i in range(count):
        if i % FLOOR_CONNECT_BATCH == 0:
            time.sleep(FLOOR_CONNECT_PAUSE)  # paced, as joins are: no SYN flood past the listen queue
        public, secret = zmq.curve_keypair()
        sub = curve_client(ctx, zmq.SUB, svc["key"], public, secret)
        sub.linger = 0
        utopic = f"u/{keys.identity_of(public)}/".encode()
        for topic in (b"sys/", utopic, f"r/s{(first + i) // SCALE_ROOM_SIZE}/".encode(), b"r/all/"):
            sub.subscribe(topic)
        push = curve_client(ctx, zmq.PUSH, svc["key"], public, secret)
        push.sndhwm = L.CLIENT_SNDHWM
        push.linger = 0
        sub.connect(svc["publish"])
        push.connect(svc["input"])
        pairs.append((sub, push))
    with connected.get_lock():
        connected.value += 1
    while not stop.wait(L.CLIENT_PING_INTERVAL):  # pings, as the clients of the scale test send them
        for _, push in pairs:
            try:
                push.send(PING, zmq.NOBLOCK)
            except zmq.Again:
                pass
    for sub, push in pairs:
        sub.close(0)
        push.close(0)
    ctx.term()


def scale_fit(hard: int) -> int:
    """Clients (two connections each) one broker can hold under descriptor limit `hard`:
    the broker admits RLIMIT_NOFILE - FD_RESERVE connections (zchat.broker.connection_cap)."""
    cap = max(hard - L.FD_RESERVE, hard // 2) // 2 - 1  # and room for the prober, one more client
    return min((hard - BROKER_FD_HEADROOM) // 2, cap)


FLOOR_CONNECT_BATCH = 50  # floor: client pairs connected at once per generator...
FLOOR_CONNECT_PAUSE = 0.1  # ...then this pause (4 generators: 2,000 pairs a second at most)


def run_floor(workdir: Path, asked: int) -> dict:
    """libzmq's floor: the C proxy's RSS growth per client holding `asked` CURVE connection pairs."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = min(asked, scale_fit(hard))
    stop = MP.Event()
    connected = MP.Value("i", 0)
    svc = Service("proxy", workdir)
    procs: list = []
    try:
        time.sleep(1.0)
        rss0, fds0 = vmrss_kb(svc.pid), fd_count(svc.pid)
        spec = {"key": svc.server_key, "input": svc.input, "publish": svc.publish}
        procs = [spawn(floor_gen_proc, spec, size, first, connected, stop)
                 for first, size in zip(*split_clients(n), strict=True)]
        deadline = time.monotonic() + 120
        while fd_count(svc.pid) < fds0 + 2 * n and time.monotonic() < deadline:
            time.sleep(0.2)  # every connection accepted (handshakes done or not: RSS below waits)
        time.sleep(2.0 + L.CLIENT_PING_INTERVAL)  # handshakes finish, pings and subscriptions flow
        rss1, fds1 = vmrss_kb(svc.pid), fd_count(svc.pid)
        conn = max(0, (fds1 - fds0) // 2)
        return {"clients": n, "connected": conn, "rss_before_kb": rss0, "rss_after_kb": rss1,
                "rss_per_client_kb": round((rss1 - rss0) / max(1, conn), 1)}
    finally:
        stop.set()
        reap(procs, 20)
        svc.stop(graceful=False)


def pct(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


# --- a chatty room: N members, each saying 1 msg/s -------------------------------------------------


def chatty_gen_proc(svc: dict, gen: int, first: int, count: int, total_n: int, joined_count, go, times,
                    results) -> None:  # type: ignore[no-untyped-def]
    raise_nofile()
    ctx = zmq.Context()
    ctx.max_sockets = 2 * count + 64
    specs = [(f"c{gen}x{i}", ["chat"], ()) for i in range(count)]
    members, join_ms, failed = join_members(ctx, svc, specs, timeout=120)
    joined = [m for m in members if m.joined_ns and not m.error]
    with joined_count.get_lock():
        joined_count.value += 1
    next_ping = 0
    while not go.wait(0.05):
        if mono() >= next_ping:
            for m in joined:
                m.ping()
            next_ping = mono() + PING_INTERVAL_NS
    t0, w0, w1, stop = times[:]
    prefix = say_prefix("chat")
    # Member i says something every second at phase (first + i) / N of the second.
    schedule = [(t0 + (first + i) * 1_000_000_000 // total_n, i) for i in range(len(joined))]
    heapq.heapify(schedule)
    poller = zmq.Poller()
    for m in joined:
        poller.register(m.sub, zmq.POLLIN)
    sent = sent_window = total = window = 0
    lat = array.array("q")
    start = len(b"r/chat/ ")
    last_rx = mono()
    hard_end = stop + 5_000_000_000
    while True:
        now = mono()
        while schedule and schedule[0][0] <= now and now < stop:
            due, i = heapq.heappop(schedule)
            try:
                joined[i].push.send(prefix + b"%020d" % mono() + SAY_SUFFIX, zmq.NOBLOCK)
                sent += 1
                if w0 <= now < w1:
                    sent_window += 1
            except zmq.Again:
                pass
            heapq.heappush(schedule, (due + 1_000_000_000, i))
        wait_ms = 5 if not schedule or now >= stop else max(0, min(5, (schedule[0][0] - now) // 1_000_000))
        ready = poller.poll(wait_ms)
        now = mono()
        if not ready:
            if (now > stop and now - last_rx > IDLE_NS) or now > hard_end:
                break
            continue
        last_rx = now
        for sock, _ in ready:
            for _ in range(1000):
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if not data.startswith(MESSAGE_MARK, start):
                    continue
                now = mono()
                if now < t0:
                    continue
                total += 1
                if w0 <= now < w1:
                    window += 1
                    ts = text_ts(data, start)
                    if ts:
                        lat.append(now - ts)
        if now > hard_end:
            break
    results.put({"gen": gen, "joined": len(joined), "failed": failed, "join_ms": join_ms, "sent": sent,
                 "sent_window": sent_window, "total": total, "window": window, "lat": lat.tobytes()})
    for m in members:
        m.sub.close(0)
        m.push.close(0)
    ctx.term()


def run_chatty(workdir: Path, n: int, warmup: float, duration: float, broker_args: list[str] | None) -> dict:
    svc = Service("zchat", workdir, broker_args)
    procs: list = []
    try:
        spec = {"key": svc.server_key, "input": svc.input, "publish": svc.publish}
        firsts, sizes = split_clients(n, per_generator=n if n < 200 else math.ceil(n / 2))  # 1 or 2 processes
        gens = len(sizes)
        joined_count = MP.Value("i", 0)
        go = MP.Event()
        times = MP.Array("q", 4)
        results = MP.Queue()
        t_begin = time.monotonic()
        procs = [spawn(chatty_gen_proc, spec, g, firsts[g], sizes[g], n, joined_count, go, times, results)
                 for g in range(gens)]
        wait_value(joined_count, gens, 180, procs, results)
        join_wall = time.monotonic() - t_begin
        _, w1 = start_window(times, go, warmup, duration)
        cpu0 = thread_ticks(svc.pid)
        gen0 = [thread_ticks(p.pid) for p in procs]
        sleep_until(w1)
        cpu1 = thread_ticks(svc.pid)
        gen_cpu = round(sum(cpu_percent(g0, thread_ticks(p.pid), duration)["total"]
                            for g0, p in zip(gen0, procs, strict=True)))
        outs = collect(results, gens, 60 + duration, procs)
        members = sum(o["joined"] for o in outs)
        lat = array.array("q")
        for o in outs:
            lat.frombytes(o["lat"])
        sent = sum(o["sent"] for o in outs)
        received = sum(o["total"] for o in outs)
        join_ms = sorted(x for o in outs for x in o["join_ms"])
        result = {
            "n": n, "joined": members, "join_wall_s": round(join_wall, 2),
            "join_p50_ms": round(pct(join_ms, 0.5), 1), "join_p99_ms": round(pct(join_ms, 0.99), 1),
            "sent_per_s": round(sum(o["sent_window"] for o in outs) / duration),
            "expected_per_s": round(sum(o["sent_window"] for o in outs) / duration * members),
            "deliveries_per_s": round(sum(o["window"] for o in outs) / duration),
            "loss": round(max(0.0, 1 - received / (sent * members)), 4) if sent and members else None,
            "cpu": cpu_percent(cpu0, cpu1, duration), "generators": gens, "generators_cpu": gen_cpu,
        }
        result.update(percentiles(lat))
        if not svc.alive():
            raise ServiceDied(svc, "during the run")
        return result
    finally:
        svc.stop(graceful=False)
        reap(procs, 10)


# --- the real client library: start() + join() -----------------------------------------------------


def chatclient_proc(svc: dict, count: int, results) -> None:  # type: ignore[no-untyped-def]
    from zchat.client import ChatClient, ClientSettings
    from zchat.endpoints import Endpoints

    endpoints = Endpoints(port=svc["port"], pub_port=svc["pub_port"])
    times = []
    for i in range(count):
        public, secret = zmq.curve_keypair()
        settings = ClientSettings(endpoints=endpoints, server_key=svc["key"],
                                  keypair=keys.KeyPair(public, secret))
        t = time.perf_counter()
        client = ChatClient(settings)
        client.start()
        client.join(f"j{i}", timeout=10)
        times.append((time.perf_counter() - t) * 1000)
        client.close(linger=0.2)
    results.put({"join_ms": times})


def run_joins(workdir: Path, count: int, broker_args: list[str]) -> dict:
    svc = Service("zchat", workdir, broker_args)  # the stock broker: joins need no tuning
    procs: list = []
    try:
        results = MP.Queue()
        spec = {"key": svc.server_key, "port": svc.port, "pub_port": svc.pub_port}
        procs = [spawn(chatclient_proc, spec, count, results)]
        out = collect(results, 1, 30 + count * 5, procs)[0]
        ms = sorted(out["join_ms"])
        return {"count": len(ms), "median_ms": round(pct(ms, 0.5), 1), "p90_ms": round(pct(ms, 0.9), 1),
                "min_ms": round(ms[0], 1), "max_ms": round(ms[-1], 1), "all_ms": [round(x, 2) for x in ms]}
    finally:
        svc.stop()
        reap(procs, 10)


# --- what sealing costs: per private event, and private messages through the broker ----------------


def measure_seal_micro(count: int) -> dict:
    """Per private event, in one process: the broker's encode alone vs encode + seal (what the
    dispatcher does for every u/ publication), a recipient opening one, and a new recipient's box."""
    import msgspec

    from zchat.protocol import Direct, private_topic
    from zchat.sealing import BoxCache

    encode = msgspec.json.Encoder().encode
    broker_public, broker_secret = zmq.curve_keypair()
    public, secret = zmq.curve_keypair()
    topic = private_topic(keys.identity_of(public))
    # A private message as it travels since end-to-end encryption: its text sealed by the sender.
    sender, recipient = Keyring(key_bytes(zmq.curve_keypair()[1])), keys.identity_of(public)
    text = "x" * TEXT_BYTES
    dm_box, _ = sender.seal_for(recipient, text)
    event = Direct(seq=123456, ts=time.time(), name="bob", to="alice", from_=sender.identity, box=dm_box)
    boxes = BoxCache(broker_secret)
    frame = boxes.seal_publication(topic, encode(event))  # the recipient's box is kept from here on
    box = box_for(secret, broker_public)

    def per_event_us(work: Callable[[], object], n: int) -> float:
        t = time.perf_counter_ns()
        for _ in range(n):
            work()
        return round((time.perf_counter_ns() - t) / n / 1000, 2)

    plain_us = per_event_us(lambda: topic.encode() + b" " + encode(event), count)
    sealed_us = per_event_us(lambda: boxes.seal_publication(topic, encode(event)), count)
    open_us = per_event_us(lambda: open_publication(box, frame), count)
    fresh = [keys.identity_of(zmq.curve_keypair()[0]) for _ in range(200)]
    miss_us = per_event_us(lambda: boxes.box(fresh.pop()), len(fresh))
    reader = Keyring(key_bytes(secret))
    e2e_seal_us = per_event_us(lambda: sender.seal_for(recipient, text), count)  # both boxes
    e2e_open_us = per_event_us(lambda: reader.open_from(sender.identity, dm_box), count)
    return {"encode_us": plain_us, "encode_seal_us": sealed_us, "seal_us": round(sealed_us - plain_us, 2),
            "open_us": open_us, "new_box_us": miss_us, "bytes_plain": len(encode(event)),
            "e2e_seal_us": e2e_seal_us, "e2e_open_us": e2e_open_us,
            "bytes_sealed": len(frame) - len(topic) - 1}


def dm_proc(svc: dict, count: int, rate: float | None, results) -> None:  # type: ignore[no-untyped-def]
    """One member sends `count` private messages to another (at `rate` a second, or flat out);
    the recipient opens each and takes its latency from the send time in its text."""
    ctx = zmq.Context()
    to = f"dmto{os.getpid()}"  # names of its own: the last run's members may not be gone yet
    members, _, failed = join_members(ctx, svc, [(f"dmfrom{os.getpid()}", [ROOM], ()), (to, [ROOM], ())],
                                      timeout=30)
    if failed:
        raise RuntimeError(f"the private-message members could not join: {[m.error for m in members]}")
    sender, receiver = members
    # End to end, as a client does it: sealed by the sender to the recipient's key (which a
    # client asks the broker for once; known here) and to itself, opened by the recipient.
    sealer, opener = Keyring(key_bytes(sender.secret)), Keyring(key_bytes(receiver.secret))
    padding = PAD.decode()
    direct = receiver.utopic + b' {"type":"direct"'
    start = len(receiver.utopic) + 1
    lat: list[int] = []
    sealed = 0
    sent = 0
    gap = int(1e9 / rate) if rate else 0
    t0 = next_send = next_ping = mono()
    last_rx = t0
    while len(lat) < count and mono() - last_rx < 2e9:
        now = mono()
        while sent < count and now >= next_send:  # a burst at most, then read
            try:
                box, self_box = sealer.seal_for(receiver.identity, f"{mono():020d}{padding}")
                sender.push.send(json.dumps({"type": "msg", "to": to, "key": receiver.identity, "box": box,
                                             "self_box": self_box}).encode(), zmq.NOBLOCK)
            except zmq.Again:
                break
            sent += 1
            next_send = next_send + gap if gap else now
            if sent % 200 == 0:
                break
        if receiver.sub.poll(1 if sent < count else 100):
            for _ in range(1000):
                try:
                    data = receiver.sub.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                opened = receiver.readable(data)
                if opened.startswith(direct):
                    event = json.loads(opened[start:])
                    lat.append(mono() - int(opener.open_from(event["from"], event["box"])[:20]))
                    sealed += opened is not data
                    last_rx = mono()
        sender.drain()  # its own copies
        if mono() >= next_ping:
            sender.ping()
            receiver.ping()
            next_ping = mono() + PING_INTERVAL_NS
    seconds = (last_rx - t0) / 1e9
    for member in members:
        member.push.send(b'{"type":"leave"}')
        member.close()
    ctx.term()
    results.put({"sent": sent, "delivered": len(lat), "sealed": sealed, "seconds": round(seconds, 3),
                 "dms_per_s": round(len(lat) / seconds, 1) if seconds > 0 else None, **percentiles(lat)})


def run_sealing(workdir: Path, cfg: dict, broker_args: list[str] | None) -> dict:
    out = {"micro": measure_seal_micro(cfg["seal_events"])}
    svc = Service("zchat", workdir, broker_args)
    try:
        for label, rate in (("flat_out", None), ("paced", cfg["seal_rate"])):
            results = MP.Queue()
            spec = {"key": svc.server_key, "input": svc.input, "publish": svc.publish}
            procs = [spawn(dm_proc, spec, cfg["seal_dms"], rate, results)]
            try:
                out[label] = {"offered_per_s": rate, **collect(results, 1, 120, procs)[0]}
            finally:
                reap(procs, 10)
    finally:
        svc.stop()
    return out


def print_sealing(s: dict) -> None:
    m = s["micro"]
    print(f"  sealing, per private event: encode {m['encode_us']} us, encode+seal {m['encode_seal_us']} us "
          f"(+{m['seal_us']} us, {m['bytes_plain']} -> {m['bytes_sealed']} B); open {m['open_us']} us; "
          f"a new recipient's box {m['new_box_us']} us", flush=True)
    print(f"  end to end, per private message: the sender seals both boxes {m['e2e_seal_us']} us, the "
          f"recipient opens one {m['e2e_open_us']} us (client side)", flush=True)
    for label in ("flat_out", "paced"):
        r = s[label]
        offered = "flat out" if r["offered_per_s"] is None else f"offered {fmt_rate(r['offered_per_s'])}/s"
        print(f"  private messages through the broker, {offered}: {fmt_rate(r['dms_per_s'])}/s delivered "
              f"({r['delivered']}/{r['sent']}, {r['sealed']} sealed), p50 {fmt_ms(r['p50_ms'])} "
              f"p99 {fmt_ms(r['p99_ms'])} ms", flush=True)


# --- profile of the broker under load (py-spy) -------------------------------------------------------


PROFILE_SCENARIOS = [  # (label, senders, subscribers, offered msg/s or None for flat out)
    ("flat out, 1 sender x 1 subscriber", 1, 1, None),
    ("10k msg/s, 1 sender x 10 subscribers", 1, LATENCY_SUBSCRIBERS, 10_000),
    ("1k msg/s, 1 sender x 10 subscribers", 1, LATENCY_SUBSCRIBERS, 1_000),
]


def run_profile(svc: Service, duration: float, out_path: Path, label: str, senders: int, subs: int,
                rate: float | None) -> dict:
    """py-spy on the broker's main thread during one flow: raw stacks (with native frames) + an SVG."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {"label": label, "error": "py-spy not found (pip install py-spy)"}
    raw = out_path.with_suffix(".txt")
    svg = out_path.with_suffix(".svg")
    spies: list[subprocess.Popen] = []
    common = [pyspy, "record", "--pid", str(svc.pid), "--duration", str(int(duration)), "--rate", "100",
              "--idle", "--threads"]

    def start() -> None:
        # --native needs py-spy to pause the process for each sample; the SVG sampler does not.
        for extra in (["--native", "--format", "raw", "-o", str(raw)],
                      ["--nonblocking", "--format", "flamegraph", "-o", str(svg)]):
            proc = subprocess.Popen(common + extra, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            CHILDREN.append(proc)
            spies.append(proc)

    flow = run_flow(svc, senders, subs, 0.5, duration + 1.0, rate=rate, on_window=start)
    for proc in spies:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    if not raw.exists():
        err = spies[0].stderr.read().decode() if spies and spies[0].stderr else ""
        return {"label": label, "error": f"py-spy failed: {err.strip()[:500]}"}
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        head, _, rest = stack.partition(";")
        thread = head.rpartition(": ")[2] if head.startswith("thread ") else "?"
        threads[thread] += n
        if thread != "MainThread":  # the broker loop; helper threads are counted, not profiled
            continue
        frames = [f for f in (_frame_name(f) for f in rest.split(";")) if f]
        if not frames:
            continue
        total += n
        self_time[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return {"label": label, "error": "py-spy saw no samples of the main thread"}
    return {
        "label": label, "samples": total, "in_per_s": flow["in_per_s"], "cpu": flow["cpu"],
        "threads": dict(threads), "raw": str(raw), "flamegraph": str(svg),
        "self": [(f, round(100 * c / total, 1)) for f, c in self_time.most_common(15)],
        "inclusive": [(f, round(100 * c / total, 1)) for f, c in inclusive.most_common(30)],
    }


def _frame_name(frame: str) -> str:
    """'func (path/to/file.py:123)' -> 'func (file.py)'; drop the process/thread headers."""
    frame = frame.strip()
    if frame.startswith(("process ", "thread ")):
        return ""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({Path(where).name})" if where else name


# --- output -----------------------------------------------------------------------------------------


def fmt_rate(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x / 1000:.1f}k" if x < 1e6 else f"{x / 1e6:.2f}M"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def fmt_loss(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_report(res: dict, show: bool = True) -> list[str]:
    lines: list[str] = []
    p = lines.append
    meta = res["meta"]
    p(f"zchat benchmark ({meta['mode']}): {meta['cpus']} CPUs, Python {meta['python']}, "
      f"pyzmq {meta['pyzmq']}, libzmq {meta['libzmq']}; CURVE on, text {TEXT_BYTES} B, "
      f"HWM PULL {L.PULL_RCVHWM} / PUB {L.XPUB_SNDHWM} / PUSH {L.CLIENT_SNDHWM} / SUB 1000")
    p(f"  broker: {meta['broker']} (commit {meta.get('git', '?')})")
    p("  CAVEAT: 2-core machine: the system under test, its libzmq I/O thread and every load generator "
      "share the same 2 cores.")
    tp = res.get("throughput", [])
    if tp:
        p("")
        p(f"Throughput ({meta['tp_duration']:g} s window; in = msgs accepted from senders per s, "
          "out = deliveries to subscribers per s)")
        p(f"{'snd':>3} {'subs':>4} | {'proxy in':>9} {'out':>9} {'loss':>6} | {'zchat in':>9} {'out':>9} "
          f"{'loss':>6} | ratio in/out | zchat CPU main/io gens | proxy CPU main/io gens")
        for s, n in THROUGHPUT_CONFIGS:
            px = _find(tp, "proxy", s, n)
            zc = _find(tp, "zchat", s, n)
            if not px or not zc:
                continue
            r_in = zc["in_per_s"] / px["in_per_s"] if px["in_per_s"] else float("nan")
            r_out = zc["out_per_s"] / px["out_per_s"] if px["out_per_s"] else float("nan")
            p(f"{s:>3} {n:>4} | {fmt_rate(px['in_per_s']):>9} {fmt_rate(px['out_per_s']):>9} "
              f"{fmt_loss(px['loss']):>6} | {fmt_rate(zc['in_per_s']):>9} {fmt_rate(zc['out_per_s']):>9} "
              f"{fmt_loss(zc['loss']):>6} | {r_in:5.2f} {r_out:5.2f}  | "
              f"{zc['cpu']['main']:6.0f}% {zc['cpu']['io']:4.0f}% {zc['generators_cpu']:4d}% | "
              f"{px['cpu']['main']:6.0f}% {px['cpu']['io']:4.0f}% {px['generators_cpu']:4d}%")
        px, zc = _find(tp, "proxy", 1, 1), _find(tp, "zchat", 1, 1)
        if px and zc and px["in_per_s"]:
            ratio = zc["in_per_s"] / px["in_per_s"]
            p(f"  target 1x1: in >= {TARGET_1X1_RATIO:.2f}x the proxy (then {STRETCH_1X1_RATIO:.2f}x): "
              f"{ratio:.2f}x, {_verdict(ratio >= TARGET_1X1_RATIO)}"
              f"{'; stretch reached' if ratio >= STRETCH_1X1_RATIO else ''}")
        errs = Counter()
        for r in tp:
            errs.update(r["errors"])
        if errs:
            p(f"  WARNING: the broker answered senders with errors: {dict(errs)} (rate limit still on?)")
        sizes = {r["system"]: r["frame_bytes_out"] for r in tp}
        p(f"  published frame size: proxy {sizes.get('proxy')} B, zchat {sizes.get('zchat')} B")
    lat = res.get("latency", [])
    if lat:
        p("")
        p(f"Latency, one-way send->subscriber, 1 sender, {LATENCY_SUBSCRIBERS} subscribers "
          f"({meta['lat_duration']:g} s window)")
        p(f"{'offered':>8} {'system':>6} | {'in/s':>8} {'deliv/s':>8} {'loss':>6} | "
          f"{'p50 ms':>7} {'p99 ms':>7} {'p99.9':>7} {'max':>7} | p99/proxy | CPU main/io/other gens")
        for r in lat:
            px = next((x for x in lat if x["system"] == "proxy" and x["offered"] == r["offered"]), None)
            ratio = (f"{r['p99_ms'] / px['p99_ms']:8.2f}x" if r["system"] != "proxy" and px
                     and px.get("p99_ms") and r.get("p99_ms") is not None else f"{'':9}")
            other = r["cpu"]["total"] - r["cpu"]["main"] - r["cpu"]["io"]  # helper threads
            p(f"{fmt_rate(r['offered']):>8} {r['system']:>6} | {fmt_rate(r['in_per_s']):>8} "
              f"{fmt_rate(r['out_per_s']):>8} {fmt_loss(r['loss']):>6} | {fmt_ms(r['p50_ms']):>7} "
              f"{fmt_ms(r['p99_ms']):>7} {fmt_ms(r['p999_ms']):>7} {fmt_ms(r['max_ms']):>7} | {ratio} | "
              f"{r['cpu']['main']:4.0f}% {r['cpu']['io']:4.0f}% {other:4.0f}% {r['generators_cpu']:4d}%")
        zc = next((x for x in lat if x["system"] == "zchat" and x["offered"] == 10_000), None)
        px = next((x for x in lat if x["system"] == "proxy" and x["offered"] == 10_000), None)
        if zc and px and zc.get("p99_ms") is not None and px.get("p99_ms"):
            ratio = zc["p99_ms"] / px["p99_ms"]
            p(f"  target 10k msg/s: p99 <= {TARGET_P99_10K_MS:g} ms and <= {TARGET_P99_10K_RATIO:g}x the "
              f"proxy's: {fmt_ms(zc['p99_ms'])} ms, {ratio:.2f}x, "
              f"{_verdict(zc['p99_ms'] <= TARGET_P99_10K_MS and ratio <= TARGET_P99_10K_RATIO)}")
    ab = res.get("ablation", [])
    if ab:
        p("")
        p("The same zchat broker with --db :memory: (history in an in-memory SQLite: same SQL per loop "
          "turn, no disk I/O):")
        for r in ab:
            base = [x for x in (tp if r["offered"] is None else lat)
                    if x["system"] == "zchat" and x["senders"] == r["senders"]
                    and x["subscribers"] == r["subscribers"] and x["offered"] == r["offered"]]
            ref = base[0] if base else {}
            if r["offered"] is None:
                p(f"  {r['what']:>15}: in {fmt_rate(r['in_per_s'])}/s "
                  f"(with history {fmt_rate(ref.get('in_per_s'))}/s), "
                  f"main thread {r['cpu']['main']:.0f}% CPU")
            else:
                p(f"  {r['what']:>15}: p50 {fmt_ms(r['p50_ms'])} p99 {fmt_ms(r['p99_ms'])} p99.9 "
                  f"{fmt_ms(r['p999_ms'])} ms (with history p99 {fmt_ms(ref.get('p99_ms'))} ms), "
                  f"main thread {r['cpu']['main']:.0f}% CPU")
    sc = res.get("scale", [])
    if sc:
        p("")
        p(f"Scale: joined clients (SUB+PUSH each, app ping every {L.CLIENT_PING_INTERVAL:g} s, rooms of "
          f"{SCALE_ROOM_SIZE}, all on r/all/), zchat broker; {JOIN_WINDOW} joins in flight per generator "
          "process")
        p(f"{'asked':>6} {'ran':>6} {'joined':>6} {'conn':>6} | {'join p50':>8} {'p99':>7} {'all in':>6} "
          f"{'ovfl':>6} | {'RSS before':>10} {'after':>8} {'KB/client':>9} | {'probe got':>11} {'p50 ms':>7} "
          f"{'max ms':>7} | idle CPU main/io (gens)")
        for r in sc:
            p(f"{r['asked']:>6} {r['clients']:>6} {r['joined']:>6} {r['connected']:>6} | "
              f"{r['join_p50_ms']:>6.0f}ms {r['join_p99_ms'] / 1000:>6.1f}s {r['join_wall_s']:>5.0f}s "
              f"{r['listen_overflows']:>6} | {r['rss_before_kb'] / 1024:>8.1f}MB "
              f"{r['rss_after_kb'] / 1024:>6.1f}MB {r['rss_per_client_kb']:>9.1f} | "
              f"{r['probe_delivered']:>5}/{r['probe_expected']:<5} {fmt_ms(r['probe']['p50_ms']):>7} "
              f"{fmt_ms(r['probe']['max_ms']):>7} | {r['idle_cpu']['main']:.0f}% {r['idle_cpu']['io']:.0f}% "
              f"({r['generators_cpu']}%)")
            if r["clients"] < r["asked"]:
                p(f"  {r['asked']} asked: only {r['clients']} fit: broker RLIMIT_NOFILE hard limit "
                  f"{r['fd_limit']}, 2 connections per client, {BROKER_FD_HEADROOM} fds kept for the broker")
            if r["not_joined"]:
                p(f"  {r['not_joined']} of {r['clients']} not joined within {r['join_timeout_s']:.0f} s")
            if r.get("probe_error"):
                p(f"  probe: {r['probe_error']}")
        fl = res.get("scale_floor")
        if fl:
            mine = next((r for r in sc if r["clients"] == fl["clients"]), None)
            ratio = f"; zchat {mine['rss_per_client_kb'] / fl['rss_per_client_kb']:.2f}x that" if mine else ""
            p(f"  libzmq floor: the C proxy holding {fl['connected']} such client pairs (same keys, options, "
              f"subscriptions; no join) grows {fl['rss_per_client_kb']:.1f} KB/client{ratio}")
        for line in scale_targets(sc[-1], fl):
            p(line)
        p("  conn = client connection pairs held by the broker (its fds); KB/client = RSS growth / conn; "
          "ovfl = listen-queue overflows (SYNs dropped, retried after 1, 3, 7... s) while joining; "
          "idle CPU = broker threads, all joined, nobody talking (gens = the load generators, all threads)")
    ch = res.get("chatty", [])
    if ch:
        p("")
        p("Chatty room: N members in one room, each says 1 msg/s; every member receives every message")
        p(f"{'N':>5} | {'join p50':>8} {'all in':>7} | {'sent/s':>7} {'expected':>9} {'deliv/s':>9} "
          f"{'loss':>6} | "
          f"{'p50 ms':>7} {'p99 ms':>7} {'max':>7} | CPU main/io (gens)")
        for r in ch:
            p(f"{r['n']:>5} | {r['join_p50_ms']:>6.1f}ms {r['join_wall_s']:>6.1f}s | "
              f"{fmt_rate(r['sent_per_s']):>7} {fmt_rate(r['expected_per_s']):>9} "
              f"{fmt_rate(r['deliveries_per_s']):>9} {fmt_loss(r['loss']):>6} | "
              f"{fmt_ms(r['p50_ms']):>7} {fmt_ms(r['p99_ms']):>7} {fmt_ms(r['max_ms']):>7} | "
              f"{r['cpu']['main']:4.0f}% {r['cpu']['io']:4.0f}% ({r['generators_cpu']}%)")
    jn = res.get("joins")
    if jn:
        p("")
        p(f"ChatClient start()+join() to welcome, stock broker, loopback: median {jn['median_ms']:.1f} ms, "
          f"p90 {jn['p90_ms']:.1f} ms, min {jn['min_ms']:.1f}, max {jn['max_ms']:.1f} ({jn['count']} joins)")
    for prof in res.get("profile", []):
        p("")
        if "error" in prof:
            p(f"Profile ({prof['label']}): {prof['error']}")
            continue
        p(f"Profile of the broker's main thread, {prof['label']} ({fmt_rate(prof['in_per_s'])} msg/s in "
          f"while sampled, main {prof['cpu']['main']:.0f}% io {prof['cpu']['io']:.0f}% CPU; py-spy --native "
          f"--idle at 100 Hz, {prof['samples']} samples; waiting in poll counts as time)")
        p(f"  flamegraph {prof['flamegraph']}")
        p("  self time:")
        for f, share in prof["self"]:
            p(f"    {share:5.1f}%  {f}")
        p("  inclusive:")
        for f, share in prof["inclusive"]:
            p(f"    {share:5.1f}%  {f}")
    for crash in res.get("crashes", []):
        last = crash["log_tail"].strip().splitlines()[-1] if crash["log_tail"].strip() else "?"
        p(f"CRASH: {crash['system']} died during {crash['during']} (exit {crash['exit_code']}): {last}")
    p("")
    p(summary_line(res))  # the last line: nothing is printed after it
    if show:
        print("\n".join(lines), flush=True)
    return lines


def scale_targets(r: dict, floor: dict | None) -> list[str]:
    """The largest scale run against issue 11's targets, one line each, figure beside target."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    joined_all = r["not_joined"] == 0 and r["join_wall_s"] <= SCALE_JOIN_TARGET_S
    idle = r["idle_cpu"]["total"]
    lines = [f"  target: {r['clients']} clients all joined within {SCALE_JOIN_TARGET_S:.0f} s: "
             f"{r['joined']}/{r['clients']} in {r['join_wall_s']:.1f} s ({verdict(joined_all)})",
             f"  target: idle broker <= {SCALE_IDLE_CPU_TARGET:.0f}% of one core at {r['joined']} joined: "
             f"{idle:.0f}% (main {r['idle_cpu']['main']:.0f}%, io {r['idle_cpu']['io']:.0f}%; "
             f"{verdict(idle <= SCALE_IDLE_CPU_TARGET)})"]
    if floor and floor["rss_per_client_kb"] > 0:
        ratio = r["rss_per_client_kb"] / floor["rss_per_client_kb"]
        lines.append(f"  target: broker RSS/client <= {SCALE_RSS_TARGET_RATIO}x the libzmq floor: "
                     f"{r['rss_per_client_kb']:.1f} vs {floor['rss_per_client_kb']:.1f} KB/client = "
                     f"{ratio:.2f}x "
                     f"({verdict(ratio <= SCALE_RSS_TARGET_RATIO)})")
    if r["clients"] < r["asked"]:
        lines.append(f"  ({r['asked']} asked; {r['clients']} fit under RLIMIT_NOFILE {r['fd_limit']}: two "
                     f"connections each, {L.FD_RESERVE} descriptors reserved by the broker)")
    return lines


def _verdict(reached: bool) -> str:
    return "reached" if reached else "NOT reached"


def _find(rows: list[dict], system: str, senders: int, subs: int) -> dict | None:
    for r in rows:
        if r["system"] == system and r["senders"] == senders and r["subscribers"] == subs:
            return r
    return None


def summary(res: dict) -> dict:
    out: dict = {}
    tp = res.get("throughput", [])
    ratios = []
    for s, n in THROUGHPUT_CONFIGS:
        px, zc = _find(tp, "proxy", s, n), _find(tp, "zchat", s, n)
        if px and zc and px["in_per_s"]:
            ratios.append(zc["in_per_s"] / px["in_per_s"])
    px, zc = _find(tp, "proxy", 1, 1), _find(tp, "zchat", 1, 1)
    if px and zc and px["in_per_s"]:
        out["throughput_ratio_1x1"] = round(zc["in_per_s"] / px["in_per_s"], 3)
        out["zchat_in_per_s_1x1"] = zc["in_per_s"]
        out["proxy_in_per_s_1x1"] = px["in_per_s"]
    if ratios:
        out["throughput_ratio_min"] = round(min(ratios), 3)
        out["throughput_ratio_max"] = round(max(ratios), 3)
    for r in res.get("latency", []):
        if r["offered"] == 10_000:
            out[f"p99_10k_{r['system']}_ms"] = r["p99_ms"]
    if out.get("p99_10k_zchat_ms") and out.get("p99_10k_proxy_ms"):
        out["p99_10k_ratio"] = round(out["p99_10k_zchat_ms"] / out["p99_10k_proxy_ms"], 2)
    sc = res.get("scale", [])
    if sc:
        big = sc[-1]
        out["rss_per_client_kb"] = big["rss_per_client_kb"]
        out["rss_clients"] = big["joined"]
    if res.get("scale_floor"):
        out["rss_floor_per_client_kb"] = res["scale_floor"]["rss_per_client_kb"]
    if res.get("joins"):
        out["join_median_ms"] = res["joins"]["median_ms"]
    return out


def summary_line(res: dict) -> str:
    s = res["summary"]
    parts = []
    if "throughput_ratio_1x1" in s:
        parts.append(f"throughput zchat/proxy {s['throughput_ratio_1x1']:.2f}x at 1x1 "
                     f"(target {TARGET_1X1_RATIO:g}x) "
                     f"({fmt_rate(s['zchat_in_per_s_1x1'])} vs {fmt_rate(s['proxy_in_per_s_1x1'])} msg/s; "
                     f"{s['throughput_ratio_min']:.2f}-{s['throughput_ratio_max']:.2f}x over all configs)")
    if "p99_10k_zchat_ms" in s:
        ratio = f", {s['p99_10k_ratio']:.2f}x" if "p99_10k_ratio" in s else ""
        parts.append(f"p99 at 10k msg/s x10 subs {fmt_ms(s['p99_10k_zchat_ms'])} ms "
                     f"(proxy {fmt_ms(s.get('p99_10k_proxy_ms'))} ms{ratio}; "
                     f"target <= {TARGET_P99_10K_MS:g} ms and {TARGET_P99_10K_RATIO:g}x)")
    if "rss_per_client_kb" in s:
        floor = (f" (libzmq alone: {s['rss_floor_per_client_kb']:.1f})"
                 if "rss_floor_per_client_kb" in s else "")
        parts.append(f"{s['rss_per_client_kb']:.1f} KB RSS/client at {s['rss_clients']} clients{floor}")
    if "join_median_ms" in s:
        parts.append(f"join median {s['join_median_ms']:.1f} ms")
    if res.get("crashes"):
        parts.append(f"{len(res['crashes'])} crash(es) of the system under test (see CRASH lines)")
    return "SUMMARY: " + "; ".join(parts)


def plot(res: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("--plot: matplotlib is not installed (pip install matplotlib); no plot written",
              file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    tp = res.get("throughput", [])
    labels = [f"{s}x{n}" for s, n in THROUGHPUT_CONFIGS]
    x = range(len(labels))
    ax = axes[0]
    bars = ((-0.3, "proxy", "in_per_s", "tab:gray"), (-0.1, "zchat", "in_per_s", "tab:blue"),
            (0.1, "proxy", "out_per_s", "silver"), (0.3, "zchat", "out_per_s", "lightblue"))
    for off, system, metric, style in bars:
        vals = [(_find(tp, system, s, n) or {}).get(metric, 0) / 1000 for s, n in THROUGHPUT_CONFIGS]
        ax.bar([i + off for i in x], vals, width=0.2, color=style, label=f"{system} {metric.split('_')[0]}")
    ax.set_xticks(list(x), labels)
    ax.set_xlabel("senders x subscribers")
    ax.set_ylabel("k msg/s")
    ax.set_title("Throughput (CURVE)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for system, color in (("proxy", "tab:gray"), ("zchat", "tab:blue")):
        rows = [r for r in res.get("latency", []) if r["system"] == system]
        loads = [r["offered"] for r in rows]
        for key, style in (("p50_ms", ":"), ("p99_ms", "-"), ("p999_ms", "--")):
            ax.plot(loads, [r[key] for r in rows], style, color=color, marker="o",
                    label=f"{system} {key[:-3]}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered msg/s (10 subscribers)")
    ax.set_ylabel("one-way latency, ms")
    ax.set_title("Latency")
    ax.legend(fontsize=8)
    ax = axes[2]
    ch = res.get("chatty", [])
    if ch:
        ns = [r["n"] for r in ch]
        ax.plot(ns, [r["expected_per_s"] / 1000 for r in ch], "--", color="gray",
                label="expected deliveries/s")
        ax.plot(ns, [r["deliveries_per_s"] / 1000 for r in ch], "-o", color="tab:blue", label="delivered/s")
        ax.set_xlabel("members (1 msg/s each)")
        ax.set_ylabel("k deliveries/s")
        ax2 = ax.twinx()
        ax2.plot(ns, [r["p99_ms"] for r in ch], "-s", color="tab:red", label="p99 ms")
        ax2.set_ylabel("p99 ms", color="tab:red")
        ax.legend(fontsize=8, loc="upper left")
    ax.set_title("Chatty room")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot written to {path}")


# --- main ---------------------------------------------------------------------------------------------

MP = mp.get_context("fork")


def git_describe() -> str:
    """The commit measured, with '+dirty' when the work tree has changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"
    return f"{head}{'+dirty' if dirty else ''}" if head else "?"


def each_size(res: dict, phase: str, sizes: list[int], run: Callable[[int], dict],
              describe: Callable[[dict], str]) -> list[dict]:
    """Run one phase at each size; a broker crash is recorded (and the size skipped), not fatal."""
    results = []
    for n in sizes:
        try:
            r = run(n)
        except ServiceDied as exc:
            res["crashes"].append({"system": "zchat", "during": f"{phase} {n}",
                                   "exit_code": exc.exit_code, "log_tail": exc.log_tail})
            print(f"  !! broker died during {phase} {n}: {exc.log_tail.strip().splitlines()[-1]}")
            continue
        results.append(r)
        print(f"  {phase} {n}: {describe(r)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about a minute: shorter windows, fewer sizes")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "latest.json",
                        help="results file (default benchmarks/results/latest.json)")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="draw throughput/latency curves (needs matplotlib)")
    parser.add_argument("--profile", nargs="?", const=ROOT / "benchmarks" / "results" / "profile", type=Path,
                        metavar="FILE", help="also profile the broker under load with py-spy "
                        "(writes FILE.txt raw stacks and FILE.svg)")
    parser.add_argument("--broker-args", metavar="ARGS", default=None,
                        help="run the broker as `python -m zchat broker --port P --pub-port Q --config-dir D "
                        "ARGS` (e.g. its rate-limit option) instead of the built-in launcher")
    parser.add_argument("--abrupt-close", action="store_true",
                        help="senders close right after the window instead of waiting for the subscribers "
                        "to drain (reproduces a libzmq assertion crash in the broker, see README)")
    parser.add_argument("--scale", metavar="N[,N...]",
                        help="scale phase sizes (default 1000 with --quick, else 1000,5000,10000); "
                        "the libzmq floor is measured at the largest")
    parser.add_argument("--scale-join-timeout", type=float, metavar="S",
                        help="scale phase: seconds each generator may take to join its clients (default 60, "
                        "45 with --quick); past 60 s the join target is missed but idle CPU and memory are "
                        "measured with everyone in")
    parser.add_argument("--only", default="throughput,latency,scale,chatty,joins,sealing,relay",
                        help="comma-separated subset of: throughput,latency,scale,chatty,joins,sealing,"
                        "relay,profile (default: all but profile, which --profile adds)")
    args = parser.parse_args(argv)
    cfg = dict(PROFILES["quick" if args.quick else "full"])
    if args.scale:
        cfg["scale"] = [int(x) for x in args.scale.split(",")]
    if args.scale_join_timeout:
        cfg["scale_join_timeout"] = args.scale_join_timeout
    only = set(args.only.split(","))
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)
    broker_help = subprocess.run([sys.executable, "-m", "zchat", "broker", "--help"], capture_output=True,
                                 text=True, cwd=ROOT, env=env).stdout
    if args.broker_args is not None:
        broker_args: list[str] | None = shlex.split(args.broker_args)
    elif "--rate-per-second" in broker_help:
        broker_args = ["--rate-per-second", "0"]  # the stock broker, per-sender rate limit off
    else:
        broker_args = None  # an older broker without the option: the launcher sets Limits directly
    if broker_args is not None and args.broker_args is None and "--new-keys-per-minute" in broker_help:
        broker_args += ["--new-keys-per-minute", "0"]  # every generated key comes from one address
    join_args = shlex.split(args.broker_args) if args.broker_args is not None else []
    memdb = broker_args is not None and "--db" in broker_help and "--db" not in broker_args
    soft, hard = raise_nofile()
    res: dict = {"meta": {
        "mode": "quick" if args.quick else "full", "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "pyzmq": zmq.__version__, "libzmq": zmq.zmq_version(), "nofile": [soft, hard],
        "broker": ("python -m zchat broker --port P --pub-port Q --config-dir TMP " + shlex.join(broker_args))
        if broker_args is not None
        else "launcher: zchat.broker.serve(BrokerSettings(limits=Limits(rate_burst=10**9, "
             "rate_per_second=1e9)))",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_describe(), **cfg}, "crashes": []}
    workdir = Path(tempfile.mkdtemp(prefix="zchat-bench-"))
    t_start = time.monotonic()

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    services: list[Service] = []
    try:
        if "profile" in only and args.profile is None:
            args.profile = ROOT / "benchmarks" / "results" / "profile"
        if only & {"throughput", "latency"} or args.profile is not None:
            live = {"zchat": Service("zchat", workdir, broker_args), "proxy": Service("proxy", workdir)}
            services += live.values()

            def flow(kind: str, what: str, *a, **kw):  # type: ignore[no-untyped-def]
                """run_flow; if the system under test dies, record it, restart it and retry once."""
                for attempt in (1, 2):
                    try:
                        return run_flow(live[kind], *a, abrupt=args.abrupt_close, **kw)
                    except ServiceDied as exc:
                        crash = {"system": kind, "during": what, "attempt": attempt,
                                 "exit_code": exc.exit_code, "log_tail": exc.log_tail}
                        res["crashes"].append(crash)
                        print(f"  !! {live[kind].name} died during {what} (exit {exc.exit_code}): "
                              f"{exc.log_tail.strip().splitlines()[-1]}; restarting it", flush=True)
                        live[kind].stop(graceful=False)
                        live[kind] = Service(kind, workdir, broker_args) if kind == "zchat" \
                            else Service("proxy", workdir)
                        services.append(live[kind])
                return None

            if "throughput" in only:
                res["throughput"] = []
                for s, n in THROUGHPUT_CONFIGS:
                    for kind in ("proxy", "zchat"):
                        r = flow(kind, f"throughput {s}x{n}", s, n, cfg["tp_warmup"], cfg["tp_duration"])
                        if r is None:
                            continue
                        res["throughput"].append(r)
                        print(f"  throughput {kind:5} {s}x{n:<2}: in {fmt_rate(r['in_per_s'])}/s, "
                              f"out {fmt_rate(r['out_per_s'])}/s, loss {fmt_loss(r['loss'])}", flush=True)
            if "latency" in only:
                res["latency"] = []
                for load in LATENCY_LOADS:
                    for kind in ("proxy", "zchat"):
                        r = flow(kind, f"latency {load}/s", 1, LATENCY_SUBSCRIBERS, cfg["lat_warmup"],
                                 cfg["lat_duration"], rate=load)
                        if r is None:
                            continue
                        res["latency"].append(r)
                        print(f"  latency {kind:5} {fmt_rate(load)}/s: p50 {fmt_ms(r['p50_ms'])} "
                              f"p99 {fmt_ms(r['p99_ms'])} p99.9 {fmt_ms(r['p999_ms'])} ms", flush=True)
            if memdb and only & {"throughput", "latency"}:
                # Same broker with its history in an in-memory SQLite: what the disk I/O costs.
                nodb = Service("zchat", workdir, [*broker_args, "--db", ":memory:"], label="zchat-memdb")
                services.append(nodb)
                res["ablation"] = []
                for what, s, n, kw in (("throughput 1x1", 1, 1, {}),
                                       ("latency 10k/s", 1, LATENCY_SUBSCRIBERS, {"rate": 10_000})):
                    warm, dur = (cfg["tp_warmup"], cfg["tp_duration"]) if not kw else \
                        (cfg["lat_warmup"], cfg["lat_duration"])
                    try:
                        r = run_flow(nodb, s, n, warm, dur, **kw)
                    except ServiceDied as exc:
                        res["crashes"].append({"system": "zchat-memdb", "during": what, "attempt": 1,
                                               "exit_code": exc.exit_code, "log_tail": exc.log_tail})
                        nodb.stop(graceful=False)
                        nodb = Service("zchat", workdir, [*broker_args, "--db", ":memory:"],
                                       label="zchat-memdb")
                        services.append(nodb)
                        continue
                    r["what"] = what
                    res["ablation"].append(r)
                    print(f"  zchat --db :memory: {what}: in {fmt_rate(r['in_per_s'])}/s, "
                          f"p99 {fmt_ms(r.get('p99_ms'))} ms", flush=True)
                nodb.stop()
            if args.profile is not None:
                args.profile.parent.mkdir(parents=True, exist_ok=True)
                res["profile"] = []
                for i, (label, senders, subs, rate) in enumerate(PROFILE_SCENARIOS):
                    out = args.profile.with_name(f"{args.profile.name}-{i + 1}")
                    try:
                        res["profile"].append(run_profile(live["zchat"], cfg["profile_duration"], out, label,
                                                          senders, subs, rate))
                    except ServiceDied as exc:
                        res["profile"].append({"label": label, "error": str(exc).splitlines()[0]})
                        live["zchat"] = Service("zchat", workdir, broker_args)
                        services.append(live["zchat"])
                    print(f"  profiled: {label}", flush=True)
            for svc in live.values():
                svc.stop()
        if "scale" in only:
            res["scale"] = each_size(
                res, "scale", cfg["scale"],
                lambda n: run_scale(workdir, n, broker_args, cfg["scale_join_timeout"]),
                lambda r: f"{r['joined']} joined, {r['rss_per_client_kb']} KB/client, "
                          f"probe {r['probe_delivered']}/{r['probe_expected']}")
            floor_n = max(cfg["scale"])  # the same connections as the largest run, side by side
            res["scale_floor"] = run_floor(workdir, floor_n)
            print(f"  libzmq floor at {floor_n}: {res['scale_floor']['rss_per_client_kb']} KB/client",
                  flush=True)
        if "chatty" in only:
            res["chatty"] = each_size(
                res, "chatty", cfg["chatty"],
                lambda n: run_chatty(workdir, n, cfg["chatty_warmup"], cfg["chatty_duration"], broker_args),
                lambda r: f"{fmt_rate(r['deliveries_per_s'])} deliveries/s, p99 {fmt_ms(r['p99_ms'])} ms")
        if "joins" in only:
            res["joins"] = run_joins(workdir, cfg["joins"], join_args)
        if "sealing" in only:
            res["sealing"] = run_sealing(workdir, cfg, broker_args)
            print_sealing(res["sealing"])
        if "relay" in only:  # issue 11 §3: relays (benchmarks/relay_bench.py)
            import relay_bench

            res["relay"] = relay_bench.run(workdir, args.quick, broker_args)
            relay_bench.print_relay(res["relay"])
        res["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
        res["summary"] = summary(res)
        res["report"] = print_report(res, show=False)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1))
        print(f"(results in {args.json}; {res['meta']['seconds']:.0f} s)")
        if args.plot:
            plot(res, args.plot)
        print("")
        print("\n".join(res["report"]), flush=True)  # ends with the SUMMARY line
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        for svc in services:
            try:
                svc.stop(graceful=False)
            except Exception:
                pass
        kill_children()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        proxy_main(*sys.argv[2:6])
    else:
        sys.exit(main())
