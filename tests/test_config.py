from __future__ import annotations

import subprocess
import sys

import pytest

from milterd.core.config import ConfigError, default_config_text, parse_config


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


# -- listeners: what check-config accepts is what starts (tests/test_policy_delegation.py) --------

def _one_error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, source="f.toml")
    assert len(e.value.errors) == 1, e.value.errors
    return e.value.errors[0]


def test_policy_listen_unix_socket_and_group():
    c = parse_config('[policy]\nlisten = "unix:/var/spool/postfix/milterd/policy.sock"\n')
    assert c.policy_listen.is_unix and c.policy_listen.path == "/var/spool/postfix/milterd/policy.sock"
    assert str(c.policy_listen) == "unix:/var/spool/postfix/milterd/policy.sock"
    assert c.policy_group == "postfix"                      # the [milter] group by default
    c = parse_config('[milter]\ngroup = "mail"\n[policy]\nlisten = "unix:/run/p.sock"\n')
    assert c.policy_group == "mail"
    c = parse_config('[policy]\nlisten = "unix:/run/p.sock"\ngroup = ""\n')
    assert c.policy_group == ""
    c = parse_config('[policy]\nlisten = "127.0.0.1:10040"\n')
    assert not c.policy_listen.is_unix and c.policy_listen.port == 10040


@pytest.mark.parametrize("text, key, words", [
    ('[policy]\nlisten = "unix:relative.sock"\n', "policy.listen", "must be absolute"),
    ('[policy]\nlisten = "unix:/' + "x" * 120 + '"\n', "policy.listen", "too long"),
    ('[policy]\nlisten = "127.0.0.1:10040"\ngroup = "postfix"\n', "policy.group",
     "applies only to a unix socket"),
    ('[policy]\nlisten = "unix:/run/p.sock"\ngroup = "post fix"\n', "policy.group",
     "is not a group name"),
    ('[policy]\nlisten = "unix:/run/p.sock"\ngroup = 105\n', "policy.group", "expected str"),
    ('[milter]\ngroup = "a:b"\n', "milter.group", "is not a group name"),
    ('[metrics]\nlisten = "unix:/run/m.sock"\n', "metrics.listen", "not supported here"),
    ('[socketmap]\nlisten = "unix:/run/s.sock"\n', "socketmap.listen", "not supported here"),
    ('[metrics]\nlisten = "::1:9487"\n', "metrics.listen", "goes in brackets"),
    ('[metrics]\nlisten = "[::1]"\n', "metrics.listen", "must be"),
    ('[metrics]\nlisten = "[127.0.0.1]:9487"\n', "metrics.listen", "not an IPv6 address"),
    ('[metrics]\nlisten = "[localhost]:9487"\n', "metrics.listen", "not an IPv6 address"),
    ('[metrics]\nlisten = "[1:2]:9487"\n', "metrics.listen", "not an IPv6 address"),
    ('[policy]\nlisten = "999.1.1.1:10040"\n', "policy.listen", "not an IPv4 address"),
    ('[policy]\nlisten = "bad_name:10040"\n', "policy.listen", "not an IPv4 address"),
    ('[socketmap]\nlisten = "127.0.0.1:0"\n', "socketmap.listen", "port out of range"),
    ('[socketmap]\nlisten = "127.0.0.1:65536"\n', "socketmap.listen", "port out of range"),
    ('[socketmap]\nlisten = "127.0.0.1:١٠"\n', "socketmap.listen", "must be"),
    ('[milter]\nlisten = "inet:8894@::1"\n', "milter.listen", 'use "inet6:8894@::1"'),
    ('[milter]\nlisten = "inet:8894@[::1]"\n', "milter.listen", 'use "inet6:8894@::1"'),
    ('[milter]\nlisten = "inet6:8894@127.0.0.1"\n', "milter.listen", 'use "inet:8894@127.0.0.1"'),
    ('[milter]\nlisten = "inet6:8894@localhost"\n', "milter.listen", "resolves no names"),
    ('[milter]\nlisten = "inet6:0@::1"\n', "milter.listen", "port out of range"),
    ('[milter]\nlisten = "inet:99999@127.0.0.1"\n', "milter.listen", "port out of range"),
    ('[milter]\nlisten = "inet:8894@bad_host"\n', "milter.listen", "not an IPv4 address"),
])
def test_listener_errors_name_their_key(text, key, words):
    error = _one_error(text)
    assert error.startswith(f"f.toml: {key}: "), error
    assert words in error, error


@pytest.mark.parametrize("section, value, expected", [
    ("metrics", "[::1]:9487", "[::1]:9487"),
    ("metrics", "[0:0::1]:9487", "[0:0::1]:9487"),
    ("policy", "[::1]:10040", "[::1]:10040"),
    ("policy", "[::]:10040", "[::]:10040"),
    ("socketmap", "[::ffff:127.0.0.1]:10041", "[::ffff:127.0.0.1]:10041"),
    ("socketmap", "localhost:10041", "localhost:10041"),
    ("metrics", "0.0.0.0:9487", "0.0.0.0:9487"),
])
def test_tcp_listeners_accept_ipv4_ipv6_and_names(section, value, expected):
    c = parse_config(f'[{section}]\nlisten = "{value}"\n')
    assert str(getattr(c, f"{section}_listen")) == expected


@pytest.mark.parametrize("spec", ["inet6:8894@::1", "inet6:8894@[::1]", "inet6:8894",
                                  "inet6:8894@::ffff:127.0.0.1", "inet:8894@127.0.0.1",
                                  "inet:8894@[127.0.0.1]", "inet:8894@localhost", "inet:8894",
                                  "unix:/run/milterd/milter.sock", "local:/run/m.sock"])
def test_milter_specs_libmilter_opens_are_accepted(spec):
    assert parse_config(f'[milter]\nlisten = "{spec}"\n').milter.listen == spec


def test_check_config_cli_and_start_agree_on_a_bad_ipv6_listener(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[metrics]\nlisten = "::1:9487"\n[milter]\nlisten = "inet:8894@::1"\n')
    r = _milterd("check-config", "-c", str(bad))
    assert r.returncode == 2 and "metrics.listen" in r.stderr and "milter.listen" in r.stderr
    r = _milterd("run", "-c", str(bad))
    assert r.returncode == 2 and "metrics.listen" in r.stderr and "milter.listen" in r.stderr
