"""Configuration: units, key-path errors, the shipped example, the CLI around them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import load_config, parse_config, parse_duration, parse_rate, parse_size
from relay.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def run_relay(
    *args: str, stdin: str | None = None, cwd: Path = ROOT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("5m", 300), ("4h", 14400), ("5d", 432000), (12, 12)]
)
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("text", "size"), [("512KiB", 524288), ("25MiB", 26214400), (100, 100)])
def test_sizes(text, size):
    assert parse_size(text) == size


def test_rates():
    assert parse_rate("300/min").per_second == 5
    assert parse_rate("2000/h").count == 2000
    with pytest.raises(ValueError, match='expected "N/unit" like "300/min"'):
        parse_rate("300 per minute")


def test_every_problem_named_by_key_path():
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "providers": {"orange": {"domains": ["orange.fr"], "rate": "lots", "colour": 1}},
                "limits": {"max_message_size": "huge"},
                "retry": {"initial": "2h", "max": "1h"},
                "accounts": [{"name": "a", "password": "hunter2", "senders": ["*@x.org"]}],
                "listeners": [{"name": "s", "tls": "sometimes", "class": "vip"}],
            }
        )
    problems = err.value.problems
    assert 'providers.orange.rate: expected "N/unit" like "300/min", got \'lots\'' in problems
    assert "providers.orange.colour: unknown key" in problems
    assert any(p.startswith("limits.max_message_size: expected a size") for p in problems)
    assert any(p.startswith("retry.max: must be at least retry.initial") for p in problems)
    assert any(
        p.startswith("accounts[0].password: plaintext passwords are refused") for p in problems
    )
    assert any(
        p.startswith("listeners[0].tls: expected one of none, starttls, implicit") for p in problems
    )
    assert any(p.startswith("listeners[0].class: unknown class 'vip'") for p in problems)


def test_environment_substitution(monkeypatch):
    monkeypatch.setenv("RELAY_TEST_TOKEN", "t0ken")
    config = parse_config({"admin": {"token": "${RELAY_TEST_TOKEN}"}})
    assert config.admin.token == "t0ken"
    assert "t0ken" not in repr(config.admin)
    with pytest.raises(ConfigError, match=r"admin\.token: environment variable RELAY_NOPE"):
        parse_config({"admin": {"token": "${RELAY_NOPE}"}})


def test_providers_inherit_defaults_and_rules_compile():
    config = parse_config(
        {
            "defaults": {"max_connections": 7, "rate": "10/s"},
            "providers": {
                "p": {
                    "domains": ["p.test"],
                    "max_connections": 2,
                    "rules": [{"match": "ofr_506", "action": "suspend", "for": "30m"}],
                }
            },
        }
    )
    [provider] = config.providers
    assert provider.shaping.max_connections == 2
    assert provider.shaping.rate is not None and provider.shaping.rate.text == "10/s"
    assert provider.shaping.rules[0].pattern.search("550 5.2.0 OFR_506") is not None
    assert provider.shaping.rules[0].duration == 1800


def test_rule_needs_duration_for_suspend():
    with pytest.raises(ConfigError, match=r"providers.p.rules\[0\].for: is required"):
        parse_config(
            {
                "providers": {
                    "p": {"domains": ["p.test"], "rules": [{"match": "x", "action": "suspend"}]}
                }
            }
        )


def test_shipped_config_is_valid():
    config = load_config(str(ROOT / "config" / "relay.yaml"))
    names = {p.name for p in config.providers}
    assert {"laposte", "orange", "free", "facebook", "gmail", "outlook", "yahoo"} <= names
    assert config.tls.self_signed
    assert [str(n) for n in config.listeners[0].trusted_networks] == ["127.0.0.1/32", "::1/128"]


def test_check_config_cli(tmp_path):
    good = run_relay("check-config", "config/relay.yaml")
    assert good.returncode == 0, good.stderr
    assert "(transactional, orange)" in good.stdout and "(bulk, default)" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  orange:\n    domains: [orange.fr]\n    rate: 300 per min\n")
    result = run_relay("check-config", str(bad))
    assert result.returncode == 1
    assert 'providers.orange.rate: expected "N/unit" like "300/min"' in result.stderr
    assert "Traceback" not in result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("providers: [\n")
    result = run_relay("check-config", str(broken))
    assert result.returncode == 1 and "invalid YAML" in result.stderr


def test_serve_without_certificate_says_so_in_one_line(tmp_path):
    config = tmp_path / "relay.yaml"
    config.write_text(
        f"listeners: [{{name: s, address: 127.0.0.1, port: 0}}]\n"
        f"tls: {{cert: {tmp_path}/missing.pem, key: {tmp_path}/missing.key}}\n"
        f"spool: {{path: {tmp_path}/spool}}\n"
    )
    result = run_relay("serve", "-c", str(config))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"tls.cert: {tmp_path}/missing.pem does not exist" in result.stderr


def test_passwd_prints_a_hash_the_relay_accepts():
    from relay.passwords import verify_password

    result = run_relay("passwd", stdin="correct horse\n")
    assert result.returncode == 0
    encoded = result.stdout.strip()
    assert encoded.startswith("scrypt:")
    assert verify_password(b"correct horse", encoded)
    assert not verify_password(b"wrong", encoded)
    parse_config({"accounts": [{"name": "a", "password": encoded, "senders": ["*@x.org"]}]})


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), -float("inf"), 10**400, "1e400", "NaN", "inf", "9" * 400 + "s"],
)
def test_durations_must_be_finite(value):
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_an_absurd_duration_or_rate_is_named_by_its_key_path():
    with pytest.raises(ConfigError) as err:
        parse_config(
            {
                "retry": {"initial": float("nan"), "lifetime": float("inf")},
                "delivery": {"greeting_timeout": 10**400},
                "limits": {"idle_timeout": "9" * 400 + "s"},
                "defaults": {"rate": "9" * 400 + "/s"},
                "providers": {
                    "p": {
                        "domains": ["p.test"],
                        "rules": [{"match": "x", "action": "suspend", "for": "3651d"}],
                    }
                },
            }
        )
    problems = err.value.problems
    for path in (
        "retry.initial",
        "retry.lifetime",
        "delivery.greeting_timeout",
        "limits.idle_timeout",
        "providers.p.rules[0].for",
    ):
        assert any(p.startswith(f"{path}: expected a finite duration") for p in problems), path
    assert any(p.startswith("defaults.rate: expected a positive rate") for p in problems)
    assert all(len(p) < 200 for p in problems)  # the 400 digits are not quoted back


def test_check_config_names_nan_and_infinity_in_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("retry: {initial: .nan, max: 1.0e+400}\ndns: {timeout: .inf}\n")
    result = run_relay("check-config", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    for path in ("retry.initial", "retry.max", "dns.timeout"):
        assert f"{path}: expected a finite duration" in result.stderr, result.stderr
    huge = tmp_path / "huge.yaml"
    huge.write_text("retry: {initial: " + "9" * 5000 + "}\n")
    result = run_relay("check-config", str(huge))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "invalid YAML" in result.stderr


def test_admin_section():
    config = parse_config({})
    assert (config.admin.token, config.admin.metrics_public) == (None, False)
    config = parse_config({"admin": {"address": "0.0.0.0", "metrics_public": True}})
    assert config.admin.metrics_public is True
    with pytest.raises(ConfigError) as err:
        parse_config({"admin": {"metrics_public": "yes", "token": "abc\r\nX-Evil: 1"}})
    assert any(
        p.startswith("admin.metrics_public: expected true or false") for p in err.value.problems
    )
    assert "admin.token: must not contain CR or LF" in err.value.problems


def test_the_example_password_is_the_one_relay_serve_refuses():
    from relay.config.checks import EXAMPLE_PASSWORD_HASH, example_password_exposed
    from relay.passwords import verify_password

    shipped = load_config(str(ROOT / "config" / "relay.yaml"))
    [webapp] = [a for a in shipped.accounts if a.name == "webapp"]
    assert webapp.password == EXAMPLE_PASSWORD_HASH
    assert verify_password(b"change-me", EXAMPLE_PASSWORD_HASH)
    assert example_password_exposed(shipped) is None  # the trial listens on loopback
    for address, exposed in (("0.0.0.0", True), ("192.0.2.1", True), ("::ffff:127.0.0.1", False)):
        listener = {"name": "s", "address": address}
        config = parse_config(
            {
                "listeners": [listener],
                "accounts": [{"name": "w", "password": EXAMPLE_PASSWORD_HASH, "senders": ["*"]}],
            }
        )
        assert (example_password_exposed(config) is not None) is exposed, address


def test_dane_without_dnssec_names_both_keys():
    with pytest.raises(ConfigError, match=r"providers\.x\.tls: dane needs .*dns\.dnssec: true"):
        parse_config({"providers": {"x": {"domains": ["a.test"], "tls": "dane"}}})
    with pytest.raises(ConfigError) as err:
        parse_config({"delivery": {"tls": "dane"}, "providers": {"x": {"domains": ["a.test"]}}})
    assert err.value.problems == [
        "delivery.tls: dane needs validated DNS answers: set dns.dnssec: true (and keep "
        "delivery.dane: true) with a local validating resolver"
    ]
    config = parse_config(
        {"dns": {"dnssec": True}, "providers": {"x": {"domains": ["a.test"], "tls": "dane"}}}
    )
    assert config.providers[0].shaping.tls == "dane"
