"""Settings resolution (zchat.config): precedence, sources, and one clear line per error.

Pure: `resolve` gets dictionaries; the few tests of `load` use a temporary file and a
made-up environment, never the real one.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from zchat import config, keys
from zchat import limits as L
from zchat.config import BROKER_KEYS, CLIENT_KEYS, ConfigError, Settings, load, render, resolve

HOME = {"XDG_CONFIG_HOME": "/xdg"}


def defaults(keys_: tuple[str, ...] = BROKER_KEYS) -> dict:
    return config.defaults_for(keys_, HOME)


def broker(flags: dict | None = None, env: dict | None = None, file: dict | None = None) -> Settings:
    return resolve(flags or {}, env or {}, file or {}, defaults(), side="broker", origin="z.toml")


def error(flags: dict | None = None, env: dict | None = None, file: dict | None = None,
          side: str = "broker") -> str:
    keys_ = BROKER_KEYS if side == "broker" else CLIENT_KEYS
    with pytest.raises(ConfigError) as info:
        resolve(flags or {}, env or {}, file or {}, defaults(keys_), side=side, origin="z.toml")
    message = str(info.value)
    assert "\n" not in message  # one line, always
    return message


# --- precedence -------------------------------------------------------------------------


def test_defaults_when_nothing_is_set() -> None:
    s = broker()
    assert s["port"] == 1234 and s["host"] == "127.0.0.1" and s["pub_port"] is None
    assert s["rate_burst"] == L.RATE_BURST and s["rate_per_second"] == L.RATE_PER_SECOND
    assert s["history_keep"] == L.HISTORY_KEEP_PER_ROOM and s["stats_interval"] == 5.0
    assert s["log_level"] == "INFO" and s["log_json"] is False and s["idle_exit"] == 0.0
    assert s["config_dir"] == Path("/xdg/zchat")
    assert set(s.sources.values()) == {"default"}


def test_flag_beats_env_beats_file_beats_default() -> None:
    file = {"port": 3000, "broker": {"rate_burst": 7, "history_keep": 100, "history_days": 9}}
    env = {"ZCHAT_RATE_BURST": "8", "ZCHAT_HISTORY_KEEP": "200"}
    flags = {"rate_burst": 9}
    s = broker(flags, env, file)
    assert (s["rate_burst"], s.sources["rate_burst"]) == (9, "flag --rate-burst")
    assert (s["history_keep"], s.sources["history_keep"]) == (200, "env ZCHAT_HISTORY_KEEP")
    assert (s["history_days"], s.sources["history_days"]) == (9.0, "file z.toml [broker]")
    assert (s["port"], s.sources["port"]) == (3000, "file z.toml")
    assert (s["rate_per_second"], s.sources["rate_per_second"]) == (L.RATE_PER_SECOND, "default")


def test_each_level_alone() -> None:
    assert broker(flags={"port": 1}).values["port"] == 1
    assert broker(env={"ZCHAT_PORT": "2"}).values["port"] == 2
    assert broker(file={"port": 3}).values["port"] == 3


def test_flags_given_as_none_are_not_given() -> None:
    s = broker(flags={"port": None, "rate_burst": None}, env={"ZCHAT_PORT": "4321"})
    assert s["port"] == 4321 and s.sources["rate_burst"] == "default"


def test_an_empty_environment_variable_is_unset() -> None:
    s = broker(env={"ZCHAT_PORT": "", "ZCHAT_RATE_BURST": "  "}, file={"port": 5})
    assert s["port"] == 5 and s["rate_burst"] == L.RATE_BURST


def test_a_side_table_overrides_the_shared_value_for_that_side_only() -> None:
    file = {"host": "127.0.0.1", "port": 4000, "broker": {"host": "0.0.0.0"}, "client": {"port": 4100}}
    s = broker(file=file)
    assert (s["host"], s.sources["host"]) == ("0.0.0.0", "file z.toml [broker]")
    assert s["port"] == 4000
    c = resolve({}, {}, file, defaults(CLIENT_KEYS), side="client", origin="z.toml")
    assert c["host"] == "127.0.0.1" and c["port"] == 4100


def test_client_settings_come_from_the_client_table_and_env() -> None:
    key = "a" * 64
    file = {"client": {"name": "alice", "server_key": key, "key": "~/k.key_secret"}}
    c = resolve({}, {"ZCHAT_NAME": "bob"}, file, defaults(CLIENT_KEYS), side="client")
    assert c["name"] == "bob" and c["server_key"] == key
    assert c["key"] == Path("~/k.key_secret").expanduser()
    assert "rate_burst" not in c.values  # a client resolves only its own settings


def test_values_are_normalised() -> None:
    s = broker(env={"ZCHAT_LOG_LEVEL": "debug", "ZCHAT_HISTORY_DAYS": "2", "ZCHAT_LOG_JSON": "yes",
                    "ZCHAT_DB": "~/h.sqlite3"}, file={"broker": {"rate_per_second": 3}})
    assert s["log_level"] == "DEBUG" and s["history_days"] == 2.0 and s["log_json"] is True
    assert s["db"] == Path("~/h.sqlite3").expanduser()
    assert isinstance(s["rate_per_second"], float)


@pytest.mark.parametrize("text, value", [("1", True), ("true", True), ("On", True), ("no", False),
                                         ("0", False), ("FALSE", False)])
def test_env_booleans(text: str, value: bool) -> None:
    assert broker(env={"ZCHAT_LOG_JSON": text}).values["log_json"] is value


def test_env_names_are_zchat_and_the_key_in_capitals() -> None:
    assert config.OPTIONS["rate_per_second"].env == "ZCHAT_RATE_PER_SECOND"
    assert config.OPTIONS["config_dir"].env == "ZCHAT_CONFIG_DIR"  # the existing variable
    assert set(config.env_names(BROKER_KEYS)) >= {"ZCHAT_PORT", "ZCHAT_HOST", "ZCHAT_HISTORY_KEEP",
                                                  "ZCHAT_RATE_BURST", "ZCHAT_STATS_INTERVAL"}


# --- errors: one line naming the key and the problem ------------------------------------------


def test_unknown_key_with_a_suggestion() -> None:
    message = error(file={"broker": {"rate_brust": 3}})
    assert message == "config file z.toml: unknown key 'broker.rate_brust' (did you mean 'rate_burst'?)"


def test_unknown_top_level_key_and_table() -> None:
    assert error(file={"colour": "red"}) == "config file z.toml: unknown key 'colour'"
    assert "unknown key 'brokers'" in error(file={"brokers": {}})
    assert "did you mean 'broker'" in error(file={"brokers": {}})


def test_a_key_in_the_wrong_place() -> None:
    assert error(file={"rate_burst": 3}) == "config file z.toml: rate_burst: belongs in the [broker] table"
    assert error(file={"client": {"rate_burst": 3}}) == \
        "config file z.toml: client.rate_burst: belongs in the [broker] table"
    assert "'broker' must be a table" in error(file={"broker": 3})


def test_the_whole_file_is_checked_whatever_the_command_reads() -> None:
    # A broker refuses to start on a typo in [client], too: the file is wrong.
    assert "client.nmae" in error(file={"client": {"nmae": "alice"}})


def test_unknown_keys_and_tables_in_every_place() -> None:
    assert error(file={"client": {"nmae": "alice"}}) == \
        "config file z.toml: unknown key 'client.nmae' (did you mean 'name'?)"
    assert error(file={"broker": {"rate-burst": 3}}) == \
        "config file z.toml: unknown key 'broker.rate-burst' (did you mean 'rate_burst'?)"
    assert error(file={"broker": {"limits": {"x": 1}}}) == "config file z.toml: unknown key 'broker.limits'"
    assert error(file={"a.b": 1}) == "config file z.toml: unknown key 'a.b'"
    assert error(file={"prot": 5}) == "config file z.toml: unknown key 'prot' (did you mean 'port'?)"
    assert error(file={"broker": {"name": "x"}}) == \
        "config file z.toml: broker.name: belongs in the [client] table"
    assert error(file={"client": 3}) == \
        "config file z.toml: 'client' must be a table ([client]), got an integer (3)"
    assert error(file={"broker": [{"port": 1}]}) == \
        "config file z.toml: 'broker' must be a table ([broker]), got an array"  # [[broker]]


@pytest.mark.parametrize("file, expected", [
    ({"port": "1234"}, 'port: expected an integer, got a string ("1234")'),
    ({"port": 12.5}, "port: expected an integer, got a number (12.5)"),
    ({"port": True}, "port: expected an integer, got a boolean (true)"),
    ({"client": {"port": "x"}}, 'client.port: expected an integer, got a string ("x")'),
    ({"broker": {"rate_per_second": "fast"}},
     'broker.rate_per_second: expected a number, got a string ("fast")'),
    ({"broker": {"history_days": True}}, "broker.history_days: expected a number, got a boolean (true)"),
    ({"broker": {"log_json": 1}}, "broker.log_json: expected true or false, got an integer (1)"),
    ({"broker": {"log_json": "yes"}}, 'broker.log_json: expected true or false, got a string ("yes")'),
    ({"broker": {"db": 5}}, "broker.db: expected a path (string), got an integer (5)"),
    ({"broker": {"log_level": {}}}, "broker.log_level: expected a string, got a table"),
    ({"host": ["a"]}, "host: expected a string, got an array"),
    ({"client": {"key": 1.5}}, "client.key: expected a path (string), got a number (1.5)"),
    ({"client": {"server_key": ["x" * 70]}}, "client.server_key: expected a string, got an array"),
])
def test_wrong_types_in_the_file(file: dict, expected: str) -> None:
    assert error(file=file) == f"config file z.toml: {expected}"


@pytest.mark.parametrize("file, expected", [
    ({"port": 0}, "port: must be between 1 and 65535, got 0"),
    ({"pub_port": 70000}, "pub_port: must be between 1 and 65535, got 70000"),
    ({"broker": {"rate_burst": 0}}, "broker.rate_burst: must be at least 1, got 0"),
    ({"broker": {"history_days": -1}}, "broker.history_days: must be at least 0, got -1"),
    ({"broker": {"client_timeout": 0.25}}, "broker.client_timeout: must be at least 0.5, got 0.25"),
    ({"broker": {"max_peers": 0}}, "broker.max_peers: must be at least 1, got 0"),
    ({"broker": {"connections_per_key": -3}}, "broker.connections_per_key: must be at least 1, got -3"),
    ({"broker": {"new_keys_per_minute": -1}}, "broker.new_keys_per_minute: must be at least 0, got -1"),
    ({"client": {"port": 65536}}, "client.port: must be between 1 and 65535, got 65536"),
    ({"broker": {"stats_interval": float("nan")}}, "broker.stats_interval: must be a finite number, got nan"),
    ({"broker": {"idle_exit": float("inf")}}, "broker.idle_exit: must be a finite number, got inf"),
    ({"broker": {"history_days": float("-inf")}}, "broker.history_days: must be a finite number, got -inf"),
    ({"broker": {"log_level": "loud"}},
     "broker.log_level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'loud'"),
    ({"broker": {"db": ""}}, "broker.db: must not be empty"),
    ({"host": "a b"}, "host: not a host name: 'a b'"),
    ({"client": {"name": "no spaces"}}, "client.name: invalid name 'no spaces': 1-32 ASCII letters, "
     "digits, '.', '-' or '_', starting with a letter or digit"),
])
def test_out_of_range_in_the_file(file: dict, expected: str) -> None:
    assert error(file=file) == f"config file z.toml: {expected}"


def test_an_invalid_server_key_in_the_file_says_why() -> None:
    assert error(file={"client": {"server_key": "abc"}}).startswith(
        "config file z.toml: client.server_key: a public key is 40 z85 characters")  # keys.py's words


@pytest.mark.parametrize("env, expected", [
    ({"ZCHAT_PORT": "abc"}, 'environment ZCHAT_PORT="abc": expected an integer'),
    ({"ZCHAT_PORT": "12.5"}, 'environment ZCHAT_PORT="12.5": expected an integer'),
    ({"ZCHAT_PORT": "0"}, 'environment ZCHAT_PORT="0": must be between 1 and 65535, got 0'),
    ({"ZCHAT_MAX_PEERS": "0"}, 'environment ZCHAT_MAX_PEERS="0": must be at least 1, got 0'),
    ({"ZCHAT_RATE_PER_SECOND": "lots"}, 'environment ZCHAT_RATE_PER_SECOND="lots": expected a number'),
    ({"ZCHAT_HISTORY_DAYS": "-1"}, 'environment ZCHAT_HISTORY_DAYS="-1": must be at least 0, got -1.0'),
    ({"ZCHAT_HISTORY_DAYS": "inf"}, 'environment ZCHAT_HISTORY_DAYS="inf": must be a finite number, got inf'),
    ({"ZCHAT_IDLE_EXIT": "nan"}, 'environment ZCHAT_IDLE_EXIT="nan": must be a finite number, got nan'),
    ({"ZCHAT_LOG_JSON": "maybe"},
     'environment ZCHAT_LOG_JSON="maybe": expected 1/0, true/false, yes/no or on/off'),
    ({"ZCHAT_LOG_LEVEL": "chatty"},
     'environment ZCHAT_LOG_LEVEL="chatty": must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, '
     "got 'chatty'"),
    ({"ZCHAT_HOST": "a b"}, 'environment ZCHAT_HOST="a b": not a host name: \'a b\''),
])
def test_invalid_environment_values(env: dict, expected: str) -> None:
    assert error(env=env) == expected


def test_environment_numbers_may_have_spaces_around_them() -> None:
    s = broker(env={"ZCHAT_PORT": " 4000 ", "ZCHAT_CLIENT_TIMEOUT": "2", "ZCHAT_DB": " ~/h "})
    assert s["port"] == 4000 and s["client_timeout"] == 2.0 and s["db"] == Path("~/h").expanduser()


def test_an_invalid_env_value_of_a_setting_the_command_does_not_use_is_ignored() -> None:
    assert broker(env={"ZCHAT_NAME": "not a name"}).values["port"] == 1234


def test_invalid_flag_values() -> None:
    assert error(flags={"port": 70000}) == "--port: must be between 1 and 65535, got 70000"
    assert error(flags={"rate_burst": 0}) == "--rate-burst: must be at least 1, got 0"
    assert error(flags={"history_days": float("nan")}) == "--history-days: must be a finite number, got nan"
    assert error(flags={"connections_per_key": 0}) == "--connections-per-key: must be at least 1, got 0"
    assert error(flags={"log_level": "x"}) == \
        "--log-level: must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, got 'x'"


def test_flag_values_are_normalised() -> None:
    s = broker(flags={"log_level": "warning", "db": Path("~/x.db"), "idle_exit": 5.0, "log_json": False})
    assert s["log_level"] == "WARNING" and s["db"] == Path("~/x.db").expanduser()
    assert s["idle_exit"] == 5.0 and s["log_json"] is False and s.sources["log_json"] == "flag --log-json"


def test_a_valid_flag_does_not_hide_an_invalid_file() -> None:
    assert "unknown key" in error(flags={"port": 5}, file={"prot": 5})


# --- --help: each setting's text is written once, in OPTIONS ----------------------------------


def _flag_helps(command: str | None) -> dict[str, str | None]:
    from zchat.cli import build_parser

    parser = build_parser()
    if command is not None:
        parser = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest: a.help for a in parser._actions}


@pytest.mark.parametrize("command", ["broker", "client", "send", None])
def test_each_settings_flag_shows_the_help_from_options(command: str | None) -> None:
    helps = _flag_helps(command)
    keys_ = config.COMMANDS[command][1]
    keys_ = tuple(k for k in keys_ if k != "idle_exit")  # `zchat` alone: a started broker's, its own
    assert keys_ and all(helps[key] == config.flag_help(key) for key in keys_)


def test_help_shows_the_default_from_the_table() -> None:
    assert config.flag_help("port") == "the broker's input (PULL) port (default 1234)"
    assert config.flag_help("history_days").endswith(", 0 = never (default 30)")
    assert config.flag_help("max_peers").endswith(f"(default {L.MAX_PEERS})")
    assert config.flag_help("log_json") == "log one JSON object per line"  # --log-json / --no-log-json
    assert _flag_helps("tap")["server_key"] == _flag_helps("stats")["server_key"] == \
        config.OPTIONS["server_key"].help


# --- load: the file and the environment around resolve ---------------------------------------


def test_load_reads_the_default_file_in_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "zchat.toml").write_text("[broker]\nrate_burst = 11\n")
    s = load("broker", {"config_dir": tmp_path}, env={})
    assert s["rate_burst"] == 11 and s.file == tmp_path / "zchat.toml" and s.file_found
    assert s.sources["rate_burst"] == f"file {tmp_path / 'zchat.toml'} [broker]"


def test_load_follows_zchat_config_dir_and_zchat_config(tmp_path: Path) -> None:
    (tmp_path / "zchat.toml").write_text("port = 2001\n")
    assert load("broker", {}, env={"ZCHAT_CONFIG_DIR": str(tmp_path)})["port"] == 2001
    other = tmp_path / "other.toml"
    other.write_text("port = 2002\n")
    assert load("broker", {}, env={"ZCHAT_CONFIG": str(other)})["port"] == 2002
    assert load("broker", {"config": other}, env={"ZCHAT_CONFIG": "/nope.toml"})["port"] == 2002


def test_a_missing_default_file_is_fine_a_missing_named_one_is_not(tmp_path: Path) -> None:
    s = load("broker", {"config_dir": tmp_path}, env={})
    assert not s.file_found and s["port"] == 1234
    with pytest.raises(ConfigError, match=r"^config file .*nope\.toml: not found$"):
        load("broker", {"config": tmp_path / "nope.toml"}, env={})


def test_bad_toml_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "zchat.toml"
    path.write_text("port = 1\n[broker\nrate_burst = 2\n")
    with pytest.raises(ConfigError) as info:
        load("broker", {"config": path}, env={})
    assert str(info.value).startswith(f"config file {path}: invalid TOML: ")
    assert "line 2" in str(info.value) and "\n" not in str(info.value)


def test_a_directory_or_binary_file_is_one_line_too(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read it"):
        load("broker", {"config": tmp_path}, env={})
    path = tmp_path / "zchat.toml"
    path.write_bytes(b"port = \xff\n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load("broker", {"config": path}, env={})


def test_commands_resolve_their_own_settings(tmp_path: Path) -> None:
    (tmp_path / "zchat.toml").write_text('port = 2100\n[client]\nname = "alice"\n[broker]\ndb = "/x.db"\n')
    flags = {"config_dir": tmp_path}
    assert load("client", flags, env={})["name"] == "alice"
    assert "name" not in load("tap", flags, env={}).values  # a tap never takes a user's name or key
    assert load("stats", flags, env={})["port"] == 2100
    assert load("history", flags, env={})["db"] == Path("/x.db")
    assert load("keygen", flags, env={}).values == {}


# --- showing them -------------------------------------------------------------------------------


def test_render_is_a_valid_config_file_with_sources(tmp_path: Path) -> None:
    s = broker({"rate_burst": 9}, {"ZCHAT_HISTORY_DAYS": "2"}, {"port": 3000})
    text = render(s)
    doc = tomllib.loads(text)  # paste-able as a config file
    assert doc["port"] == 3000 and doc["pub_port"] == 3001
    assert doc["broker"]["rate_burst"] == 9 and doc["broker"]["history_days"] == 2.0
    assert doc["broker"]["db"] == str(Path("/xdg/zchat/broker/history.sqlite3"))
    lines = {line.split("=")[0].strip(): line for line in text.splitlines() if "=" in line}
    assert lines["rate_burst"].endswith("# flag --rate-burst")
    assert lines["history_days"].endswith("# env ZCHAT_HISTORY_DAYS")
    assert lines["port"].endswith("# file z.toml")
    assert lines["pub_port"].endswith("# default (port + 1)")
    config.check_file(doc, "rendered")  # and it passes our own checks


def test_the_main_command_line_reports_one_line_and_exit_2(tmp_path: Path, capsys, monkeypatch) -> None:
    from zchat.cli import main

    for name in [n for n in __import__("os").environ if n.startswith("ZCHAT_")]:
        monkeypatch.delenv(name)
    path = tmp_path / "zchat.toml"
    path.write_text("[broker]\nrate_burst = -1\n")
    assert main(["broker", "--config", str(path), "--config-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"zchat: config file {path}: broker.rate_burst: must be at least 1, got -1\n"
    assert keys.broker_dir(tmp_path).exists() is False  # stopped before doing anything
