"""Names that only look like another (issue 13, item 10): the pure core refuses a name whose
confusables skeleton (Unicode TS #39, case-folded) equals that of a name another key holds
online, and reserves admin, server, root, system and zchat (and their look-alikes) for
closed mode's admin keys. Unit tests, no sockets."""

from __future__ import annotations

import importlib.util
import logging
import secrets
from pathlib import Path

import pytest
from corekit import LOBBY, error, kinds, send, subscribe_all, u

from zchat import confusables
from zchat.auth import Account, KeyFileError, load_authorized_keys, lookalike_names, parse_authorized_keys
from zchat.core import BrokerCore
from zchat.protocol import (
    RESERVED_NAMES,
    Code,
    Renamed,
    Welcome,
    lookalike_key,
    reserved_name,
)

pytestmark = pytest.mark.timeout(30)

A, B, C, D = "a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32
ROOT = Path(__file__).resolve().parent.parent


def join(core: BrokerCore, identity: str, name: str, now: float = 0.0) -> list:
    subscribe_all(core, identity, now)
    return send(core, identity, now, type="join", name=name, history=0)


def welcomed(core: BrokerCore, identity: str, name: str) -> None:
    out = join(core, identity, name)
    assert isinstance(out[0].event, Welcome), kinds(out)


def refused(core: BrokerCore, identity: str, name: str) -> str:
    """Join as `name`, expect name_taken; its detail."""
    event = error(join(core, identity, name), identity)
    assert event.code == Code.NAME_TAKEN
    assert core.member_name(identity) is None
    return event.detail


# --- the skeleton -----------------------------------------------------------------------


@pytest.mark.parametrize(("one", "other"), [
    ("aIice", "alice"), ("a1ice", "alice"), ("AIice", "alice"), ("ALlCE", "alice"),
    ("rnallory", "mallory"), ("RNallory", "Mallory"), ("b0b", "bob"), ("B0B", "bob"),
    ("Alice", "alice"), ("r00t", "root"), ("adrnin", "admin"), ("Ian", "lan"),
])
def test_lookalikes_share_a_key(one: str, other: str) -> None:
    assert lookalike_key(one) == lookalike_key(other)


@pytest.mark.parametrize(("one", "other"), [
    ("alice", "alicia"), ("bob", "bab"), ("dave", "clave"), ("carol", "caro1e"), ("bob", "bob2"),
])
def test_different_names_have_different_keys(one: str, other: str) -> None:
    assert lookalike_key(one) != lookalike_key(other)


def test_the_key_comes_from_unicode_data_and_is_stable() -> None:
    """The table is generated from confusables.txt: I, 1 and | are prototyped by l, 0 by O,
    m by rn (not a hand-made list); the key is idempotent."""
    assert {c: confusables.ASCII_PROTOTYPES[c] for c in "I1|0m"} == {
        "I": "l", "1": "l", "|": "l", "0": "O", "m": "rn"}
    for name in ("aIice", "M0M", "x|y", "Im1O0"):
        assert lookalike_key(lookalike_key(name)) == lookalike_key(name)


def test_generator_reproduces_the_table() -> None:
    spec = importlib.util.spec_from_file_location("gen_confusables", ROOT / "tools" / "gen_confusables.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    sample = ("\ufeff# confusables.txt\n# Date: 2020-02-13, 01:38:49 GMT\n# Version: 13.0.0\n"
              "0031 ;\t006C ;\tMA\t# ( 1 → l ) DIGIT ONE → LATIN SMALL LETTER L\t# \n"
              "006D ;\t0072 006E ;\tMA\t# ( m → rn ) ...\n"
              "0430 ;\t0061 ;\tMA\t# ( а → a ) CYRILLIC SMALL LETTER A → LATIN SMALL LETTER A\n"
              "0025 ;\t00BA 002F 2080 ;\tMA\t# ( % → º/₀ )\n")
    assert gen.ascii_prototypes(sample) == {"1": "l", "m": "rn"}  # ASCII to ASCII only
    module: dict = {}
    exec(gen.render(sample.encode()), module)  # noqa: S102  (our own generated source)
    assert module["ASCII_PROTOTYPES"] == {"1": "l", "m": "rn"}
    assert module["UNICODE_VERSION"] == "13.0.0"
    assert confusables.__doc__ is not None and "SHA-256" in confusables.__doc__


# --- open mode: look-alikes of online names --------------------------------------------


@pytest.mark.parametrize(("held", "lookalike"), [("alice", "aIice"), ("mallory", "rnallory"), ("bob", "b0b"),
                                                 ("alice", "ALlCE")])
def test_join_refuses_a_lookalike_of_an_online_name(held: str, lookalike: str) -> None:
    core = BrokerCore("e", 0.0)
    welcomed(core, A, held)
    detail = refused(core, B, lookalike)
    assert detail == f"the name {lookalike!r} looks like {held!r}, who is online"
    assert core.online == 1


