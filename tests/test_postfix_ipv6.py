"""The Domain Security table over IPv6 (issue 13): Postfix listening on [::1], clients on ::1.

Same rows, pins included (fingerprints via the [policy] delegation), same outcomes as
test_postfix_domain_security.py over IPv4.  Postfix's milter view of such a client is
``IPv6:::1`` while its policy request says ``::1``; the pinned rows prove milterd joins them.
"""

from __future__ import annotations


import pytest

from milterd.lab.net import free_port
from milterd.lab.metrics import scrape
from milterd.lab.smtp import make_message, send

from support import MilterdFactory, make_lab_dir
from ds_table import ROWS, check_row, client_tls, delivered_with_subject, ds_config

pytestmark = pytest.mark.postfix
RCPT = "user@contoso.test"
HOST = "::1"


@pytest.fixture(scope="module", params=["enforce", "report"])
def ds_lab6(request, partners):
    from milterd.lab.postfix import PostfixLab, PostfixTLS

    mode = request.param
    factory = MilterdFactory(make_lab_dir("milterd-ds6-"))
    pf = None
    try:
        policy_port, metrics_port = free_port(), free_port()
        m = factory(ds_config(partners, mode=mode, policy_listen=f"127.0.0.1:{policy_port}") +
                    f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
        m.metrics_port = metrics_port
        pf = PostfixLab(milter_socket=m.socket_spec,
                        tls=PostfixTLS(partners.server.cert_path, partners.server.key_path,
                                       partners.pki.ca_path),
                        policy_service=f"inet:127.0.0.1:{policy_port}",
                        listen_address=HOST)
        pf.start_verified()
        yield mode, m, pf
    finally:
        if pf is not None:
            pf.cleanup()
        factory.close()


def test_postfix_listens_on_ipv6(ds_lab6):
    mode, m, pf = ds_lab6
    assert pf.master_listens()              # the master's own LISTEN socket on [::1]:port
    assert f"[{HOST}]:{pf.port}" in (pf.conf / "master.cf").read_text()


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_domain_security_table_over_ipv6(ds_lab6, partners, row):
    mode, m, pf = ds_lab6
    subject = f"v6:{mode}:{row.name}"
    data = make_message(row.sender, RCPT, subject, from_header=row.from_header)
    result = send(pf.port, row.sender, [RCPT], data, host=HOST,
                  tls=client_tls(partners, row.client))
    msg = delivered_with_subject(pf, subject) if result.accepted else None
    if not result.accepted:
        assert all(d["Subject"] != subject for d in pf.delivered())
    check_row(row, result, msg, mode=mode)


def test_clients_were_ipv6(ds_lab6):
    """Runs after the rows: every SMTP client Postfix saw came from [::1]."""
    mode, m, pf = ds_lab6
    connects = [line for line in pf.log_text().splitlines()
                if "postfix/smtpd" in line and " connect from " in line]
    assert len(connects) >= len(ROWS), connects[-3:]
    assert all(f"[{HOST}]" in line for line in connects), [
        line for line in connects if f"[{HOST}]" not in line][:3]


def test_counters_match_the_table_over_ipv6(ds_lab6):
    """Runs after the rows of the same mode: each message counted once, whatever its stage."""
    from collections import Counter


    mode, m, pf = ds_lab6
    metrics = scrape(m.metrics_port)
    failures = Counter(r.reason for r in ROWS if r.status == "fail")
    for reason, n in failures.items():
        key = (f'milterd_domain_security_failures_total{{domain="woodgrovebank.test",'
               f'reason="{reason}"}}')
        assert metrics.get(key) == n, (key, metrics.get(key))
    passes = sum(1 for r in ROWS if r.status == "pass")
    assert metrics[
        'milterd_domain_secured_messages_received_total{domain="woodgrovebank.test"}'] == passes
    refused = 0 if mode == "report" else sum(1 for r in ROWS if r.reply_class == "5xx")
    assert metrics['milterd_messages_total{verdict="reject"}'] == refused
    assert metrics['milterd_messages_total{verdict="accept"}'] == len(ROWS) - refused
