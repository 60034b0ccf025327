"""Domain Security end to end: the shared table against a real Postfix (milter + policy delegation)."""

from __future__ import annotations


import pytest

from milterd.lab.net import free_port
from milterd.lab.metrics import scrape
from milterd.lab.smtp import make_message, send

from support import MilterdFactory, make_lab_dir
from ds_table import ROWS, check_row, client_tls, delivered_with_subject, ds_config

pytestmark = pytest.mark.postfix
RCPT = "user@contoso.test"


@pytest.fixture(scope="module", params=["enforce", "report"])
def ds_lab(request, partners):
    from milterd.lab.postfix import PostfixLab, PostfixTLS

    mode = request.param
    factory = MilterdFactory(make_lab_dir("milterd-ds-"))
    policy_port, metrics_port = free_port(), free_port()
    m = factory(ds_config(partners, mode=mode, policy_listen=f"127.0.0.1:{policy_port}") +
                f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
    m.metrics_port = metrics_port
    pf = PostfixLab(milter_socket=m.socket_spec,
                    tls=PostfixTLS(partners.server.cert_path, partners.server.key_path,
                                   partners.pki.ca_path),
                    policy_service=f"inet:127.0.0.1:{policy_port}").start()
    yield mode, m, pf
    pf.cleanup()
    factory.stop_all()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_domain_security_table(ds_lab, partners, row):
    mode, m, pf = ds_lab
    data = make_message(row.sender, RCPT, f"{mode}:{row.name}", from_header=row.from_header)
    result = send(pf.port, row.sender, [RCPT], data, tls=client_tls(partners, row.client))
    msg = delivered_with_subject(pf, f"{mode}:{row.name}") if result.accepted else None
    if not result.accepted:
        assert all(d["Subject"] != f"{mode}:{row.name}" for d in pf.delivered())
    check_row(row, result, msg, mode=mode)



def test_counters_match_the_table(ds_lab):
    """Runs after the rows of the same mode: each message counted once, whatever its stage."""
    from collections import Counter


    mode, m, pf = ds_lab
    metrics = scrape(m.metrics_port)
    failures = Counter(r.reason for r in ROWS if r.status == "fail")
    for reason, n in failures.items():
        key = f'milterd_domain_security_failures_total{{domain="woodgrovebank.test",reason="{reason}"}}'
        assert metrics.get(key) == n, (key, metrics.get(key))
    passes = sum(1 for r in ROWS if r.status == "pass")
    assert metrics['milterd_domain_secured_messages_received_total{domain="woodgrovebank.test"}'] == passes
    refused = 0 if mode == "report" else sum(1 for r in ROWS if r.reply_class == "5xx")
    assert metrics['milterd_messages_total{verdict="reject"}'] == refused
    assert metrics['milterd_messages_total{verdict="accept"}'] == len(ROWS) - refused
