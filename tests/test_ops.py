"""Operating a broker, end to end: live stats, health, settings, logging and SIGHUP reload.

Real broker processes on free ports with CURVE (the `chat` fixture). Every wait is for an
observable event (a stats event on sys/, a log line, a process exit) with a deadline.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import zmq
from conftest import ROOT, Chat, Proc
from peers import RawPeer, broker_key

from zchat import keys
from zchat import limits as L
from zchat.protocol import Error, Stats, Welcome

pytestmark = pytest.mark.timeout(90)

FAST_STATS = ("--stats-interval", "0.3")


def clean_env(chat: Chat, **extra: str) -> dict[str, str]:
    """The fixture's environment without the developer's ZCHAT_* settings, plus `extra`."""
    env = {k: v for k, v in chat.env.items() if not k.startswith("ZCHAT_")}
    return {**env, **extra}


def zchat(chat: Chat, *args: str, env: dict[str, str] | None = None,
          timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "zchat", *args], cwd=ROOT, env=env or clean_env(chat),
                          capture_output=True, text=True, timeout=timeout)


def epoch_of(chat: Chat) -> str:
    return json.loads((keys.broker_dir(chat.config_dir) / "broker.json").read_text())["epoch"]


def sys_listener(chat: Chat, *topics: bytes) -> RawPeer:
    return RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"sys/", *topics])


def raw_join(peer: RawPeer, name: str, timeout: float = 10.0) -> Welcome:
    """Join by hand (the private stream must be subscribed first); resend until welcomed."""
    peer.sub.subscribe(f"u/{peer.identity}/".encode())
    peer.sub.subscribe(b"r/lobby/")  # a join completes once its room is subscribed too
    join = json.dumps({"type": "join", "name": name, "history": 0}).encode()
    for _ in range(int(timeout / 0.3)):
        peer.send(join)
        try:
            _, welcome = peer.wait_for(lambda t, e: isinstance(e, Welcome), timeout=0.3)
            return welcome  # type: ignore[return-value]
        except AssertionError:
            continue
    raise AssertionError(f"{name} was not welcomed within {timeout} s")


# --- stats --------------------------------------------------------------------------------------


def test_stats_reflect_traffic_drops_and_errors(chat: Chat) -> None:
    chat.start_broker(*FAST_STATS)
    watcher = sys_listener(chat)
    fuzzer = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [])
    try:
        alice = chat.joined_client("alice")
        bob = chat.joined_client("bob")
        for i in range(3):
            alice.send(f"from alice {i}")
        for i in range(2):
            bob.send(f"from bob {i}")
        alice.send("/msg bob a private one")
        bob.wait_for(r"<- alice: a private one$")
        alice.wait_for(r"bob: from bob 1$")
        # Bad input from a key that is not a member, each answered on its private stream.
        raw_join(fuzzer, "fuzzer")  # proves its subscriptions are installed; then it leaves
        fuzzer.send(json.dumps({"type": "leave"}).encode())
        fuzzer.send(b"\xff not json")
        fuzzer.send(b'{"type":"say","room":"lobby","text":"' + b"x" * (L.MAX_BODY_BYTES + 1000) + b'"}')
        fuzzer.send(b'{"type":"ping"}', b"second frame")
        for code in ("bad_request", "too_large", "too_many_frames"):
            fuzzer.wait_for(lambda t, e, code=code: isinstance(e, Error) and e.code == code)

        _, stats = watcher.wait_for(lambda t, e: isinstance(e, Stats) and e.drops >= 3
                                    and e.messages_in >= 6 and e.online == 2, timeout=15)
        assert isinstance(stats, Stats)
        assert stats.epoch == epoch_of(chat)
        assert stats.online == 2 and stats.rooms == 1  # the fuzzer left again
        assert stats.messages_in == 6  # 5 in the room, 1 private, each counted once
        assert stats.drops == 3
        assert stats.drops_by_kind == {"bad_request": 1, "too_large": 1, "too_many_frames": 1}
        assert stats.errors == {"bad_request": 1, "too_large": 1, "too_many_frames": 1}
        assert stats.frames_in >= 6 + 3 + 3  # messages, bad frames, joins (and pings)
        assert stats.published > stats.messages_in
        # Stored: 3 joins, 5 messages and the fuzzer's leave in #lobby; private ones never.
        assert stats.history == 3 + 5 + 1
        assert stats.rate_limited == 0 and stats.rate_limited_total == 0
        assert 0 < stats.interval < 5 and stats.uptime > 0
        assert stats.messages_in_rate >= 0 and stats.published_rate > 0
    finally:
        watcher.close()
        fuzzer.close()


def test_stats_count_rate_limited_senders(chat: Chat) -> None:
    chat.start_broker(*FAST_STATS, "--rate-burst", "2", "--rate-per-second", "0.2")
    watcher = sys_listener(chat)
    flooder = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"r/lobby/"])
    try:
        raw_join(flooder, "flooder")
        for i in range(6):
            flooder.send(json.dumps({"type": "say", "room": "lobby", "text": f"flood {i}"}).encode())
        flooder.wait_for(lambda t, e: isinstance(e, Error) and e.code == "rate_limited")
        _, stats = watcher.wait_for(lambda t, e: isinstance(e, Stats) and e.rate_limited_total >= 4,
                                    timeout=15)
        assert stats.rate_limited == 1  # one sender, in the interval that saw it refused
        assert stats.rate_limited_total == 4  # a burst of 2, then refused
        assert stats.errors == {"rate_limited": 1}  # told once
        assert stats.messages_in == 2
        # The next interval saw no refusals: the count is per interval, the total stays.
        _, later = watcher.wait_for(lambda t, e: isinstance(e, Stats) and e.seq > stats.seq, timeout=5)
        assert later.rate_limited == 0 and later.rate_limited_total == 4
    finally:
        watcher.close()
        flooder.close()


def test_zchat_stats_json_and_table(chat: Chat) -> None:
    chat.start_broker()  # the default interval: a new sys/ subscriber gets stats within about a second
    chat.joined_client("alice")
    done = zchat(chat, "stats", "--json", *chat.endpoint_args())
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["type"] == "stats" and record["epoch"] == epoch_of(chat)
    assert record["online"] == 1 and record["rooms"] == 1
    assert {"messages_in", "published_rate", "drops", "errors", "history", "uptime"} <= set(record)

    table = zchat(chat, "stats", *chat.endpoint_args())
    assert table.returncode == 0, table.stderr
    assert re.match(rf"broker {epoch_of(chat)}, up \d+s, at ", table.stdout)
    assert re.search(r"^  online +1$", table.stdout, re.M)
    assert re.search(r"^  history +\d+ events stored$", table.stdout, re.M)


def test_zchat_stats_watch_follows_until_stopped(chat: Chat) -> None:
    chat.start_broker(*FAST_STATS)
    watch = Proc(["-m", "zchat", "stats", "--watch", "--json", *chat.endpoint_args()], env=clean_env(chat),
                 stdin=False)
    chat.procs.append(watch)
    first = watch.wait_for(r'^\{"type":"stats"', timeout=10)
    watch.wait_for(r'^\{"type":"stats"', start=watch.lines.index(first) + 1, timeout=10)
    watch.proc.send_signal(signal.SIGINT)
    assert watch.wait_exit(10) == 0


def test_zchat_stats_without_a_broker_fails_clearly(chat: Chat) -> None:
    keys.load_or_create(keys.broker_dir(chat.config_dir), keys.BROKER_KEY_NAME)  # a key, no broker
    done = zchat(chat, "stats", "--timeout", "1", *chat.endpoint_args())
    assert done.returncode == 1
    assert done.stderr.startswith("zchat stats: no answer from tcp://127.0.0.1:")


# --- health -------------------------------------------------------------------------------------


def test_health_of_a_running_and_a_stopped_broker(chat: Chat) -> None:
    broker = chat.start_broker()
    done = zchat(chat, "health", *chat.endpoint_args())
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"ok: broker at tcp://127\.0\.0\.1:{chat.pub_port}, epoch {epoch_of(chat)}, "
                        r"0 online, up \d+s\n", done.stdout), done.stdout
    broker.proc.send_signal(signal.SIGTERM)
    assert broker.wait_exit(10) == 0  # a clean stop
    broker.wait_for(r"broker stopped \(exit 0\)")
    done = zchat(chat, "health", "--timeout", "1", *chat.endpoint_args())
    assert done.returncode == 1 and done.stdout == ""
    assert re.fullmatch(rf"zchat health: no answer from tcp://127\.0\.0\.1:{chat.pub_port} within 1 s: "
                        r"connection refused \(is the broker running\?\)\n", done.stderr), done.stderr


def test_health_with_the_wrong_broker_key(chat: Chat) -> None:
    chat.start_broker()
    wrong = keys.KeyPair(*zmq.curve_keypair()).identity
    done = zchat(chat, "health", "--server-key", wrong, *chat.endpoint_args())
    assert done.returncode == 3
    assert "security handshake" in done.stderr and "--server-key" in done.stderr


def test_health_when_the_broker_refuses_the_key(chat: Chat, tmp_path: Path) -> None:
    someone = keys.load_or_create(tmp_path, "someone")
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f"someone {someone.identity} user\n")
    chat.start_broker("--authorized-keys", str(authorized))
    done = zchat(chat, "health", *chat.endpoint_args())  # the config dir's own monitor key
    assert done.returncode == 3
    assert "refused this key" in done.stderr
    # With an authorized key it answers.
    done = zchat(chat, "health", "--key", str(tmp_path / "someone.key_secret"), *chat.endpoint_args())
    assert done.returncode == 0, done.stderr


# --- settings -----------------------------------------------------------------------------------


def test_print_config_shows_precedence(chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "zchat.toml"
    path.write_text("port = 3000\n[broker]\nrate_burst = 7\nhistory_keep = 100\nhistory_days = 9\n")
    env = clean_env(chat, ZCHAT_RATE_BURST="8", ZCHAT_HISTORY_DAYS="2")
    done = zchat(chat, "broker", "--config", str(path), "--config-dir", str(chat.config_dir),
                 "--rate-burst", "9", "--print-config", env=env)
    assert done.returncode == 0, done.stderr
    settings = tomllib.loads(done.stdout)
    assert settings["port"] == 3000 and settings["broker"]["rate_burst"] == 9
    assert settings["broker"]["history_days"] == 2.0 and settings["broker"]["history_keep"] == 100
    sources = {m[1]: m[2] for m in re.finditer(r"^(\w+) += .*?# (.*)$", done.stdout, re.M)}
    assert sources["rate_burst"] == "flag --rate-burst"
    assert sources["history_days"] == "env ZCHAT_HISTORY_DAYS"
    assert sources["history_keep"] == f"file {path} [broker]"
    assert sources["port"] == f"file {path}"
    assert sources["rate_per_second"] == "default"
    assert not keys.broker_dir(chat.config_dir).exists()  # printing started nothing


@pytest.mark.parametrize("content, expected", [
    ("[broker]\nrate_burst = 0\n", "broker.rate_burst: must be at least 1, got 0"),
    ("[broker]\nrate_brust = 5\n", "unknown key 'broker.rate_brust' (did you mean 'rate_burst'?)"),
    ("port = \"high\"\n", 'port: expected an integer, got a string ("high")'),
    ("[broker]\nmax_peers = 0\n", "broker.max_peers: must be at least 1, got 0"),
    ("[broker]\nhistory_days = inf\n", "broker.history_days: must be a finite number, got inf"),
    ("[client]\nnmae = \"alice\"\n", "unknown key 'client.nmae' (did you mean 'name'?)"),
    ("[[broker]]\nport = 1\n", "'broker' must be a table ([broker]), got an array"),
    ("[broker\n", "invalid TOML: "),
])
def test_an_invalid_config_file_stops_start_up_with_one_line(chat: Chat, tmp_path: Path, content: str,
                                                             expected: str) -> None:
    path = tmp_path / "zchat.toml"
    path.write_text(content)
    done = zchat(chat, "broker", "--config", str(path), *chat.endpoint_args(), timeout=20)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith(f"zchat: config file {path}: {expected}")
    assert done.stderr.count("\n") == 1
    if not expected.startswith("invalid TOML"):  # else tomllib's own words follow
        assert done.stderr == f"zchat: config file {path}: {expected}\n"
    assert not (keys.broker_dir(chat.config_dir) / "broker.json").exists()


def test_an_invalid_environment_value_stops_start_up_with_one_line(chat: Chat) -> None:
    done = zchat(chat, "broker", *chat.endpoint_args(), env=clean_env(chat, ZCHAT_STATS_INTERVAL="often"))
    assert done.returncode == 2
    assert done.stderr == 'zchat: environment ZCHAT_STATS_INTERVAL="often": expected a number\n'
    done = zchat(chat, "broker", *chat.endpoint_args(), env=clean_env(chat, ZCHAT_NEW_KEYS_PER_MINUTE="-1"))
    assert done.returncode == 2
    assert done.stderr == 'zchat: environment ZCHAT_NEW_KEYS_PER_MINUTE="-1": must be at least 0, got -1\n'
    done = zchat(chat, "broker", *chat.endpoint_args(), "--connections-per-key", "0", env=clean_env(chat))
    assert done.returncode == 2
    assert done.stderr == "zchat: --connections-per-key: must be at least 1, got 0\n"


def test_the_config_file_and_env_reach_the_broker_and_clients(chat: Chat) -> None:
    """Ports from the default file in the config dir, the rate limit from the environment."""
    (chat.config_dir).mkdir(parents=True, exist_ok=True)
    (chat.config_dir / "zchat.toml").write_text(f"port = {chat.port}\npub_port = {chat.pub_port}\n"
                                                "[broker]\nrate_burst = 5\n")
    env = clean_env(chat, ZCHAT_RATE_BURST="6")
    broker = Proc(["broker.py", "--config-dir", str(chat.config_dir)], env=env, stdin=False)
    chat.procs.append(broker)
    broker.wait_for(rf"input +\(PULL\) tcp://127\.0\.0\.1:{chat.port}$", timeout=15)
    peer = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [])
    try:
        assert raw_join(peer, "probe").rate_burst == 6
    finally:
        peer.close()
    done = zchat(chat, "health", "--config-dir", str(chat.config_dir))  # ports from the file too
    assert done.returncode == 0, done.stderr


# --- logging and reload -------------------------------------------------------------------------


def test_the_log_has_joins_and_refusals_and_never_private_text(chat: Chat) -> None:
    broker = chat.start_broker("--log-level", "debug", "--log-json")
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("/msg bob the-secret-word-8125")
    bob.wait_for(r"the-secret-word-8125")
    alice.send("/msg nobody-here another-secret-3391")
    alice.wait_for(r"unknown user")
    bob.send("/quit")
    assert bob.wait_exit(10) == 0
    broker.wait_for(r'"message": "bob left \(quit\) #lobby"')
    records = [json.loads(line) for line in broker.lines if line.startswith("{")]
    messages = [r["message"] for r in records]
    assert records and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    assert any(m.startswith("broker started: pid ") for m in messages)
    assert "alice joined #lobby" in messages and "bob joined #lobby" in messages
    assert any(re.fullmatch(r"error to [0-9a-f]{12}: no_such_user", m) for m in messages)
    text = "\n".join(broker.lines)
    assert "the-secret-word-8125" not in text and "another-secret-3391" not in text


def test_sighup_reloads_the_rate_limit_and_says_what_needs_a_restart(chat: Chat, tmp_path: Path) -> None:
    path = tmp_path / "zchat.toml"
    path.write_text("[broker]\nrate_burst = 20\n")
    broker = chat.start_broker("--config", str(path))
    before = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [])
    after = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"r/lobby/"])
    try:
        assert raw_join(before, "before").rate_burst == 20
        path.write_text('[broker]\nrate_burst = 3\nhost = "127.0.0.2"\n')
        broker.proc.send_signal(signal.SIGHUP)
        broker.wait_for(r"SIGHUP: rate_burst: 20 -> 3 \(applied\)")
        broker.wait_for(r"SIGHUP: host: 127\.0\.0\.1 -> 127\.0\.0\.2 needs a restart \(not applied\)")
        assert raw_join(after, "after").rate_burst == 3
        for i in range(5):  # the new bucket: 3 at once, then refused
            after.send(json.dumps({"type": "say", "room": "lobby", "text": f"m{i}"}).encode())
        after.wait_for(lambda t, e: isinstance(e, Error) and e.code == "rate_limited")

        # An invalid file on reload changes nothing and says why, in one line.
        path.write_text("[broker]\nrate_burst = -1\n")
        mark = len(broker.lines)
        broker.proc.send_signal(signal.SIGHUP)
        line = broker.wait_for(r"SIGHUP: keeping the current settings", start=mark)
        assert line.endswith(f"config file {path}: broker.rate_burst: must be at least 1, got -1")
        peer = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [])
        try:
            assert raw_join(peer, "later").rate_burst == 3
        finally:
            peer.close()
        assert broker.proc.poll() is None
    finally:
        before.close()
        after.close()


def test_systemd_unit_is_sane() -> None:
    unit = (ROOT / "contrib" / "zchat-broker.service").read_text()
    sections = re.findall(r"^\[(\w+)\]$", unit, re.M)
    assert sections == ["Unit", "Service", "Install"]
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["Type"] == "simple" and settings["Restart"] == "on-failure"
    assert "zchat broker --config " in settings["ExecStart"]
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["NoNewPrivileges"] == "yes" and settings["ProtectSystem"] == "strict"
    assert "User" in settings and "LimitNOFILE" in settings
    assert os.path.basename(settings["ExecStart"].split()[0]) == "zchat"
