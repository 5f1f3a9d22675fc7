"""Server settings (defaults, TOML file, environment) and API key checks."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from transcribe_gateway.config import DEV_KEY, LocalSettings, Settings, load_settings
from transcribe_gateway.exceptions import ConfigError, TranscribeGatewayError
from transcribe_gateway.server.auth import KeyChecker, bearer_token, fingerprint
from transcribe_gateway.store.sqlite import check_path


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.toml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None = None, /, **environ: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path, environ=environ)
    return str(info.value)


class TestDefaults:
    def test_config_has_defaults(self) -> None:
        s = load_settings(environ={})
        assert s == Settings()
        assert (s.host, s.port, s.profile) == ("127.0.0.1", 8000, "development")
        assert s.strict_providers is False
        assert s.api_keys == []
        assert s.auth_timeout_s == 10.0  # PROTOCOL.md: auth timeout default 10 s
        assert s.idle_timeout_s == 30.0  # PROTOCOL.md: idle timeout default 30 s
        assert s.max_chunk_bytes == 128 * 1024
        assert s.max_message_bytes == 1024 * 1024
        assert s.endpointing_ms == 500
        assert s.local == LocalSettings()
        assert s.local.workers == 0
        assert s.providers == {}

    def test_config_error_is_a_gateway_error(self) -> None:
        assert issubclass(ConfigError, TranscribeGatewayError)


class TestFile:
    def test_config_reads_toml(self, tmp_path: Path) -> None:
        path = toml(
            tmp_path,
            """
            host = "0.0.0.0"
            port = 9000
            profile = "production"
            strict_providers = true
            api_keys = ["a", "b"]
            idle_timeout_s = 12.5
            log_format = "json"

            [local]
            workers = 3
            default_model = "whisper-base.en"
            whisper_models = { "custom" = "/models/custom" }

            [providers.DEEPGRAM]
            api_key = "file-key"
            base_url = "http://localhost:1234"
            """,
        )
        s = load_settings(path, environ={})
        assert (s.host, s.port, s.profile) == ("0.0.0.0", 9000, "production")
        assert s.strict_providers is True
        assert s.api_keys == ["a", "b"]
        assert s.idle_timeout_s == 12.5
        assert s.log_format == "json"
        assert s.local.workers == 3
        assert s.local.default_model == "whisper-base.en"
        assert s.local.whisper_models == {"custom": "/models/custom"}
        assert s.local.partial_interval_ms == LocalSettings().partial_interval_ms
        assert s.providers["DEEPGRAM"] == {
            "api_key": "file-key",
            "base_url": "http://localhost:1234",
        }

    def test_config_reads_path_from_environment(self, tmp_path: Path) -> None:
        path = toml(tmp_path, "port = 9001\n")
        assert load_settings(environ={"TRANSCRIBE_CONFIG": str(path)}).port == 9001

    def test_config_prefers_explicit_path(self, tmp_path: Path) -> None:
        path = toml(tmp_path, "port = 9001\n")
        other = tmp_path / "other.toml"
        other.write_text("port = 9002\n")
        assert load_settings(path, environ={"TRANSCRIBE_CONFIG": str(other)}).port == 9001

    @pytest.mark.parametrize(
        ("text", "setting"),
        [
            ('port = "x"\n', "port"),
            ("port = 70000\n", "port"),
            ("port = -1\n", "port"),
            ('profile = "staging"\n', "profile"),
            ("strict_providers = 1\n", "strict_providers"),
            ('api_keys = "a,b"\n', "api_keys"),
            ("idle_timeout_s = 0\n", "idle_timeout_s"),
            ("max_chunk_bytes = 10\n", "max_chunk_bytes"),
            ('log_level = "trace"\n', "log_level"),
            ("[local]\nworkers = 999\n", "local.workers"),
            ('[local]\nworkers = "4"\n', "local.workers"),
            ("[local]\nmax_utterance_ms = 60000\n", "local.max_utterance_ms"),
            ('local = "x"\n', "local"),
            ("providers = 5\n", "providers"),
        ],
    )
    def test_config_names_bad_setting(self, tmp_path: Path, text: str, setting: str) -> None:
        message = config_error(toml(tmp_path, text))
        assert f"`$.{setting}`" in message

    @pytest.mark.parametrize(
        ("text", "key"),
        [("foo = 1\n", "foo"), ("[local]\nfoo = 1\n", "foo"), ("Port = 1\n", "Port")],
    )
    def test_config_rejects_unknown_key(self, tmp_path: Path, text: str, key: str) -> None:
        message = config_error(toml(tmp_path, text))
        assert f"unknown field `{key}`" in message

    def test_config_rejects_missing_file(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.toml"
        message = config_error(path)
        assert str(path) in message

    def test_config_rejects_missing_file_from_environment(self, tmp_path: Path) -> None:
        path = tmp_path / "nope.toml"
        assert str(path) in config_error(TRANSCRIBE_CONFIG=str(path))

    def test_config_rejects_directory(self, tmp_path: Path) -> None:
        assert str(tmp_path) in config_error(tmp_path)

    @pytest.mark.parametrize("text", ["port = \n", "[local\n", "port = 1\nport = 2\n", "= 3\n"])
    def test_config_rejects_bad_toml(self, tmp_path: Path, text: str) -> None:
        assert "not valid TOML" in config_error(toml(tmp_path, text))

    def test_config_rejects_non_utf8_file(self, tmp_path: Path) -> None:
        path = tmp_path / "latin1.toml"
        path.write_bytes(b'host = "caf\xe9"\n')
        config_error(path)


class TestEnvironment:
    def test_env_overrides_file(self, tmp_path: Path) -> None:
        path = toml(tmp_path, 'port = 9000\napi_keys = ["file"]\n[local]\nworkers = 2\n')
        s = load_settings(
            path,
            environ={
                "TRANSCRIBE_PORT": "9100",
                "TRANSCRIBE_API_KEYS": "env-a,env-b",
                "TRANSCRIBE_LOCAL_WORKERS": "5",
            },
        )
        assert (s.port, s.api_keys, s.local.workers) == (9100, ["env-a", "env-b"], 5)

    def test_env_turns_finals_in_context_off(self, tmp_path: Path) -> None:
        path = toml(tmp_path, "[local]\nworkers = 2\n")
        assert load_settings(path, environ={}).local.final_context is True
        s = load_settings(path, environ={"TRANSCRIBE_LOCAL_FINAL_CONTEXT": "false"})
        assert (s.local.final_context, s.local.workers) == (False, 2)

    def test_env_keeps_file_values_it_does_not_name(self, tmp_path: Path) -> None:
        path = toml(tmp_path, 'host = "0.0.0.0"\n[local]\nworkers = 2\ndefault_model = "m"\n')
        s = load_settings(path, environ={"TRANSCRIBE_LOCAL_WORKERS": "5"})
        assert (s.host, s.local.workers, s.local.default_model) == ("0.0.0.0", 5, "m")

    def test_env_reads_process_environment(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("TRANSCRIBE_CONFIG", raising=False)
        monkeypatch.setenv("TRANSCRIBE_PORT", "9200")
        assert load_settings().port == 9200

    @pytest.mark.parametrize(
        ("raw", "keys"),
        [
            ("a", ["a"]),
            ("a,b", ["a", "b"]),
            (" a , b ,c ", ["a", "b", "c"]),
            ("a,,b,", ["a", "b"]),
            ("", []),
            (" , ", []),
        ],
    )
    def test_env_splits_api_keys(self, raw: str, keys: list[str]) -> None:
        assert load_settings(environ={"TRANSCRIBE_API_KEYS": raw}).api_keys == keys

    @pytest.mark.parametrize(
        ("raw", "value"),
        [
            ("true", True),
            ("TRUE", True),
            ("1", True),
            ("yes", True),
            (" on ", True),
            ("false", False),
            ("False", False),
            ("0", False),
            ("no", False),
            ("off", False),
        ],
    )
    def test_env_reads_booleans(self, raw: str, value: bool) -> None:
        s = load_settings(environ={"TRANSCRIBE_STRICT_PROVIDERS": raw})
        assert s.strict_providers is value

    @pytest.mark.parametrize("raw", ["garbage", "2", "truee", "y e s", "", "  "])
    def test_env_rejects_bad_boolean(self, raw: str) -> None:
        # Empty too: an unset compose variable must not turn a default-on setting off.
        message = config_error(TRANSCRIBE_LOCAL_FINAL_CONTEXT=raw)
        assert "TRANSCRIBE_LOCAL_FINAL_CONTEXT" in message

    @pytest.mark.parametrize(
        ("name", "raw"),
        [
            ("TRANSCRIBE_PORT", "abc"),
            ("TRANSCRIBE_PORT", "80.5"),
            ("TRANSCRIBE_PORT", ""),
            ("TRANSCRIBE_LOCAL_WORKERS", "many"),
            ("TRANSCRIBE_IDLE_TIMEOUT_S", "soon"),
        ],
    )
    def test_env_rejects_non_number(self, name: str, raw: str) -> None:
        assert name in config_error(**{name: raw})

    @pytest.mark.parametrize(
        ("name", "raw", "setting"),
        [
            ("TRANSCRIBE_PORT", "70000", "port"),
            ("TRANSCRIBE_LOCAL_WORKERS", "-1", "local.workers"),
            ("TRANSCRIBE_PROFILE", "staging", "profile"),
            ("TRANSCRIBE_IDLE_TIMEOUT_S", "0", "idle_timeout_s"),
            ("TRANSCRIBE_EVENT_LOOP", "trio", "event_loop"),
        ],
    )
    def test_env_names_setting_out_of_range(self, name: str, raw: str, setting: str) -> None:
        assert f"`$.{setting}`" in config_error(**{name: raw})

    def test_env_override_into_bad_section(self, tmp_path: Path) -> None:
        path = toml(tmp_path, 'local = "x"\n')
        assert "local" in config_error(path, TRANSCRIBE_LOCAL_WORKERS="2")

    def test_flags_override_environment(self) -> None:
        s = load_settings(
            environ={"TRANSCRIBE_PORT": "9100"}, overrides={"port": 9300, "host": None}
        )
        assert (s.port, s.host) == (9300, "127.0.0.1")


class TestKeys:
    def test_keys_fall_back_to_dev_key_in_development(self) -> None:
        assert load_settings(environ={}).keys() == [DEV_KEY] == ["dev-key"]

    def test_keys_have_no_fallback_in_production(self) -> None:
        assert load_settings(environ={"TRANSCRIBE_PROFILE": "production"}).keys() == []

    @pytest.mark.parametrize("profile", ["development", "production"])
    def test_keys_are_the_configured_ones(self, profile: str) -> None:
        s = load_settings(environ={"TRANSCRIBE_PROFILE": profile, "TRANSCRIBE_API_KEYS": "k1, k2"})
        assert s.keys() == ["k1", "k2"]

    def test_keys_returns_a_copy(self) -> None:
        s = Settings(api_keys=["k1"])
        s.keys().append("intruder")
        assert s.keys() == ["k1"]


class TestProviderSetting:
    def test_provider_setting_reads_file(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("DEEPGRAM_API_KEY", raising=False)
        monkeypatch.delenv("DEEPGRAM_BASE_URL", raising=False)
        path = toml(tmp_path, '[providers.DEEPGRAM]\napi_key = "file-key"\nbase_url = "u"\n')
        s = load_settings(path, environ={})
        assert s.provider_setting("DEEPGRAM", "api_key") == "file-key"
        assert s.provider_setting("DEEPGRAM", "base_url") == "u"

    def test_provider_setting_prefers_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = toml(tmp_path, '[providers.DEEPGRAM]\napi_key = "file-key"\n')
        s = load_settings(path, environ={})
        monkeypatch.setenv("DEEPGRAM_API_KEY", "env-key")
        assert s.provider_setting("DEEPGRAM", "api_key") == "env-key"

    def test_provider_setting_ignores_empty_environment(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        path = toml(tmp_path, '[providers.DEEPGRAM]\napi_key = "file-key"\n')
        s = load_settings(path, environ={})
        monkeypatch.setenv("DEEPGRAM_API_KEY", "")
        assert s.provider_setting("DEEPGRAM", "api_key") == "file-key"

    def test_provider_setting_is_none_when_unset(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.delenv("SONIOX_API_KEY", raising=False)
        s = load_settings(environ={})
        assert s.provider_setting("SONIOX", "api_key") is None

    def test_provider_setting_from_environment_only(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
        assert load_settings(environ={}).provider_setting("OPENAI", "api_key") == "sk-env"

    def test_provider_setting_does_not_mix_providers(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.delenv("CARTESIA_API_KEY", raising=False)
        monkeypatch.setenv("DEEPGRAM_API_KEY", "dg")
        path = toml(tmp_path, '[providers.OPENAI]\napi_key = "oa"\n')
        s = load_settings(path, environ={})
        assert s.provider_setting("CARTESIA", "api_key") is None
        assert s.provider_setting("OPENAI", "base_url") is None


# ------------------------------------------------------------ server/auth.py


class TestKeyChecker:
    KEYS = ("test-key-alpha-0123456789", "k\u00e9y-\u043a\u043b\u044e\u0447-\U0001f511")

    def test_verify_accepts_each_configured_key(self) -> None:
        checker = KeyChecker(self.KEYS)
        assert len(checker) == 2
        assert all(checker.verify(k) for k in self.KEYS)

    @pytest.mark.parametrize(
        "presented",
        [
            "",
            " ",
            "test-key-alpha",  # prefix
            "test-key-alpha-01234567890",  # suffix
            "xtest-key-alpha-0123456789",
            " test-key-alpha-0123456789",
            "test-key-alpha-0123456789 ",
            "test-key-alpha-0123456789\n",
            "TEST-KEY-ALPHA-0123456789",
            "test-key-alpha-0123456789test-key-alpha-0123456789",
            "k\u00e9y",
            "ke\u0301y-\u043a\u043b\u044e\u0447-\U0001f511",  # same text, NFD
            "\ud800",  # lone surrogate
            "dev-key",
        ],
    )
    def test_verify_rejects_near_misses(self, presented: str) -> None:
        assert KeyChecker(self.KEYS).verify(presented) is False

    def test_verify_rejects_everything_without_keys(self) -> None:
        checker = KeyChecker([])
        assert len(checker) == 0
        assert not checker.verify("")
        assert not checker.verify("dev-key")

    def test_checker_drops_empty_keys(self) -> None:
        checker = KeyChecker(["", "k"])
        assert len(checker) == 1
        assert not checker.verify("")
        assert checker.verify("k")

    def test_fingerprint_is_short_and_stable(self) -> None:
        fp = fingerprint(self.KEYS[0])
        assert fp == fingerprint(self.KEYS[0]) != fingerprint(self.KEYS[1])
        assert len(fp) == 8 and int(fp, 16) >= 0
        assert self.KEYS[0] not in fp


class TestBearerToken:
    @pytest.mark.parametrize(
        ("header", "token"),
        [
            ("Bearer x", "x"),
            ("bearer x", "x"),
            ("BEARER x", "x"),
            ("Bearer test-key-alpha-0123456789", "test-key-alpha-0123456789"),
            ("Bearer  x ", "x"),
            ("Basic x", None),
            ("Basic dXNlcjpwYXNz", None),
            ("Token x", None),
            ("Bearerx", None),
            ("Bearer ", None),
            ("Bearer", None),
            ("Bearer    ", None),
            ("x", None),
            ("", None),
            (None, None),
        ],
    )
    def test_server_reads_bearer_token(self, header: str | None, token: str | None) -> None:
        assert bearer_token(header) == token


class TestProviderTables:
    def test_a_provider_table_is_read_whatever_the_name_case(self, tmp_path: Path) -> None:
        path = toml(tmp_path, '[providers.deepgram]\napi_key = "dg-key"\n')
        settings = load_settings(path, environ={})
        assert settings.provider_setting("DEEPGRAM", "api_key") == "dg-key"

    def test_an_unknown_provider_setting_is_refused(self, tmp_path: Path) -> None:
        path = toml(tmp_path, '[providers.DEEPGRAM]\napi_kye = "dg-key"\n')
        message = config_error(path)
        assert "providers.DEEPGRAM.api_kye" in message and "api_key" in message

    def test_an_unknown_provider_setting_is_named_whatever_its_value(self, tmp_path: Path) -> None:
        # A number failed the decoder first: "Expected str, got int - at $.providers[...]".
        path = toml(tmp_path, '[providers.deepgram]\napi_key = "x"\nfoo = 1\n')
        assert "providers.deepgram.foo: unknown setting" in config_error(path)
        path = toml(tmp_path, "[providers.deepgram]\napi_key = 1\n")
        assert "providers.deepgram.api_key: expected a string" in config_error(path)


class TestEveryVariable:
    def test_every_setting_has_an_environment_variable(self) -> None:
        from transcribe_gateway.config import _ENV, StoreSettings

        named = {where for where, _ in _ENV.values()}
        missing = []
        for prefix, struct in (
            ((), Settings),
            (("local",), LocalSettings),
            (("store",), StoreSettings),
        ):
            for field in msgspec.structs.fields(struct):
                kind = field.type
                if kind in (LocalSettings, StoreSettings) or str(kind).startswith("dict"):
                    continue  # a section, or a table of names ([local.whisper_models], providers)
                if (*prefix, field.name) not in named:
                    missing.append(".".join((*prefix, field.name)))
        assert missing == []

    @pytest.mark.parametrize(
        ("name", "raw", "where", "value"),
        [
            ("TRANSCRIBE_OUTGOING_QUEUE", "64", ("outgoing_queue",), 64),
            ("TRANSCRIBE_LOCAL_WHISPER_BEAM_SIZE", "2", ("local", "whisper_beam_size"), 2),
            ("TRANSCRIBE_LOCAL_MAX_UTTERANCE_MS", "12000", ("local", "max_utterance_ms"), 12000),
        ],
    )
    def test_the_variables_that_were_missing(
        self, name: str, raw: str, where: tuple[str, ...], value: int
    ) -> None:
        got: object = load_settings(environ={name: raw})
        for part in where:
            got = getattr(got, part)
        assert got == value
        assert f"`$.{'.'.join(where)}`" in config_error(**{name: "0"})

    def test_every_variable_is_in_the_readme_table(self) -> None:
        from tests.conftest import ROOT
        from transcribe_gateway.config import _ENV

        readme = (ROOT / "README.md").read_text()
        table = readme[readme.index("## Configuration") : readme.index("Example `gateway.toml`")]
        assert [name for name in _ENV if f"`{name}`" not in table] == []


TYPO = "TRANSCRIBE_IDLE_TIMEOUT"


class TestUnknownVariables:
    def test_an_unknown_variable_is_a_warning_with_the_likely_name(self) -> None:
        from transcribe_gateway.config import unknown_env

        warnings = unknown_env({TYPO: "5", "PATH": "/bin"})
        assert len(warnings) == 1
        assert f"{TYPO} " in warnings[0]
        assert "did you mean TRANSCRIBE_IDLE_TIMEOUT_S?" in warnings[0]
        # Only a warning: the settings still load (other tools may share the prefix).
        assert load_settings(environ={TYPO: "5"}).idle_timeout_s == 30

    def test_no_variable_the_project_uses_warns(self) -> None:
        """Every ``TRANSCRIBE_*`` variable named in the repository (server settings, the
        stream client's, the docs' examples) is known; Python constants are not variables."""
        import re

        from tests.conftest import ROOT
        from transcribe_gateway.config import unknown_env

        used: set[str] = set()
        for top in ("src", "tests", "bench", "scripts", ".ci", "clients", "docs", "README.md"):
            base = ROOT / top
            files = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file()]
            for path in files:
                if "node_modules" in path.parts or path.suffix in (".pyc", ".db", ".wav"):
                    continue
                try:
                    text = path.read_text()
                except (UnicodeDecodeError, OSError):
                    continue
                for name in re.findall(r"\bTRANSCRIBE_[A-Z0-9_]*[A-Z0-9]\b", text):
                    if not re.search(rf"^\s*{name}\s+=", text, re.MULTILINE):  # a constant
                        used.add(name)
        assert "TRANSCRIBE_API_KEYS" in used and "TRANSCRIBE_URL" in used
        used -= {TYPO}  # the typo these tests and the README show on purpose
        assert unknown_env(dict.fromkeys(used, "x")) == []


class TestBlankKeys:
    @pytest.mark.parametrize("text", ['api_keys = [""]\n', 'api_keys = ["k1", "  "]\n'])
    def test_an_empty_or_blank_key_is_refused(self, tmp_path: Path, text: str) -> None:
        assert "api_keys" in config_error(toml(tmp_path, text))

    def test_an_empty_key_from_a_flag_is_refused(self) -> None:
        with pytest.raises(ConfigError, match="api_keys"):
            load_settings(environ={}, overrides={"api_keys": ["\t"]})


class TestBlankHost:
    @pytest.mark.parametrize("host", ["", "  "])
    def test_an_empty_host_is_refused_not_every_interface(self, host: str) -> None:
        assert "host" in config_error(TRANSCRIBE_HOST=host)
        with pytest.raises(ConfigError, match=r"0\.0\.0\.0"):
            load_settings(environ={}, overrides={"host": host})


class TestRedisUrl:
    @pytest.mark.parametrize("url", ["htp://x", "localhost:6379", "redis://x:port/0"])
    def test_a_bad_redis_url_is_named(self, url: str) -> None:
        message = config_error(TRANSCRIBE_STORE_BACKEND="redis", TRANSCRIBE_REDIS_URL=url)
        assert "store.redis_url" in message

    def test_a_bad_redis_url_does_not_show_the_password(self) -> None:
        # A "/" in the password splits the host part: the parser's words quote it.
        url = "redis://:Xk3pQ/9zR+w@10.0.0.5:6379/0"
        message = config_error(TRANSCRIBE_STORE_BACKEND="redis", TRANSCRIBE_REDIS_URL=url)
        assert "store.redis_url" in message and "percent-encode" in message
        assert "Xk3pQ" not in message and "9zR" not in message

    @pytest.mark.parametrize("url", ["redis://10.0.0.5:6379/0", "rediss://h/1", "unix:///tmp/r"])
    def test_a_good_redis_url_passes(self, url: str) -> None:
        env = {"TRANSCRIBE_STORE_BACKEND": "redis", "TRANSCRIBE_REDIS_URL": url}
        assert load_settings(environ=env).store.redis_url == url

    def test_only_the_backend_in_use_is_checked(self) -> None:
        # A setting of the other backend, left over, is not in use: not refused.
        sqlite = load_settings(environ={"TRANSCRIBE_REDIS_URL": "localhost:6379"})
        assert sqlite.store.backend == "sqlite"
        env = {
            "TRANSCRIBE_STORE_BACKEND": "redis",
            "TRANSCRIBE_REDIS_URL": "redis://h/0",
            "TRANSCRIBE_STORE_PATH": "",
        }
        assert load_settings(environ=env).store.backend == "redis"


def test_a_store_path_that_cannot_be_checked_is_named() -> None:
    # A name too long (or a directory we may not search) raised OSError: a traceback.
    with pytest.raises(
        ConfigError, match=r"^store\.path: .* cannot be checked: File name too long"
    ):
        check_path("/tmp/" + "x" * 300 + "/store.db")