def test_nick_refuses_a_lookalike_but_not_of_ones_own_name() -> None:
    core = BrokerCore("e", 0.0)
    welcomed(core, A, "alice")
    welcomed(core, B, "bob")
    event = error(send(core, B, type="nick", name="a1ice"), B)
    assert event.code == Code.NAME_TAKEN
    assert event.detail == "the name 'a1ice' looks like 'alice', who is online"
    assert core.member_name(B) == "bob"
    out = send(core, A, type="nick", name="aIice")  # alice may restyle her own name
    assert [type(p.event) for p in out] == [Renamed]
    assert core.member_name(A) == "aIice"
    assert refused(core, C, "alice") == "the name 'alice' looks like 'aIice', who is online"


def test_a_lookalike_is_free_once_the_holder_is_gone() -> None:
    """Online holders only: in open mode a name itself is free while its key is offline."""
    core = BrokerCore("e", 0.0)
    welcomed(core, A, "alice")
    welcomed(core, B, "bob")
    send(core, A, type="leave")
    welcomed(core, C, "aIice")
    send(core, B, type="nick", name="carol")  # bob's old name is let go too
    welcomed(core, D, "b0b")
    assert sorted(core.lookalikes) == sorted(lookalike_key(n) for n in ("aIice", "carol", "b0b"))


def test_rejoining_with_ones_own_name_is_not_a_lookalike() -> None:
    core = BrokerCore("e", 0.0)
    welcomed(core, A, "alice")
    out = send(core, A, 1.0, type="join", name="alice", history=0)
    assert isinstance(out[0].event, Welcome) and out[0].event.resumed
    out = send(core, A, 2.0, type="join", name="aIice", history=0)  # a rename through a rejoin
    assert [type(p.event) for p in out] == [Renamed, Welcome] and core.member_name(A) == "aIice"


def test_exact_name_still_reads_taken() -> None:
    core = BrokerCore("e", 0.0)
    welcomed(core, A, "alice")
    assert refused(core, B, "ALICE") == "the name 'ALICE' is taken"


# --- reserved names ------------------------------------------------------------------


@pytest.mark.parametrize("name", [*RESERVED_NAMES, "ADMIN", "Root", "r00t", "adrnin", "systern", "ZCHAT"])
def test_open_mode_reserves_names_for_nobody(name: str) -> None:
    core = BrokerCore("e", 0.0)
    detail = refused(core, A, name)
    assert "is reserved" in detail and "admin keys" in detail
    welcomed(core, B, "bob")
    event = error(send(core, B, type="nick", name=name), B)
    assert event.code == Code.NAME_TAKEN and "is reserved" in event.detail


def test_reserved_lookalike_says_which_name() -> None:
    core = BrokerCore("e", 0.0)
    assert refused(core, A, "r00t") == ("the name 'r00t' is reserved (it looks like 'root'): only the "
                                        "operator's admin keys may use it")


@pytest.mark.parametrize("name", ["rootbeer", "admin2", "systems", "zchatter", "serverless"])
def test_names_that_merely_contain_a_reserved_one_are_free(name: str) -> None:
    assert reserved_name(name) is None
    welcomed(BrokerCore("e", 0.0), A, name)


def test_closed_mode_reserved_names_need_the_admin_role() -> None:
    core = BrokerCore("e", 0.0, accounts={A: Account("root", "admin"), B: Account("system"),
                                          C: Account("zchat", "tap")})
    welcomed(core, A, "ignored")  # closed mode: the file names each key
    assert core.member_name(A) == "root"
    assert "is reserved" in refused(core, B, "x")
    assert "is reserved" in refused(core, C, "x")


def test_closed_mode_lets_the_file_decide_lookalikes() -> None:
    core = BrokerCore("e", 0.0, accounts={A: Account("alice"), B: Account("aIice")})
    welcomed(core, A, "alice")
    welcomed(core, B, "aIice")
    assert core.online == 2


# --- the authorized-keys file ----------------------------------------------------------


def key_line(name: str, role: str = "") -> str:
    return f"{name} {secrets.token_hex(32)} {role}".strip()


def test_file_refuses_a_reserved_name_without_the_admin_role() -> None:
    with pytest.raises(KeyFileError, match=r"keys:2: the name 'root' is reserved for keys with the role adm"):
        parse_authorized_keys("\n".join([key_line("alice", "admin"), key_line("root")]), "keys")
    with pytest.raises(KeyFileError, match=r"'adrnin' is reserved \(it looks like 'admin'\)"):
        parse_authorized_keys(key_line("adrnin", "tap"), "keys")
    accounts = parse_authorized_keys(key_line("root", "admin"), "keys")
    assert [a.name for a in accounts.values()] == ["root"]


def test_file_lookalikes_load_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "authorized_keys"
    path.write_text("\n".join([key_line("alice"), key_line("aIice"), key_line("bob"), key_line("B0B")]))
    with caplog.at_level(logging.WARNING):
        accounts = load_authorized_keys(path)
    assert len(accounts) == 4
    assert sorted(lookalike_names(accounts)) == [["B0B", "bob"], ["aIice", "alice"]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("look alike" in w for w in warnings)
    assert any("aIice, alice" in w for w in warnings)


def test_refusal_reaches_the_private_stream_only() -> None:
    core = BrokerCore("e", 0.0)
    welcomed(core, A, "alice")
    out = join(core, B, "aIice")
    assert kinds(out) == [(u(B), "Error")]
    assert LOBBY not in [p.topic for p in out]
