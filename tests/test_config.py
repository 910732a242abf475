"""The configuration schema: files, drop-ins, command line, and one-line errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from coapfs.cli import build_parser, command_line_values
from coapfs.config import (
    Bind,
    CacheConfig,
    Config,
    ConfigError,
    Loader,
    ObserveConfig,
    check_command_line,
    dropin_dir,
)
from coapfs.config.schema import iter_keys
from coapfs.daemon.preflight import check_environment

from support.repo import REPO
from support.server import run_coapfs


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def load(tmp_path: Path, main: str = "", cli: list[str] | None = None, **dropins: str):
    """Load <tmp>/server.toml (+ server.d/<name>.toml drop-ins) with a command line."""
    conf = write(tmp_path / "server.toml", main)
    for name, text in dropins.items():
        write(tmp_path / "server.d" / name, text)
    overrides = check_command_line(command_line_values(build_parser().parse_args(cli or [])))
    return Loader(conf, overrides, cwd=tmp_path).load()


def error(tmp_path: Path, main: str) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, main)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'server.toml'}: ")
    return message


def test_defaults_without_any_file(tmp_path: Path) -> None:
    loaded = Loader(tmp_path / "absent.toml", cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"absent\.toml: cannot read: No such file"):
        loaded.load()  # an explicit --config must exist
    config = load(tmp_path).config
    assert config == Config(root=tmp_path)
    assert config.etag_length == 8 and config.write is False and config.bind == ()
    assert config.cache == CacheConfig(64 * 1024 * 1024, 1024, "auto", 2.0)
    assert config.observe == ObserveConfig(100)


def test_values_are_typed(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """
        root = "srv"
        bind = ["[::1]:5700", ":5701", "127.0.0.1"]
        write = true
        etag_length = 0
        register = "coap://rd.example"
        credentials = "creds.json"
        verbosity = 2
        [cache]
        mode = "poll"
        poll_interval = 1
        [observe]
        coalesce_ms = 0
        """,
    ).config
    assert config.root == tmp_path / "srv"  # relative to the working directory at start
    assert config.credentials == tmp_path / "creds.json"
    assert config.bind == (
        Bind("[::1]:5700", "::1", 5700),
        Bind(":5701", None, 5701),
        Bind("127.0.0.1", "127.0.0.1", None),
    )
    assert (config.write, config.etag_length, config.verbosity) == (True, 0, 2)
    assert config.register == "coap://rd.example"
    assert config.cache.mode == "poll" and config.cache.poll_interval == 1.0
    assert config.observe.coalesce_ms == 0
    with pytest.raises(AttributeError):
        config.write = False  # type: ignore[misc]  # frozen: a reload builds a new one


@pytest.mark.parametrize(
    "text, key, value, expected",
    [
        ("etag_lenght = 4", "etag_lenght", "4", "unknown key; expected one of root, bind"),
        ("[cache]\nbyte_budgit = 1", "cache.byte_budgit", "1", "unknown key; expected one of"),
        ("[limits]\nx = 1", "limits", "{x = 1}", "unknown key"),
        ('etag_length = "8"', "etag_length", '"8"', "expected an integer from 0 to 8"),
        ("etag_length = 9", "etag_length", "9", "expected an integer from 0 to 8"),
        ("etag_length = true", "etag_length", "true", "expected an integer from 0 to 8"),
        ('write = "yes"', "write", '"yes"', "expected true or false"),
        ('bind = "[::]:5683"', "bind", '"[::]:5683"', "expected a list of addresses"),
        ('bind = ["5683"]', "bind", '["5683"]', 'expected ":5683"'),
        ('bind = ["::1"]', "bind", '["::1"]', 'expected "[::1]"'),
        ('bind = [":70000"]', "bind", '[":70000"]', "expected an address like"),
        ('bind = [":1", ":1"]', "bind", '[":1", ":1"]', "each address only once"),
        ('register = "http://x"', "register", '"http://x"', "expected false, true"),
        ("register = 1", "register", "1", "expected false, true"),
        ('root = ""', "root", '""', "expected a non-empty path"),
        ("verbosity = 4", "verbosity", "4", "expected an integer from 0 to 3"),
        ("cache = 3", "cache", "3", "expected a table [cache]"),
        ('[cache]\nmode = "fast"', "cache.mode", '"fast"', 'expected "auto" or "inotify"'),
        ("[cache]\nbyte_budget = -1", "cache.byte_budget", "-1", "expected an integer >= 0"),
        ("[cache]\nwatch_budget = 0", "cache.watch_budget", "0", "expected an integer >= 1"),
        ("[cache]\npoll_interval = 0", "cache.poll_interval", "0", "a number of seconds > 0"),
        ("[observe]\ncoalesce_ms = 1.5", "observe.coalesce_ms", "1.5", "expected an integer"),
        ("[upload]\nfile_mode = 0o4755", "upload.file_mode", "0o4755", "expected permission bits"),
        ("root = 1979-05-27T07:32:00", "root", "1979-05-27T07:32:00", "expected a non-empty path"),
        (
            '[amplification]\ntrusted = ["::ffff:0:0/96"]',
            "amplification.trusted[1]",
            '"::ffff:0:0/96"',
            'expected its IPv4 form "0.0.0.0/0"',
        ),
    ],
)
def test_each_error_is_one_line_naming_file_key_value(
    tmp_path: Path, text: str, key: str, value: str, expected: str
) -> None:
    message = error(tmp_path, text)
    assert f": {key} = {value}: " in message
    assert expected in message


def test_toml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    message = error(tmp_path, "write = true\netag_length 4\n")
    assert "not valid TOML" in message and "line 2" in message


def test_a_file_that_is_not_utf8_is_one_line_and_78(tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes(b"write = true\n# caf\xe9\n")
    result = run_coapfs(["--config", str(config), "--check-config"], capture_output=True, text=True)
    assert result.returncode == 78, result.stderr
    assert result.stderr == f"coap-fileserver: {config}: not valid TOML: not UTF-8 (line 2)\n"


def test_dropins_in_lexical_order_later_wins_key_by_key(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        'etag_length = 4\nbind = [":1"]\n[cache]\nmode = "poll"\nwatch_budget = 7\n',
        **{
            "20-b.toml": "etag_length = 6\n[cache]\nwatch_budget = 9\n",
            "10-a.toml": 'etag_length = 5\nwrite = true\nbind = [":2", ":3"]\n',
        },
    ).config
    assert config.etag_length == 6
    assert config.write is True
    assert [b.text for b in config.bind] == [":2", ":3"]  # a list is replaced, not extended
    assert (config.cache.mode, config.cache.watch_budget) == ("poll", 9)  # tables merge


def test_only_toml_dropins_are_read(tmp_path: Path) -> None:
    broken = "this is not = = toml"
    loaded = load(
        tmp_path,
        "",
        **{
            "50-x.toml.dpkg-old": broken,
            "50-x.toml~": broken,
            "50-x.toml.bak": broken,
            ".hidden.toml": broken,
            "README": broken,
            "60-y.toml": "etag_length = 3",
        },
    )
    assert loaded.config.etag_length == 3
    assert [f.name for f in loaded.files] == ["server.toml", "60-y.toml"]


def test_dropin_error_names_the_dropin(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "etag_length = 4", **{"30-z.toml": "[observe]\ncoalesce_ms = -5"})
    assert str(e.value).startswith(f"{tmp_path / 'server.d' / '30-z.toml'}: observe.coalesce_ms")


def test_dropin_dir_is_stem_dot_d_beside_the_file() -> None:
    assert dropin_dir(Path("/etc/coap-fileserver.toml")) == Path("/etc/coap-fileserver.d")
    assert dropin_dir(Path("/tmp/x/test.toml")) == Path("/tmp/x/test.d")


def test_command_line_wins_over_files(tmp_path: Path) -> None:
    files = 'root = "fromfile"\nwrite = true\netag_length = 4\nbind = [":1"]\nverbosity = 1'
    argv = ["--no-write", "--etag-length", "8", "--bind", "127.0.0.1:5", "--bind", "[::1]:6"]
    loaded = load(tmp_path, files, ["cli", *argv, "-vvvvv"], **{"9.toml": ""})
    c = loaded.config
    assert c.root == tmp_path / "cli"
    assert (c.write, c.etag_length, c.verbosity, c.register) == (False, 8, 3, False)
    assert [b.text for b in c.bind] == ["127.0.0.1:5", "[::1]:6"]
    assert loaded.origin("etag_length") == "command line"
    assert loaded.origin("root") == "command line"
    assert loaded.origin("cache.mode") == "built-in default"
    # options not given leave the files' values alone
    c = load(tmp_path, files, ["--register"]).config
    assert (c.write, c.etag_length, c.register) == (True, 4, True)
    assert load(tmp_path, files, ["--register", "coap://[::1]"]).config.register == "coap://[::1]"


def test_command_line_values_use_the_same_schema() -> None:
    opts = build_parser().parse_args(["--etag-length", "9"])
    with pytest.raises(ConfigError, match=r"^command line: etag_length = 9: expected an integer"):
        check_command_line(command_line_values(opts))
    opts = build_parser().parse_args(["--bind", "5683"])
    with pytest.raises(ConfigError, match=r'^command line: bind = \["5683"\]: expected ":5683"'):
        check_command_line(command_line_values(opts))
    opts = build_parser().parse_args(["--workers", "many"])
    with pytest.raises(ConfigError, match=r'^command line: workers = "many": expected a number'):
        check_command_line(command_line_values(opts))
    for given, parsed in (("auto", "auto"), ("3", 3)):
        opts = build_parser().parse_args(["--workers", given])
        assert check_command_line(command_line_values(opts)) == {"workers": parsed}


def test_check_environment_root_and_files(tmp_path: Path) -> None:
    write(tmp_path / "afile", "x")
    for root, problem in [("missing", "No such file or directory"), ("afile", "Not a directory")]:
        loaded = load(tmp_path, f'root = "{root}"')
        with pytest.raises(ConfigError) as e:
            check_environment(loaded)
        assert str(e.value) == (
            f'{tmp_path / "server.toml"}: root = "{tmp_path / root}": {problem}'
            "; expected a readable directory"
        )
    check_environment(load(tmp_path, 'root = "."'))
    write(tmp_path / "creds.json", '{"coap://*": ')
    with pytest.raises(ConfigError) as e:
        check_environment(load(tmp_path, 'credentials = "creds.json"'))
    assert str(e.value).startswith(
        f'{tmp_path / "server.toml"}: credentials = "{tmp_path / "creds.json"}": not valid JSON'
    )
    loaded = load(tmp_path, 'tls_server_certificate = "nope.pem"')
    with pytest.raises(ConfigError, match=r"tls_server_certificate = .*nope\.pem.*no such file"):
        check_environment(loaded)


def test_shipped_example_lists_every_key_with_its_default() -> None:
    """etc/coap-fileserver.toml (the package's conffile) sets the served root, as an absolute
    path so that `--check-config` run from anywhere checks what the service serves, and a worker
    per CPU, and shows every other key commented out with its built-in default."""
    text = (REPO / "etc" / "coap-fileserver.toml").read_text()
    empty_tables = {t: {} for t in ("cache", "observe", "upload", "amplification", "deduplication")}
    assert tomllib.loads(text) == {"root": "/srv/coap", "workers": "auto", **empty_tables}
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.MULTILINE)
    raw = tomllib.loads(uncommented)
    flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for table, values in raw.items():
        if isinstance(values, dict):
            flat.update({f"{table}.{k}": v for k, v in values.items()})
    assert sorted(flat) == sorted(k for k, _, _ in iter_keys())
    # uncommented, it is valid and means exactly the built-in defaults (but for the root)
    typed = check_command_line(raw)
    for key, default, _help in iter_keys():
        value = typed
        for part in key.split("."):
            value = value[part]
        if key == "root":
            assert value == Path("/srv/coap") and default == Path(".")
        elif key == "workers":
            assert value == "auto" and default == 1  # the packaged service uses every core
        else:
            assert value == default, key
    # and each key has a line of explanation right above it
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if re.match(r"^# \w+ = ", line):
            assert lines[i - 1].startswith("# ") and not re.match(r"^# \w+ = ", lines[i - 1])
