"""Outages, busy-waiting, kicked and banned clients, a stepped wall clock: end to end, with
real broker and client processes over tcp with CURVE (issue 14, items 1 to 3; issue 10's
monotonic clock). The screens of the same cases are checked line by line, in process, by
tests/test_chat_screens.py."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import CLOCK, ROOT, Chat, Proc
from peers import RawPeer, broker_key
from test_e2e_closed import closed  # noqa: F401  (a fixture)

from zchat import keys
from zchat import limits as L
from zchat.client import ChatClient, ClientSettings
from zchat.endpoints import Endpoints
from zchat.events import ClientEvent, Status, StatusState
from zchat.protocol import Heartbeat, Message

pytestmark = pytest.mark.timeout(120)

LOST = rf"^{CLOCK} \* Connection to the broker lost"


def refusals_in_log(broker: Proc, since: int, identity: str) -> list[str]:
    """Errors the broker logged for `identity` (it logs each error it sends: code, no text)."""
    return [line for line in broker.lines[since:] if f"to {identity[:12]}:" in line
            or f"from {identity[:12]}:" in line]


def test_lines_typed_during_an_outage_arrive_once_in_order_and_nothing_is_refused(chat: Chat) -> None:
    """Issue 14, item 1: typed while the broker is down, shown as pending, sent after the rejoin,
    in order, paced: the new broker refuses nothing (no pings or lines queued before the join)."""
    chat.start_broker()
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$")
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    alice.wait_for(LOST, timeout=10)
    time.sleep(6)  # the outage lasts: the old client queued a ping a second meanwhile
    lines = [f"in the dark {i}" for i in range(25)]  # more than the broker's burst
    for line in lines:
        alice.send(line)
    alice.wait_for(rf"^{CLOCK} \(pending\) alice: in the dark 24$", timeout=10)
    broker = chat.start_broker()
    bob.wait_for(rf"^{CLOCK} alice: in the dark 24$", timeout=20)
    said = [line.split(": ", 1)[1] for line in bob.lines if re.match(rf"^{CLOCK} alice: in the dark", line)]
    assert said == lines
    alice.wait_for(rf"^{CLOCK} alice: in the dark 24$", timeout=5)
    assert [line for line in alice.lines if re.match(rf"^{CLOCK} ! ", line)] == []
    identity = chat.client_key("alice").identity
    assert refusals_in_log(broker, 0, identity) == [], broker.lines


def test_a_refused_message_is_never_sent_again(chat: Chat) -> None:
    chat.start_broker()
    alice = chat.joined_client("alice")
    alice.send("/msg ghost anyone?")  # refused by the broker: nobody of that name
    alice.wait_for(rf"^{CLOCK} ! unknown user 'ghost'")
    chat.broker.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    chat.broker.proc.wait(5)  # type: ignore[union-attr]
    alice.wait_for(LOST, timeout=10)
    broker = chat.start_broker()
    alice.wait_for(rf"^{CLOCK} \* Reconnected", timeout=10)
    alice.send("after the restart")
    alice.wait_for(rf"^{CLOCK} alice: after the restart$")
    assert refusals_in_log(broker, 0, chat.client_key("alice").identity) == [], broker.lines
    assert alice.count(rf"^{CLOCK} ! ") == 1


def _cpu_of_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_zchat_send_without_a_broker_waits_idle(chat: Chat) -> None:
    """Issue 14, item 2: nobody listens; `zchat send` exits 3 after its --timeout, idle meanwhile
    (it used 70% of a core)."""
    chat.start_broker()
    chat.broker.stop()  # type: ignore[union-attr]  (its key stays in the config dir)
    before = _cpu_of_children()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "zchat", "send", *chat.endpoint_args(), "--name", "deploy",
                           "--timeout", "8", "hello?"], cwd=ROOT, env=chat.env, capture_output=True,
                          text=True, timeout=30)
    elapsed = time.monotonic() - started
    cpu = _cpu_of_children() - before
    assert done.returncode == 3, done.stderr
    assert 8 <= elapsed < 12
    assert cpu < 1.5, f"{cpu:.2f} s of CPU in {elapsed:.1f} s"  # start-up and imports are most of it


def test_a_client_waiting_for_a_lost_broker_is_idle(chat: Chat) -> None:
    """Issue 14, item 2: connected, then the broker dies: the client's I/O thread sleeps on its
    poller (it busy-looped at 65% of a core)."""
    chat.start_broker()
    pair = keys.load_or_create(keys.client_keys_dir(chat.config_dir), "idle")
    endpoints = Endpoints(port=chat.port, pub_port=chat.pub_port)
    lost = threading.Event()

    def on_event(event: ClientEvent) -> None:
        if isinstance(event, Status) and event.state in (StatusState.LOST, StatusState.SHUTDOWN):
            lost.set()

    client = ChatClient(ClientSettings(endpoints, broker_key(chat.config_dir), pair), on_event)
    client.start()
    try:
        client.join("idle", timeout=10)
        chat.broker.stop()  # type: ignore[union-attr]
        assert lost.wait(10)
        lost.clear()
        lost.wait(L.BROKER_SILENCE_LOST + 0.5)  # past the silence that used to start the spin
        cpu = time.process_time()
        lost.wait(3.0)  # three seconds of waiting for the broker (never set again)
        used = time.process_time() - cpu
        assert used < 0.3, f"{used:.2f} s of CPU in 3 s"
    finally:
        client.close(leave=False)


def test_a_kicked_client_says_how_to_come_back_and_stays_quiet(closed: tuple[Chat, Path]) -> None:  # noqa: F811
    """Issue 14, item 3: after a kick, no pings and no lines reach the broker (it logged
    `not_joined` every second); the user is told about /reconnect, which brings them back."""
    chat, _ = closed
    alice = chat.joined_client("alice")
    bob = chat.joined_client("bob")
    alice.send("/kick bob spam")
    bob.wait_for(rf"^{CLOCK} \* You were kicked by alice: spam\. Type /reconnect to come back, "
                 r"or /quit to leave\.$")
    assert chat.broker is not None
    bob_id = chat.client_key("bob").identity
    # A ping bob sent before the kick reached him may still arrive and be refused: the check
    # starts once the kick is carried out (his connections cut, after the notice's grace).
    chat.broker.wait_for(rf"cut \d+ connection\(s\) of {bob_id[:12]}")
    mark = len(chat.broker.lines)
    bob.send("hello?")
    bob.wait_for(rf"^{CLOCK} ! you were kicked: type /reconnect to come back$")
    time.sleep(3)  # an interval in which the old client sent three pings
    assert refusals_in_log(chat.broker, mark, bob_id) == [], chat.broker.lines[mark:]
    assert alice.count("bob: hello?") == 0
    back = len(alice.lines)
    bob.send("/reconnect")
    bob.wait_for(rf"^{CLOCK} \* Reconnected \(rejoined\)\.$", timeout=10)
    alice.wait_for(rf"^{CLOCK} - bob has joined the chat\.$", start=back, timeout=10)
    bob.send("back again")
    alice.wait_for(rf"^{CLOCK} bob: back again$")


BROKER_WITH_A_STEPPED_WALL_CLOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import zchat.broker
    from zchat.cli import main

    flag = Path(sys.argv[1])

    class SteppedClock:
        # time.time() jumps back 60 s once the flag file exists; everything else is real.
        def __getattr__(self, name):
            return getattr(time, name)

        @staticmethod
        def time():
            return time.time() - (60.0 if flag.exists() else 0.0)

    zchat.broker.time = SteppedClock()
    sys.exit(main(["broker", *sys.argv[2:]]))
""")


