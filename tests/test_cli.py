"""The command line as a new user meets it: keys made with `keygen`, the README's closed-mode
walk-through typed as written in a fresh HOME, and bad input of every kind answered with one
line and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import CLOCK, ROOT, Chat, Proc

from zchat import keys
from zchat.broker import read_state

pytestmark = pytest.mark.timeout(120)

EXEC_BASH = "import os, sys; os.execvp('bash', ['bash', '-c', sys.argv[1]])"


def fresh_home(tmp_path: Path, chat: Chat) -> dict[str, str]:
    """A new user's environment: an empty HOME, `zchat` on the PATH, no zchat settings, and
    the chat's free ports (instead of 1234/1235, which other tests may be using)."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    home.mkdir()
    bin_dir.mkdir()
    shim = bin_dir / "zchat"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m zchat "$@"\n')
    shim.chmod(0o755)
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ZCHAT_") and key != "XDG_CONFIG_HOME"
    }
    return {
        **env,
        "HOME": str(home),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "PYTHONPATH": str(ROOT),
        "NO_COLOR": "1",
        "ZCHAT_PORT": str(chat.port),
        "ZCHAT_PUB_PORT": str(chat.pub_port),
    }


def typed(command: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run a command line as a shell would (so `~` expands as typed)."""
    return subprocess.run(
        ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
    )


def started(chat: Chat, command: str, env: dict[str, str]) -> Proc:
    proc = Proc(["-c", EXEC_BASH, command], env=env)
    chat.procs.append(proc)
    return proc


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n### {title}\n")
    return text[start : text.index("\n### ", start + 1)]


# --- keygen --------------------------------------------------------------------------------------


def test_keygen_output_writes_the_secret_key_at_exactly_that_path(tmp_path: Path, chat: Chat) -> None:
    env = fresh_home(tmp_path, chat)
    path = tmp_path / "keys-elsewhere" / "alice.secret"
    path.parent.mkdir()
    made = typed(f"zchat keygen --name alice --output {path}", env)
    assert made.returncode == 0, made.stderr
    name, identity = made.stdout.split()
    assert name == "alice" and re.fullmatch(r"[0-9a-f]{64}", identity)
    assert sorted(p.name for p in path.parent.iterdir()) == ["alice.secret", "alice.secret.pub"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert keys.load(path).identity == identity  # what --key PATH reads
    assert keys.load_public(path.with_name("alice.secret.pub")) == keys.load(path).public
    again = typed(f"zchat keygen --name alice --output {path}", env)
    assert again.returncode == 2 and again.stderr == f"zchat: {path} exists; not overwriting a key\n"
    assert keys.load(path).identity == identity


def test_the_readme_closed_mode_walk_through_works_as_typed(tmp_path: Path, chat: Chat) -> None:
    env = fresh_home(tmp_path, chat)
    home = Path(env["HOME"])
    section = readme_section("Closed mode")
    blocks = re.findall(r"\n((?:    .*\n)+)", section)
    commands = [
        line.strip().removeprefix("$ ")
        for block in blocks
        for line in block.splitlines()
        if re.match(r"\s*(\$ )?zchat ", line)
    ]
    keygen, keygen_output, client_with_key, broker = commands
    assert keygen == "zchat keygen --name alice" and broker.startswith("zchat broker --authorized-keys ")
    file_block = next(block for block in blocks if "# ~/.config/zchat/authorized_keys" in block)
    entries = [line.split() for line in file_block.splitlines() if not line.strip().startswith("#")]
    inline = re.findall(r"`(zchat [^`]+)`", section)
    client = next(c for c in inline if c.startswith("zchat client --name alice"))
    start_only = next(c for c in inline if c.startswith("zchat --name alice"))
    tap = next(c for c in inline if c.startswith("zchat tap"))

    # 1. Each user makes a key and sends the printed line to the operator.
    printed: dict[str, str] = {}
    for name, *_ in entries:
        made = typed(keygen.replace("alice", name), env)
        assert made.returncode == 0, made.stderr
        said_name, printed[name] = made.stdout.split()
        assert said_name == name
    # 2. The operator writes the file, the printed keys in place of the README's "5f1c0a...e9".
    key_file = Path(broker.split("--authorized-keys ")[1].replace("~", str(home)))

    def write_keys() -> None:
        key_file.write_text(
            "".join(" ".join([name, printed[name], *rest[1:]]) + "\n" for name, *rest in entries)
        )

    write_keys()
    broker_proc = started(chat, broker, env)
    broker_proc.wait_for(r"clients on other machines", timeout=20)
    # 3. Everyone joins as usual; the tap logs with its own key; strangers are refused.
    logger = started(chat, tap, env)
    logger.wait_for(r'"type":"epoch"', timeout=20)
    alice = started(chat, client, env)
    alice.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=20)
    bob = started(chat, start_only.replace("alice", entries[1][0]), env)
    bob.wait_for(rf"{CLOCK} \* Welcome, {entries[1][0]}!", timeout=20)
    alice.send("hello from the walk-through")
    bob.wait_for(rf"{CLOCK} alice: hello from the walk-through$")
    logger.wait_for(r'"name":"alice","text":"hello from the walk-through"')
    stranger = typed("zchat client --name mallory", env)
    assert stranger.returncode == 1 and "the broker refused this key" in stranger.stderr
    # 4. A key kept elsewhere: --output, then --key, after the operator lists it (SIGHUP).
    made = typed(keygen_output, env)
    assert made.returncode == 0, made.stderr
    name, printed["alice"] = made.stdout.split()
    secret = Path(keygen_output.split("--output ")[1].replace("~", str(home)))
    assert name == "alice" and secret.is_file() and secret.with_name(secret.name + ".pub").is_file()
    write_keys()
    mark = len(broker_proc.lines)
    broker_proc.proc.send_signal(signal.SIGHUP)
    broker_proc.wait_for(r"SIGHUP: \d+ authorized keys", start=mark)
    elsewhere = started(chat, client_with_key, env)
    elsewhere.wait_for(rf"{CLOCK} \* Welcome, alice!", timeout=20)


# --- bad input: one line, a non-zero exit, never a traceback -------------------------------------


def subcommands() -> set[str]:
    shown = subprocess.run(
        [sys.executable, "-m", "zchat", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout
    return set(re.search(r"\{([a-z,]+)\}", shown).group(1).split(","))  # type: ignore[union-attr]


def bad_inputs(home: Path, port: int) -> dict[str, list[list[str]]]:
    """Per subcommand ("" = none), argument lists that must each fail cleanly. What every
    command shares (settings, --key, --host) is tried on each; variants of it once."""
    (home / "junk").write_text("not a key\n")
    (home / "binary").write_bytes(bytes(range(256)))
    (home / "a-dir").mkdir()
    (home / "a-file").write_text("x\n")
    public_only = keys.load_or_create(home / "k", "pair") and home / "k" / "pair.key"
    nowhere = ["--port", str(port)]  # nothing listens there
    server = ["--server-key", "ab" * 32]  # a well-formed key: the one thing missing is a broker

    def common(*base: str) -> list[list[str]]:
        return [
            [*base, "--key", str(home / "missing"), *nowhere, *server],
            [*base, "--port", "abc"],
            [*base, "--config", str(home / "missing.toml")],
            [*base, "--server-key", "not-a-key", *nowhere],
            [*base, "--server-key", "~" * 40, *nowhere],
            [*base, "--host", "no-such-host.invalid", *nowhere, *server],
            [*base, "--config-dir", str(home / "a-file"), *nowhere, *server],
        ]

    client = ["client", "--name", "alice"]
    return {
        "": [
            *common("--name", "alice"),
            ["--name", "alice", "--idle-exit", "-5", *nowhere],
            ["--name", "bad name", *nowhere],
            ["no-such-command"],
        ],
        "client": [
            *common(*client),
            *[
                [*client, "--key", str(path), *nowhere, *server]
                for path in (home / "a-dir", home / "junk", home / "binary", public_only)
            ],
            [*client, "--port", "99999"],
            [*client, "--config", str(home / "binary")],
            [*client, *nowhere, *server],
        ],
        "send": [
            *common("send", "--name", "alice", "hi"),
            ["send", "--name", "alice", "--timeout", "nan", "hi"],
            ["send", "--name", "alice", "--timeout", "2", "hi", *nowhere, *server],
            ["send", "--name", "alice", "--timeout", "-1", "hi"],
            ["send", "hi", *nowhere, *server],
            ["send", "--name", "alice", "--room", "bad room", "hi", *nowhere, *server],
            ["send", "--name", "alice", "hi", *nowhere, "--server-key", "0" * 64],  # no usable key
        ],
        "tap": [
            *common("tap"),
            ["tap", "--output", str(home / "no-dir" / "log"), *nowhere, *server],
            ["tap", "--output", str(home / "a-dir"), *nowhere, *server],
            ["tap", "--output", str(home / "log"), "--rotate-bytes", "0", *nowhere, *server],
            ["tap", "--output", str(home / "log"), "--rotate-when", "sometimes", *nowhere, *server],
        ],
        "relay": [
            ["relay", "--upstream", "127.0.0.1:1", "--server-key", "not-a-key"],
            ["relay", *server],
            ["relay", "--upstream", "127.0.0.1:abc", *server],
            ["relay", "--upstream", "no-such-host.invalid", *server],
            ["relay", "--upstream", "127.0.0.1:1", *server, "--config-dir", str(home / "a-file")],
            ["relay", "--upstream", "127.0.0.1:1", *server, "--authorized-keys", str(home / "missing")],
            ["relay", "--upstream", "127.0.0.1:1", *server, "--relay-keys", str(home / "junk")],
        ],
        "stats": [
            *common("stats"),
            ["stats", "--timeout", "2", *nowhere, *server],
            ["stats", "--timeout", "nan"],
            ["stats", "--timeout", "0"],
        ],
        "health": [
            *common("health"),
            ["health", "--timeout", "2", *nowhere, *server],
            ["health", "--timeout", "inf"],
        ],
        "history": [["history", "--db", str(home / path)] for path in ("missing", "junk", "a-dir")]
        + [
            ["history", "--db", str(home / "junk"), "--limit", "0"],
            ["history", "--limit", "many"],
            ["history", "--db", str(home / "junk"), "--since", "yesterday"],
            ["history", "--db", str(home / "junk"), "--room", "bad room"],
            ["history", "--config", str(home / "missing.toml")],
            ["history", "--host", "127.0.0.1", *nowhere, "--room", "lobby", "--server-key", "zz"],
        ],
        "keygen": [
            ["keygen", "--name", "bad name"],
            ["keygen", "--output", str(home / "no-dir" / "k")],
            ["keygen", "--output", str(home / "a-file")],
            ["keygen", "--config-dir", str(home / "a-file")],
        ],
        "broker": [
            ["broker", "--port", "abc"],
            ["broker", "--port", "0"],
            ["broker", "--history-keep", "-1", *nowhere],
            ["broker", "--config", str(home / "binary")],
            ["broker", "--authorized-keys", str(home / "missing"), *nowhere],
            ["broker", "--authorized-keys", str(home / "binary"), *nowhere],
            ["broker", "--db", str(home / "junk"), *nowhere],
            ["broker", "--db", str(home / "a-dir"), *nowhere],
            ["broker", "--host", "no-such-host.invalid", *nowhere],
            ["broker", "--config-dir", str(home / "a-file"), *nowhere],
        ],
    }


def test_bad_input_to_every_command_gets_one_line_and_a_non_zero_exit(tmp_path: Path, chat: Chat) -> None:
    env = fresh_home(tmp_path, chat)
    del env["ZCHAT_PORT"], env["ZCHAT_PUB_PORT"]
    home = Path(env["HOME"])
    cases = bad_inputs(home, chat.port)
    assert set(cases) - {""} == subcommands()  # every command the help lists is tried

    def run(args: list[str]) -> tuple[list[str], subprocess.CompletedProcess[str]]:
        return args, subprocess.run(
            [sys.executable, "-m", "zchat", *args],
            cwd=home,
            env=env,
            capture_output=True,
            text=True,
            timeout=40,
            stdin=subprocess.DEVNULL,
        )

    try:
        with ThreadPoolExecutor(6) as pool:  # most of the time goes into starting Python
            outcomes = list(pool.map(run, [args for group in cases.values() for args in group]))
        assert read_state(home / ".config" / "zchat") is None, "a bad start left a broker running"
    finally:
        subprocess.run(
            [sys.executable, "-m", "zchat", "broker", "--stop"], env=env, timeout=30, capture_output=True
        )
    problems = []
    for args, done in outcomes:
        lines = done.stderr.splitlines()
        one_line = (
            done.returncode != 0 and len(lines) == 1 and lines[0].strip() and "Traceback" not in lines[0]
        )
        if "--key" in args:  # the promised wording and exit code
            one_line = (
                one_line
                and done.returncode == 2
                and lines[0].startswith(f"zchat: cannot read key file {args[args.index('--key') + 1]}: ")
            )
        if not one_line:
            problems.append(f"zchat {' '.join(args)}: exit {done.returncode}, stderr {done.stderr!r}")
    assert problems == []
