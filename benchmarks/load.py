#!/usr/bin/env python3
"""Load test: many clients, each saying 1 msg/s, through one stock zchat broker.

    python benchmarks/load.py [--clients 1000] [--seconds 60] [--room-size 10] [--generators 4]

Issue 5's load requirement: 1,000 clients sending 1 msg/s each for 60 s through one broker,
reporting broker errors, the delivery ratio, p50/p99 latency and broker RSS. The broker runs
with its DEFAULT settings (rate limit included: 1 msg/s per key is well under it), so any error
event a client receives counts. Clients are raw CURVE PUSH+SUB pairs from benchmarks/bench.py
(own key each, the protocol's join handshake, app ping 1/s), spread over --generators processes
and over rooms of --room-size members. Each message carries its monotonic send time; every
member of the room, the sender included (its echo), counts it and its one-way latency.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import array
import heapq
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from time import monotonic_ns as mono

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
from bench import (  # noqa: E402
    IDLE_NS,
    MESSAGE_MARK,
    MP,
    PING_INTERVAL_NS,
    ROOT,
    SAY_SUFFIX,
    TEXT_BYTES,
    Service,
    ServiceDied,
    collect,
    cpu_percent,
    fmt_ms,
    git_describe,
    join_members,
    pct,
    percentiles,
    raise_nofile,
    reap,
    say_prefix,
    sleep_until,
    spawn,
    text_ts,
    thread_ticks,
    vmrss_kb,
    wait_value,
    zmq,
)

JOIN_TIMEOUT = 180.0  # seconds for one generator to join all its clients
DRAIN_TIMEOUT_NS = 15_000_000_000  # after the senders stop, receive for at most this long


def room_of(index: int, room_size: int) -> str:
    return f"load{index // room_size}"


def error_code(data: bytes) -> str:
    return data.split(b'"code":"', 1)[-1].split(b'"', 1)[0].decode(errors="replace") or "?"


def load_gen_proc(svc: dict, gen: int, first: int, count: int, total_n: int, room_size: int,
                  join_timeout: float, joined_count, go, times, results) -> None:  # type: ignore[no-untyped-def]
    """`count` clients (global indexes first..first+count-1): join, then each says 1 msg/s."""
    raise_nofile()
    ctx = zmq.Context()
    ctx.max_sockets = 2 * count + 64
    specs = [(f"L{gen}x{i}", [room_of(first + i, room_size)], ()) for i in range(count)]
    t_begin = mono()
    members, join_ms, failed = join_members(ctx, svc, specs, timeout=join_timeout)
    join_wall = (mono() - t_begin) / 1e9
    idx = {id(m): first + i for i, m in enumerate(members)}
    joined = [m for m in members if m.joined_ns and not m.error]
    join_errors = Counter(m.error for m in members if m.error)
    per_room_members: Counter[str] = Counter(room_of(idx[id(m)], room_size) for m in joined)
    by_sock = {m.sub: m for m in joined}
    poller = zmq.Poller()
    for m in joined:
        poller.register(m.sub, zmq.POLLIN)
    errors: Counter[str] = Counter(join_errors)
    sent_by_room: Counter[str] = Counter()
    lat = array.array("q")
    delivered = 0
    t0 = stop = 0
    last_rx = mono()

    def receive(wait_ms: int) -> bool:
        """Read whatever arrived; count room messages (after t0) and every private error."""
        nonlocal delivered, last_rx
        ready = poller.poll(wait_ms)
        if not ready:
            return False
        last_rx = mono()
        for sock, _ in ready:
            m = by_sock[sock]
            for _ in range(1000):
                try:
                    data = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                if data.startswith(b"r/"):
                    start = data.find(b" ") + 1
                    if not data.startswith(MESSAGE_MARK, start):
                        continue
                    now = mono()
                    ts = text_ts(data, start)
                    if t0 and ts >= t0:
                        delivered += 1
                        lat.append(now - ts)
                elif data.startswith(m.utopic) and b'"type":"error"' in m.readable(data):
                    errors[error_code(m.readable(data))] += 1
        return True

    next_ping = 0
    ping = [m.ping for m in joined]

    def keepalive() -> None:
        nonlocal next_ping
        if mono() >= next_ping:
            for p in ping:
                p()
            next_ping = mono() + PING_INTERVAL_NS

    with joined_count.get_lock():
        joined_count.value += 1
    results.put({"role": "joined", "gen": gen, "joined": len(joined), "failed": failed,
                 "join_ms": join_ms, "join_wall_s": join_wall})
    while not go.is_set():  # keep the memberships alive; count anything the broker says
        keepalive()
        receive(20)
    t0, stop = times[0], times[1]
    # Client i (global index) says something every second at phase i / N of the second.
    schedule = [(t0 + idx[id(m)] * 1_000_000_000 // total_n, k) for k, m in enumerate(joined)]
    heapq.heapify(schedule)
    rooms = [room_of(idx[id(m)], room_size) for m in joined]
    prefixes = {r: say_prefix(r) for r in set(rooms)}
    send_fail = 0
    hard_end = stop + DRAIN_TIMEOUT_NS
    while True:
        now = mono()
        while schedule and schedule[0][0] <= now and now < stop:
            due, k = heapq.heappop(schedule)
            try:
                joined[k].push.send(prefixes[rooms[k]] + b"%020d" % mono() + SAY_SUFFIX, zmq.NOBLOCK)
                sent_by_room[rooms[k]] += 1
            except zmq.Again:
                send_fail += 1
            if due + 1_000_000_000 < stop:
                heapq.heappush(schedule, (due + 1_000_000_000, k))
        keepalive()
        now = mono()
        wait_ms = 5 if not schedule or now >= stop else max(0, min(5, (schedule[0][0] - now) // 1_000_000))
        got = receive(wait_ms)
        now = mono()
        if now > hard_end or (not got and now > stop and now - last_rx > IDLE_NS):
            break
    results.put({"role": "done", "gen": gen, "sent_by_room": dict(sent_by_room),
                 "members_by_room": dict(per_room_members), "send_fail": send_fail,
                 "delivered": delivered, "errors": dict(errors), "lat": lat.tobytes()})
    for m in joined:
        try:
            m.push.send(b'{"type":"leave"}', zmq.NOBLOCK)
        except zmq.Again:
            pass
    for m in members:
        m.sub.close(0)
        m.push.close(500)
    ctx.term()


class RssSampler:
    """Broker VmRSS once a second (the main process samples while it waits)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.monotonic()
        self.next = 0.0

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            try:
                self.samples.append((round(now - self.t0, 1), vmrss_kb(self.pid)))
            except OSError:
                pass
            self.next = now + 1.0

    def sleep(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.tick()
            time.sleep(min(0.2, max(0.0, end - time.monotonic())))

    @property
    def peak(self) -> int:
        return max((kb for _, kb in self.samples), default=0)


def run_load(n: int, seconds: float, room_size: int, gens: int, workdir: Path) -> dict:
    # The stock broker (default rate limits and history), but every key comes from this one
    # address: its limit on new keys per address a minute would refuse most of them.
    svc = Service("zchat", workdir, ["--new-keys-per-minute", "0"])
    procs: list = []
    try:
        spec = {"key": svc.server_key, "input": svc.input, "publish": svc.publish}
        gens = max(1, min(gens, n))
        sizes = [n // gens + (1 if g < n % gens else 0) for g in range(gens)]
        firsts = [sum(sizes[:g]) for g in range(gens)]
        rss = RssSampler(svc.pid)
        rss.sleep(1.0)
        rss_before = vmrss_kb(svc.pid)
        joined_count = MP.Value("i", 0)
        go = MP.Event()
        times = MP.Array("q", 2)
        results = MP.Queue()
        t_begin = time.monotonic()
        procs = [spawn(load_gen_proc, spec, g, firsts[g], sizes[g], n, room_size, JOIN_TIMEOUT,
                       joined_count, go, times, results) for g in range(gens)]
        while joined_count.value < gens:
            rss.tick()
            wait_value(joined_count, joined_count.value + 1, JOIN_TIMEOUT + 60, procs, results)
        join_wall = time.monotonic() - t_begin
        joins = collect(results, gens, 30, procs)
        rss.sleep(2.0)  # settle: everyone joined, pings flowing
        rss_joined = vmrss_kb(svc.pid)
        t0 = mono() + 500_000_000
        stop = t0 + int(seconds * 1e9)
        times[:] = [t0, stop]
        go.set()
        sleep_until(t0)
        cpu0 = thread_ticks(svc.pid)
        gen0 = [thread_ticks(p.pid) for p in procs]
        while mono() < stop:
            if not svc.alive():
                raise ServiceDied(svc, "during the run")
            rss.sleep(min(1.0, max(0.0, (stop - mono()) / 1e9)))
        cpu1 = thread_ticks(svc.pid)
        gen_cpu = round(sum(cpu_percent(g0, thread_ticks(p.pid), seconds)["total"]
                            for g0, p in zip(gen0, procs, strict=True)))
        rss_end = vmrss_kb(svc.pid)
        outs: list[dict] = []
        deadline = time.monotonic() + DRAIN_TIMEOUT_NS / 1e9 + 60
        while len(outs) < gens:
            rss.tick()
            outs += collect(results, 1, max(1.0, deadline - time.monotonic()), procs)
        rss.sleep(1.0)
        rss_after = vmrss_kb(svc.pid)
        if not svc.alive():
            raise ServiceDied(svc, "after the run")
        log_tail = svc.log_path.read_text(errors="replace")
    finally:
        svc.stop(graceful=False)
        reap(procs, 10)
    sent_by_room: Counter[str] = Counter()
    members_by_room: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lat = array.array("q")
    for o in outs:
        sent_by_room.update(o["sent_by_room"])
        members_by_room.update(o["members_by_room"])
        errors.update(o["errors"])
        lat.frombytes(o["lat"])
    sent = sum(sent_by_room.values())
    expected = sum(c * members_by_room[r] for r, c in sent_by_room.items())
    delivered = sum(o["delivered"] for o in outs)
    join_ms = sorted(x for o in joins for x in o["join_ms"])
    joined = sum(o["joined"] for o in joins)
    warnings = [line for line in log_tail.splitlines() if " WARNING " in line or " ERROR " in line]
    return {
        "clients": n, "seconds": seconds, "room_size": room_size, "rooms": len(members_by_room),
        "generators": gens, "joined": joined, "not_joined": n - joined,
        "join_wall_s": round(join_wall, 2),
        "join_p50_ms": round(pct(join_ms, 0.5), 1), "join_p99_ms": round(pct(join_ms, 0.99), 1),
        "sent": sent, "send_would_block": sum(o["send_fail"] for o in outs),
        "sent_per_s": round(sent / seconds, 1),
        "expected": expected, "delivered": delivered,
        "delivery_ratio": round(delivered / expected, 6) if expected else None,
        "deliveries_per_s": round(delivered / seconds, 1),
        "latency": percentiles(lat),
        "errors": dict(errors), "error_count": sum(errors.values()),
        "broker_log_warnings": len(warnings), "broker_log_warning_lines": warnings[-10:],
        "rss_before_kb": rss_before, "rss_joined_kb": rss_joined, "rss_end_of_sending_kb": rss_end,
        "rss_after_kb": rss_after, "rss_peak_kb": rss.peak, "rss_samples": rss.samples,
        "broker_cpu": cpu_percent(cpu0, cpu1, seconds), "generators_cpu": gen_cpu,
    }


def report(r: dict, meta: dict) -> list[str]:
    lines: list[str] = []
    p = lines.append
    mb = 1024.0
    lat = r["latency"]
    p(f"zchat load test: {r['clients']} clients x 1 msg/s for {r['seconds']:g} s, rooms of {r['room_size']} "
      f"({r['rooms']} rooms), {r['generators']} generator processes; {meta['cpus']} CPUs, "
      f"Python {meta['python']}, pyzmq {meta['pyzmq']}, libzmq {meta['libzmq']}, "
      f"CURVE on, text {TEXT_BYTES} B")
    p(f"  broker: {meta['broker']} (commit {meta['git']})")
    rows = [
        ("clients joined", f"{r['joined']} / {r['clients']} (all in {r['join_wall_s']:.1f} s)"),
        ("join time p50 / p99", f"{fmt_ms(r['join_p50_ms'])} / {fmt_ms(r['join_p99_ms'])} ms"),
        ("messages sent", f"{r['sent']} ({r['sent_per_s']:.1f}/s; {r['send_would_block']} would-block)"),
        ("expected deliveries", f"{r['expected']} (sent x members of the room, own echo included)"),
        ("delivered", f"{r['delivered']} ({r['deliveries_per_s']:.0f}/s)"),
        ("delivery ratio", f"{r['delivery_ratio']:.6f}" if r["delivery_ratio"] is not None else "-"),
        ("latency p50 / p99 / max", f"{fmt_ms(lat['p50_ms'])} / {fmt_ms(lat['p99_ms'])} / "
                                    f"{fmt_ms(lat['max_ms'])} ms (p99.9 {fmt_ms(lat['p999_ms'])} ms, "
                                    f"{lat['samples']} samples)"),
        ("broker errors", f"{r['error_count']}" + (f" by code: {r['errors']}" if r["errors"] else "")),
        ("broker log WARNING/ERROR", f"{r['broker_log_warnings']} lines"),
        ("broker RSS before / joined", f"{r['rss_before_kb'] / mb:.1f} MB / "
                                       f"{r['rss_joined_kb'] / mb:.1f} MB"),
        ("broker RSS end / after / peak", f"{r['rss_end_of_sending_kb'] / mb:.1f} MB / "
                                          f"{r['rss_after_kb'] / mb:.1f} MB / {r['rss_peak_kb'] / mb:.1f} MB "
                                          f"(sampled every 1 s)"),
        ("broker CPU main / io / total", f"{r['broker_cpu']['main']:.0f}% / {r['broker_cpu']['io']:.0f}% / "
                                         f"{r['broker_cpu']['total']:.0f}% (while sending)"),
        ("load generators CPU", f"{r['generators_cpu']}% (all processes, all threads)"),
    ]
    width = max(len(k) for k, _ in rows)
    p("")
    for k, v in rows:
        p(f"  {k:<{width}}  {v}")
    for line in r["broker_log_warning_lines"]:
        p(f"  broker log: {line}")
    p("")
    verdict = "PASS" if r["error_count"] == 0 and r["not_joined"] == 0 else "FAIL"
    p(f"SUMMARY: {verdict}: {r['joined']}/{r['clients']} clients x 1 msg/s x {r['seconds']:g} s: "
      f"{r['error_count']} broker errors, delivery {100 * (r['delivery_ratio'] or 0):.3f}% "
      f"({r['delivered']}/{r['expected']}), latency p50 {fmt_ms(lat['p50_ms'])} ms p99 "
      f"{fmt_ms(lat['p99_ms'])} ms, broker RSS {r['rss_before_kb'] / mb:.1f} -> "
      f"{r['rss_after_kb'] / mb:.1f} MB (peak {r['rss_peak_kb'] / mb:.1f} MB), broker CPU "
      f"{r['broker_cpu']['total']:.0f}%")
    print("\n".join(lines), flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000, help="clients (default 1000)")
    parser.add_argument("--seconds", type=float, default=60.0, help="sending time (default 60)")
    parser.add_argument("--room-size", type=int, default=10, help="members per room (default 10)")
    parser.add_argument("--generators", type=int, default=4, help="load-generator processes (default 4)")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "load.json",
                        help="results file (default benchmarks/results/load.json)")
    args = parser.parse_args(argv)
    if args.clients < 1 or args.room_size < 1 or args.generators < 1 or args.seconds <= 0:
        parser.error("--clients, --room-size, --generators and --seconds must be positive")
    soft, hard = raise_nofile()
    meta = {"cpus": os.cpu_count(), "python": platform.python_version(), "pyzmq": zmq.__version__,
            "libzmq": zmq.zmq_version(), "nofile": [soft, hard], "git": git_describe(),
            "broker": "python -m zchat broker --port P --pub-port Q --config-dir TMP --new-keys-per-minute 0",
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    workdir = Path(tempfile.mkdtemp(prefix="zchat-load-"))
    t_start = time.monotonic()

    def on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    try:
        r = run_load(args.clients, args.seconds, args.room_size, args.generators, workdir)
        meta["seconds"] = round(time.monotonic() - t_start, 1)
        lines = report(r, meta)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "load": r, "report": lines}, indent=1))
        print(f"(results in {args.json}; {meta['seconds']:.0f} s)")
        return 0 if r["error_count"] == 0 and r["not_joined"] == 0 else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        bench.kill_children()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
