"""Config loading (TOML -> frozen MtaConfig) and its validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterd.mta.config import config_from_mapping, load_mta_config


def test_toml_round_trip(tmp_path: Path):
    f = tmp_path / "mta.toml"
    f.write_text('''
hostname = "mx.contoso.test"
maildir_root = "maildir"
queue_dir = "/var/tmp/q"
local_domains = ["contoso.test"]
send_domains = ["woodgrovebank.test", ".partner.test"]
milter = "inet:8894@127.0.0.1"
ca_files = ["ca.crt"]

[routes]
"woodgrovebank.test" = "127.0.0.1:2525"
''')
    cfg = load_mta_config(f)
    assert cfg.maildir_root == tmp_path / "maildir" and cfg.queue_dir == Path("/var/tmp/q")
    assert cfg.ca_files == (tmp_path / "ca.crt",)
    assert cfg.route("WoodgroveBank.test") == ("127.0.0.1", 2525)
    assert cfg.on_send_list("woodgrovebank.test") and cfg.on_send_list("mx.partner.test")
    assert not cfg.on_send_list("partner.test") and not cfg.on_send_list("fabrikam.test")
    assert cfg.is_local("CONTOSO.test") and cfg.milter_default_action == "tempfail"
    # the send list is read by milterd's own rules (milterd.policy.names.domain_listed)
    assert cfg.on_send_list("WoodgroveBank.test.") and cfg.on_send_list("a.b.partner.test")
    assert not cfg.on_send_list("evilpartner.test") and not cfg.on_send_list("woodgrovebank..test")
    assert cfg.is_local("contoso.test.") and not cfg.is_local("mx.contoso.test")


@pytest.mark.parametrize("extra, message", [
    ({"bogus": 1}, "unknown config keys: bogus"),
    ({"milter_default_action": "shrug"}, "milter_default_action"),
    ({"milter": "tcp:1@x"}, "unsupported milter socket"),
    ({"tls_cert": "a.crt"}, "tls_cert and tls_key go together"),
    ({"routes": {"x.test": "nohost"}}, "HOST:PORT"),
])
def test_invalid_config_is_refused(extra, message):
    data = {"hostname": "h", "maildir_root": "m", "queue_dir": "q", **extra}
    with pytest.raises(ValueError, match=message):
        config_from_mapping(data)
