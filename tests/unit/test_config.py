import pytest

from sidecard import config as cfg


def test_defaults_need_no_file():
    c = cfg.load(None)
    assert c.server.max_frame_bytes == 1 << 20
    assert c.server.socket_mode == 0o660
    assert [t.model for t in c.routes["default"].targets] == ["claude-sonnet-4-6", "claude-haiku-4-5-20251001"]
    assert c.metrics.address == "127.0.0.1:9464"
    assert c.prices["claude-sonnet-4"].input == 3.0


def test_a_file_saved_with_a_byte_order_mark_or_not_as_utf8(tmp_path):
    """Some editors write a byte-order mark: the file is read as it means. One saved as UTF-16 is refused naming the
    file, never a traceback (check-config, serve and reload all load it)."""
    marked = tmp_path / "marked.toml"
    marked.write_bytes('\ufeff[server]\nsocket = "/tmp/x.sock"\n'.encode())
    assert cfg.load(marked).server.socket == "/tmp/x.sock"
    wide = tmp_path / "wide.toml"
    wide.write_bytes('[server]\nsocket = "/tmp/x.sock"\n'.encode("utf-16"))
    with pytest.raises(cfg.ConfigError, match=f"config error in {wide}: not UTF-8 text .*save it as UTF-8"):
        cfg.load(wide)


def test_file_values_override_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[server]\nsocket = "/tmp/x.sock"\nsocket_mode = 0o600\n[prices.my-model]\ninput = 1.0\noutput = 2.0\n')
    c = cfg.load(f)
    assert c.server.socket == "/tmp/x.sock" and c.server.socket_mode == 0o600
    assert c.prices["my-model"].output == 2.0 and "claude-sonnet-4" in c.prices


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[server]\nmax_frame_bytes = "big"\n', "server.max_frame_bytes: expected int, got str"),
        ("[server]\nmax_frame_byte = 5000\n", "server.max_frame_byte: unknown key"),
        ("[serve]\n", "serve: unknown key"),
        ("[server]\nmax_frame_bytes = 10\n", "server.max_frame_bytes: expected int >= 1024"),
        ('[metrics]\naddress = "nowhere"\n', "metrics: 'nowhere' is not HOST:PORT"),
        ('[routes.fast]\ntargets = [{model = "m", max_attempts = 9}]\n', "routes.fast.targets[0].max_attempts: expected int <= 4"),
        ('[routes.fast]\ntargets = [{provider = "openai", model = "m"}]\n', "routes.fast.targets[0].provider"),
        ('[requests]\ndefault_route = "nope"\n',
         "default_route 'nope' is not a configured route: add [routes.nope] or name one of default, judge"),
        # Routes added beside the built-in default keep it only while it is the default route.
        ('[requests]\ndefault_route = "main"\n[routes.cheap]\ntargets = [{model = "m"}]\n',
         "default_route 'main' is not a configured route: add [routes.main] or name one of cheap, judge"),
        ("[server\n", "invalid TOML"),
        # Budgets the spend ledger would refuse at start-up are refused here, not by a crash of `serve`.
        ('[[budgets]]\nscope = "bogus"\nhard_usd = 1.0\n', "budgets[0]: scope 'bogus'"),
        # inf and nan, which TOML and msgspec take as floats, anywhere (a bound such as ge=0 let inf through).
        ('[[budgets]]\nscope = "global"\nhard_usd = inf\n', "budgets[0].hard_usd: expected a finite number, got inf"),
        ("[cache]\nttl_s = inf\n", "cache.ttl_s: expected a finite number, got inf"),
        ('[routes.fast]\ntargets = [{model = "m", timeout_s = nan}]\n',
         "routes.fast.targets[0].timeout_s: expected a finite number, got nan"),
        ("[feedback]\nscore_max = -inf\n", "feedback.score_max: expected a finite number, got -inf"),
        ("[safety.access.apps.billing.rate_limit]\nburst_s = inf\n",
         "safety.access.apps.billing.rate_limit.burst_s: expected a finite number, got inf"),
        ('[[budgets]]\nscope = "global"\n[[budgets]]\nscope = "global"\n', "two budgets for global per day"),
        # A request would sit out, with a fallback to go to, a wait it would refuse on its last target.
        ("[retry]\nfailover_retry_after_ms = 9000\n",
         "retry.failover_retry_after_ms is larger than retry.max_retry_after_ms"),
        ("[retry]\nmax_retry_after_ms = 500\n", "retry.failover_retry_after_ms is larger than retry.max_retry_after_ms"),
        # A request's max_tokens bound holds for what it is given when it does not ask.
        ("[requests]\ndefault_max_tokens = 1000000000000000\n", "requests.default_max_tokens: expected int <= 1000000"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, text, expected):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(f)
    message = str(info.value)
    assert message.startswith(f"config error in {f}: ")
    assert expected in message
    assert "\n" not in message and "Traceback" not in message


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(cfg.ConfigError, match="cannot read config file"):
        cfg.load(tmp_path / "absent.toml")
