from __future__ import annotations

import subprocess
import sys

import pytest

from milterd.config import ConfigError, default_config_text, parse_config


def test_embedded_default_is_valid_and_matches_dataclass_defaults():
    c = parse_config(default_config_text(), source="<default>")
    assert c.milter.listen == "unix:/run/milterd/milter.sock"
    assert c.milter.on_error == "tempfail"
    assert c.domain_security.mode == "enforce"
    assert c.metrics_listen is None and c.policy_listen is None
    assert c.stamp.header == "X-Milterd-TLS"


def test_interface_example_parses():
    c = parse_config("""
[milter]
listen = "inet:8894@127.0.0.1"
on_error = "accept"
[policy]
listen = "127.0.0.1:10040"
[socketmap]
listen = "127.0.0.1:10041"
[metrics]
listen = "[::1]:9487"
[domain_security]
mode = "report"
failure_action = "tempfail"
receive_domains = ["WoodgroveBank.test.", ".contoso.test", "bücher.test"]
send_domains = ["woodgrovebank.test"]
[tls]
min_version = "TLSv1.3"
min_cipher_bits = 256
[peer_cert]
trusted_issuers = ["Lab CA"]
[peer_cert.pins]
"partner.test" = ["ab" ]
""".replace('["ab" ]', '["' + "ab" * 32 + '"]'))
    assert c.domain_security.receive_domains == ("woodgrovebank.test", ".contoso.test",
                                                 "xn--bcher-kva.test")
    assert str(c.metrics_listen) == "[::1]:9487"
    assert c.peer_cert.pins_for("partner.test") == (":".join(["AB"] * 32),)
    assert c.tls.min_version == "TLSv1.3"


def test_every_error_is_reported_with_its_key():
    with pytest.raises(ConfigError) as e:
        parse_config("""
[milter]
listen = "tcp:1"
timeout = "soon"
[domain_security]
mode = "sometimes"
receive_domains = ["*.bad", 7]
[tls]
min_cipher_bits = -1
[metrics]
listen = "nowhere"
[nonsense]
x = 1
[stamp]
header = "X Bad: name"
""", source="f.toml")
    text = "\n".join(e.value.errors)
    for key in ("milter.listen", "milter.timeout", "domain_security.mode",
                "domain_security.receive_domains", "tls.min_cipher_bits", "metrics.listen",
                "nonsense: unknown section", "stamp.header"):
        assert key in text, key
    assert all(line.startswith("f.toml: ") for line in e.value.errors)


def test_booleans_are_not_integers():
    with pytest.raises(ConfigError, match="milter.timeout: expected int"):
        parse_config("[milter]\ntimeout = true\n")


def test_toml_syntax_error_is_one_clear_line():
    with pytest.raises(ConfigError, match="TOML syntax error"):
        parse_config("[milter\n")


def _milterd(*args):
    return subprocess.run([sys.executable, "-m", "milterd", *args], capture_output=True,
                          text=True, timeout=60)


def test_check_config_cli_exit_codes(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text('[domain_security]\nreceive_domains = ["woodgrovebank.test"]\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('[milter]\non_error = "shrug"\n[tls]\nmin_version = "SSLv2"\n')
    r = _milterd("check-config", "-c", str(good))
    assert r.returncode == 0 and "OK" in r.stdout
    r = _milterd("check-config", "-c", str(bad))
    assert r.returncode == 2
    assert "milter.on_error" in r.stderr and "tls.min_version" in r.stderr
    r = _milterd("check-config", "-c", str(tmp_path / "missing.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_default_config_cli_prints_the_embedded_default():
    r = _milterd("default-config")
    assert r.returncode == 0 and r.stdout == default_config_text()
