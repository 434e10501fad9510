"""Issue 14's outage scenario, run again and again: lines typed while the broker is down.

    python benchmarks/outage.py [--runs 10] [--outage 25]

Per run: a real broker and two real piped clients (alice, bob) over tcp with CURVE. The
broker is killed (kill -9); 12 s later alice types three lines; the broker is started
again when the outage has lasted `--outage` seconds. The run passes when bob sees the
three lines after the restart, once each, in order, and alice saw no refusal. Prints one
line per run and a summary; exits 1 if any run failed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import Chat  # noqa: E402

TYPED_AFTER = 12.0  # seconds into the outage when alice types


def one_run(outage: float) -> tuple[bool, float, str]:
    """(passed, seconds from the restart to bob's last line, what went wrong)."""
    with tempfile.TemporaryDirectory() as tmp:
        chat = Chat(Path(tmp))
        try:
            chat.start_broker()
            alice = chat.joined_client("alice")
            bob = chat.joined_client("bob")
            alice.wait_for(r"- bob has joined the chat\.", timeout=15)
            chat.broker.proc.kill()  # type: ignore[union-attr]
            chat.broker.proc.wait(5)  # type: ignore[union-attr]
            killed = time.monotonic()
            alice.wait_for(r"\* Connection to the broker lost", timeout=10)
            time.sleep(max(0.0, killed + TYPED_AFTER - time.monotonic()))  # the outage itself
            lines = [f"typed in the dark {i}" for i in range(3)]
            for line in lines:
                alice.send(line)
            time.sleep(max(0.0, killed + outage - time.monotonic()))
            chat.broker = None
            chat.start_broker()
            restarted = time.monotonic()
            bob.wait_for(rf"alice: {lines[-1]}$", timeout=30)
            took = time.monotonic() - restarted
            alice.wait_for(rf"alice: {lines[-1]}$", timeout=10)
            said = [line.split("alice: ", 1)[1] for line in bob.lines if re.search(r"\] alice: typed", line)]
            refused = [line for line in alice.lines if re.match(r"^\[\d\d:\d\d:\d\d\] ! ", line)]
            if said != lines:
                return False, took, f"bob saw {said}"
            if refused:
                return False, took, f"alice was told {refused}"
            return True, took, ""
        except AssertionError as exc:
            return False, float("nan"), str(exc).splitlines()[0]
        finally:
            chat.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--outage", type=float, default=25.0, help="seconds the broker is down")
    args = parser.parse_args()
    passed = 0
    times = []
    for run in range(1, args.runs + 1):
        ok, took, why = one_run(args.outage)
        passed += ok
        if ok:
            times.append(took)
        print(f"run {run}: {'ok' if ok else 'FAILED'}, last line {took:.2f} s after the restart"
              + (f" ({why})" if why else ""), flush=True)
    worst = f", at most {max(times):.2f} s after the restart" if times else ""
    print(f"{passed}/{args.runs} runs delivered every line typed during a {args.outage:g} s outage at the "
          f"first reconnect, in order, once{worst}")
    return 0 if passed == args.runs else 1


if __name__ == "__main__":
    sys.exit(main())
