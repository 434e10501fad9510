"""The relay phase of bench.py (`--only relay`): issue 11 §3.

1. A chatty room (N members, each saying 1 msg/s) on the broker alone, then the same room
   with the members split over 2 relays in front of the broker: deliveries/s, p99, loss and
   the CPU each process used (all on the same 2 cores).
2. Forwarding rate: one publisher upstream, one subscriber downstream, as fast as it goes,
   through a zchat relay and through the C zmq.proxy (XSUB -> XPUB, CURVE on both sides) in
   the same run. The relay only copies frames: target >= 0.8x the proxy.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import bench as B
import zmq

from zchat import keys

FORWARD_TOPIC = b"r/bench/"
FORWARD_BODY = FORWARD_TOPIC + b" " + b"x" * 100


class RelayService:
    """A `zchat relay` process (config dir `directory`, or a fresh one) in front of an upstream."""

    def __init__(self, workdir: Path, port: int, pub_port: int, server_key: bytes,
                 directory: Path | None = None) -> None:
        self.dir = directory or Path(tempfile.mkdtemp(prefix="relay-", dir=workdir))
        self.key = keys.load_or_create(self.dir / "relay", "relay")
        self.port, self.pub_port = B.free_port(), B.free_port()
        self.input = f"tcp://127.0.0.1:{self.port}"
        self.publish = f"tcp://127.0.0.1:{self.pub_port}"
        self.log_path = self.dir / "relay.log"
        self._log = open(self.log_path, "w")
        argv = [sys.executable, "-m", "zchat", "relay", "--upstream", f"127.0.0.1:{port}",
                "--upstream-pub-port", str(pub_port), "--server-key", server_key.decode(),
                "--port", str(self.port), "--pub-port", str(self.pub_port), "--config-dir", str(self.dir)]
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=B.ROOT, env=_env())
        B.CHILDREN.append(self.proc)
        deadline = time.monotonic() + 15
        while "Relay started" not in self.log_path.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"relay did not start:\n{self.log_path.read_text()[-2000:]}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self._log.close()


def _env() -> dict:
    path = os.pathsep.join(filter(None, [str(B.ROOT), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path)


# --- 1. a chatty room through 2 relays ---------------------------------------------------------


def run_chatty_relayed(workdir: Path, n: int, warmup: float, duration: float, broker_args: list[str] | None,
                       relays: int) -> dict:
    """run_chatty's room, its members split over `relays` relays (0: on the broker alone)."""
    relay_dirs = [Path(tempfile.mkdtemp(prefix="relaykey-", dir=workdir)) for _ in range(relays)]
    relay_keys = workdir / f"relay-keys-{time.monotonic_ns()}"
    listed = [keys.load_or_create(d / "relay", "relay").identity for d in relay_dirs]
    relay_keys.write_text("".join(identity + "\n" for identity in listed))
    svc = B.Service("zchat", workdir, [*(broker_args or []), "--relay-keys", str(relay_keys)])
    fronts: list[RelayService] = []
    procs: list = []
    try:
        fronts = [RelayService(workdir, svc.port, svc.pub_port, svc.server_key, d) for d in relay_dirs]
        specs = [{"key": svc.server_key, "input": svc.input, "publish": svc.publish}] if not relays else [
            {"key": f.key.public, "box_key": svc.server_key, "input": f.input, "publish": f.publish}
            for f in fronts]
        gens = max(1, relays)
        sizes = [n // gens + (1 if g < n % gens else 0) for g in range(gens)]
        firsts = [sum(sizes[:g]) for g in range(gens)]
        joined_count = B.MP.Value("i", 0)
        go = B.MP.Event()
        times = B.MP.Array("q", 4)
        results = B.MP.Queue()
        procs = [B.spawn(B.chatty_gen_proc, specs[g], g, firsts[g], sizes[g], n, joined_count, go, times,
                         results) for g in range(gens)]
        B.wait_value(joined_count, gens, 180, procs, results)
        _, w1 = B.start_window(times, go, warmup, duration)
        watched = {"broker": svc.pid, **{f"relay{i}": f.pid for i, f in enumerate(fronts)}}
        cpu0 = {name: B.thread_ticks(pid) for name, pid in watched.items()}
        B.sleep_until(w1)
        cpu = {name: round(B.cpu_percent(cpu0[name], B.thread_ticks(pid), duration)["total"])
               for name, pid in watched.items()}
        outs = B.collect(results, gens, 60 + duration, procs)
        members = sum(o["joined"] for o in outs)
        lat = B.array.array("q")
        for o in outs:
            lat.frombytes(o["lat"])
        sent = sum(o["sent"] for o in outs)
        received = sum(o["total"] for o in outs)
        deliveries = round(sum(o["window"] for o in outs) / duration)
        result = {"n": n, "relays": relays, "joined": members, "deliveries_per_s": deliveries,
                  "sent_per_s": round(sum(o["sent_window"] for o in outs) / duration),
                  "loss": round(max(0.0, 1 - received / (sent * members)), 4) if sent and members else None,
                  "cpu": cpu, "cores_used": round(sum(cpu.values()) / 100, 2),
                  "deliveries_per_core_s": round(deliveries / max(sum(cpu.values()) / 100, 0.01))}
        result.update(B.percentiles(lat))
        return result
    finally:
        for f in fronts:
            f.stop()
        svc.stop(graceful=False)
        B.reap(procs, 10)


# --- 2. forwarding rate: zchat relay vs C zmq.proxy ------------------------------------------------


def proxy_forwarder_main(up_pub: str, pub_port: str, public: str, secret: str, up_key: str) -> None:
    """The baseline: C zmq.proxy from a CURVE XSUB (upstream) to a CURVE XPUB, ZAP first."""
    B.die_with_parent()
    ctx = zmq.Context()
    zap = ctx.socket(zmq.REP)
    zap.bind("inproc://zeromq.zap.01")

    def serve_zap() -> None:
        while True:
            try:
                zap.send_multipart(B.zap_reply(zap.recv_multipart()))
            except zmq.ZMQError:
                return

    threading.Thread(target=serve_zap, daemon=True).start()
    backend = ctx.socket(zmq.XPUB)
    backend.curve_server = True
    backend.curve_publickey, backend.curve_secretkey = public.encode(), secret.encode()
    backend.zap_domain = b"bench"
    backend.sndhwm = B.L.XPUB_SNDHWM
    backend.bind(f"tcp://127.0.0.1:{pub_port}")
    own_public, own_secret = zmq.curve_keypair()
    frontend = B.curve_client(ctx, zmq.XSUB, up_key.encode(), own_public, own_secret)
    frontend.rcvhwm = B.L.XPUB_SNDHWM
    frontend.connect(up_pub)
    print("proxy ready", flush=True)
    zmq.proxy(frontend, backend)


def _upstream(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket, bytes, int, int]:
    """A fake broker: a CURVE XPUB (any key) that publishes, and a PULL that swallows."""
    public, secret = zmq.curve_keypair()
    socks = []
    for kind in (zmq.XPUB, zmq.PULL):
        sock = ctx.socket(kind)
        sock.linger = 0
        sock.curve_server = True
        sock.curve_publickey, sock.curve_secretkey = public, secret
        socks.append(sock)
    xpub, pull = socks
    xpub.sndhwm = B.L.XPUB_SNDHWM
    pub_port = xpub.bind_to_random_port("tcp://127.0.0.1")
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    return xpub, pull, public, port, pub_port


def _forward_rates(ctx: zmq.Context, xpub: zmq.Socket, fronts: list[tuple[str, bytes]],
                   seconds: float) -> list[float]:
    """Publish upstream as fast as possible for `seconds`, every frame to every forwarder at
    once (side by side: the same frames, the same moment's load); frames/s each forwarder's
    one subscriber received."""
    subs = []
    for front_pub, front_key in fronts:
        public, secret = zmq.curve_keypair()
        sub = B.curve_client(ctx, zmq.SUB, front_key, public, secret)
        sub.rcvhwm = B.L.XPUB_SNDHWM
        sub.subscribe(FORWARD_TOPIC)
        sub.connect(front_pub)
        subs.append(sub)
    xpub.setsockopt(zmq.XPUB_VERBOSE, 1)  # each forwarder's subscription, not only the first
    deadline = time.monotonic() + 15
    subscribed = 0
    while subscribed < len(fronts):  # each forwarder passed its subscriber's topic upstream
        if xpub.poll(100) and xpub.recv().startswith(b"\x01" + FORWARD_TOPIC):
            subscribed += 1
        if time.monotonic() > deadline:
            raise RuntimeError("a forwarder never subscribed upstream")
    received = [0] * len(subs)
    stop = threading.Event()

    def receive(i: int, sub: zmq.Socket) -> None:
        while not stop.is_set():
            if sub.poll(100):
                while True:
                    try:
                        sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    received[i] += 1

    readers = [threading.Thread(target=receive, args=(i, sub), daemon=True) for i, sub in enumerate(subs)]
    for reader in readers:
        reader.start()
    send = xpub.send
    warm_end = time.monotonic() + 0.3  # warm-up before counting (a timed phase, not a synchronisation)
    while time.monotonic() < warm_end:
        for _ in range(1000):
            send(FORWARD_BODY)
    before, t0 = list(received), time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        for _ in range(1000):
            send(FORWARD_BODY)
    span = time.monotonic() - t0
    rates = [(now - then) / span for now, then in zip(received, before, strict=True)]
    stop.set()
    for reader in readers:
        reader.join(2)
    for sub in subs:
        sub.close(0)
    return rates


def run_forwarding(workdir: Path, seconds: float) -> dict:
    ctx = zmq.Context()
    xpub, pull, up_key, port, pub_port = _upstream(ctx)
    relay = proxy = None
    try:
        relay = RelayService(workdir, port, pub_port, up_key)
        public, secret = zmq.curve_keypair()
        front_pub = B.free_port()
        argv = [sys.executable, str(Path(__file__).resolve()), "_forwarder", f"tcp://127.0.0.1:{pub_port}",
                str(front_pub), public.decode(), secret.decode(), up_key.decode()]
        proxy = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=B.ROOT, env=_env())
        B.CHILDREN.append(proxy)
        assert proxy.stdout is not None
        proxy.stdout.readline()  # "proxy ready"
        relay_rate, proxy_rate = _forward_rates(
            ctx, xpub, [(relay.publish, relay.key.public), (f"tcp://127.0.0.1:{front_pub}", public)], seconds)
        return {"relay_per_s": round(relay_rate), "proxy_per_s": round(proxy_rate),
                "ratio": round(relay_rate / max(proxy_rate, 1), 2)}
    finally:
        if relay is not None:
            relay.stop()
        if proxy is not None:
            proxy.kill()
            proxy.wait(5)
        xpub.close(0)
        pull.close(0)
        ctx.term()