def test_the_broker_keeps_its_rhythm_when_the_wall_clock_steps_back(chat: Chat, tmp_path: Path) -> None:
    """A 60 s step back of the wall clock stopped the broker's heartbeats for 60 s (every client
    said "connection lost") and drove rate buckets to -280. Now only event times move."""
    flag = tmp_path / "step"
    script = tmp_path / "stepped_broker.py"
    script.write_text(BROKER_WITH_A_STEPPED_WALL_CLOCK)
    broker = Proc([str(script), str(flag), *chat.endpoint_args()], env=chat.env, stdin=False)
    chat.procs.append(broker)
    broker.wait_for("Server started, waiting for clients", timeout=15)
    chat.broker = broker
    spy = RawPeer(chat.port, chat.pub_port, broker_key(chat.config_dir), [b"sys/", b"r/"])
    try:
        alice = chat.joined_client("alice")
        _, beat = spy.wait_for(lambda topic, event: isinstance(event, Heartbeat), timeout=10)
        flag.touch()
        stepped = time.time()
        beats = []
        while len(beats) < 3:  # heartbeats go on, about a second apart, stamped 60 s earlier
            _, beat = spy.wait_for(lambda topic, event, last=beat.seq: isinstance(event, Heartbeat)
                                   and event.seq > last, timeout=3)
            beats.append(beat)
        assert all(stepped - 62 < beat.ts < stepped - 55 for beat in beats), [b.ts for b in beats]
        for i in range(15):  # well within the bucket: none refused
            alice.send(f"after the step {i}")
        alice.wait_for(rf"^{CLOCK} alice: after the step 14$", timeout=10)
        _, said = spy.wait_for(lambda topic, event: isinstance(event, Message)
                               and event.text == "after the step 0", timeout=5)
        assert stepped - 62 < said.ts < stepped - 55
        assert alice.count(rf"^{CLOCK} ! ") == 0
        assert alice.count("Connection to the broker lost") == 0
    finally:
        spy.close()