def run(workdir: Path, quick: bool, broker_args: list[str] | None) -> dict:
    n = 100 if quick else 300
    warmup, duration = (1.0, 3.0) if quick else (2.0, 5.0)
    res = {"chatty_alone": run_chatty_relayed(workdir, n, warmup, duration, broker_args, 0),
           "chatty_relays": run_chatty_relayed(workdir, n, warmup, duration, broker_args, 2),
           "forwarding": run_forwarding(workdir, 2.0 if quick else 4.0)}
    return res


def print_relay(res: dict) -> None:
    for key, label in (("chatty_alone", "broker alone"), ("chatty_relays", "broker + 2 relays")):
        r = res[key]
        print(f"  relay chatty {label:17} n={r['n']}: {B.fmt_rate(r['deliveries_per_s'])} deliveries/s, "
              f"p99 {B.fmt_ms(r.get('p99_ms'))} ms, loss {B.fmt_loss(r['loss'])}, CPU {r['cpu']} "
              f"({B.fmt_rate(r['deliveries_per_core_s'])} deliveries per core-second)", flush=True)
    f = res["forwarding"]
    print(f"  relay forwarding: zchat relay {B.fmt_rate(f['relay_per_s'])}/s vs C zmq.proxy "
          f"{B.fmt_rate(f['proxy_per_s'])}/s = {f['ratio']}x (target >= 0.8x)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_forwarder":
        proxy_forwarder_main(*sys.argv[2:7])
