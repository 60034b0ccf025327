"""Header limits through a real Sendmail 8.17 (issue 13): no cap may hide a covering From:.

Envelope sender uncovered (bob@fabrikam.test), no TLS, milterd in enforce mode:

* a partner ``From:`` after 2,100 other header fields, and a 60 KiB ``From:`` (a folded list of
  mailboxes, the partner last, or first) are refused (550, ``no_tls``); the same messages naming
  a non-partner are delivered whole;
* Sendmail's own default ``MaxHeadersLength`` (32768 bytes for all headers) refuses every one of
  them itself (552 5.6.0, before milterd decides): recorded by a second instance left at the
  default.  The first instance raises it (``confMAX_HEADERS_LENGTH``) so that Sendmail accepts
  what Postfix accepts and milterd has to decide.
"""

from __future__ import annotations


import pytest

from milterd.policy.stamp import parse_stamp

from support import MilterdFactory, make_lab_dir
from coverage_cases import (
    FILLER_HEADERS,
    LONG_FROM_BYTES,
    PARTNER,
    RECEIVE_DOMAINS,
    UNCOVERED_SENDER,
    RawSMTP,
    Sender,
    header,
    long_from_message,
    many_headers_message,
    send_one,
    simple_message,
    stored_headers,
    wait_stored,
)
from ds_table import reason_from_reply

pytestmark = pytest.mark.sendmail

RAISED_MAX_HEADERS_LENGTH = 1048576
MILTERD_ENFORCE = f"""
[domain_security]
mode = "enforce"
receive_domains = {list(RECEIVE_DOMAINS)!r}
""".replace("'", '"')

MESSAGES = {
    "hdrs-partner": lambda s: many_headers_message(s, PARTNER),
    "long-partner-last": lambda s: long_from_message(s, PARTNER),
    "long-partner-first": lambda s: long_from_message(s, PARTNER, partner_first=True),
}
CONTROLS = {
    "hdrs-control": lambda s: many_headers_message(s, "fabrikam.test"),
    "long-control": lambda s: long_from_message(s, "fabrikam.test"),
}


@pytest.fixture(scope="module")
def sendmail_labs(partners):
    """milterd (enforce) behind two Sendmails: MaxHeadersLength raised, and left at its default."""
    from sendmail_lab import SendmailLab, SendmailLabError, ensure_provisioned

    try:
        ensure_provisioned()
    except SendmailLabError as e:
        pytest.fail(f"cannot provision the private sendmail: {e}")
    base = make_lab_dir("milterd-cov-sm-")
    factory = MilterdFactory(base)
    labs = []
    try:
        m = factory(MILTERD_ENFORCE, name="m")
        for name, extra in (
            ("raised", f"define(`confMAX_HEADERS_LENGTH', `{RAISED_MAX_HEADERS_LENGTH}')dnl"),
            ("default", ""),
        ):
            lab = SendmailLab(base / f"sm-{name}", milter_socket=m.socket_spec,
                              ca_cert=partners.pki.ca_path,
                              server_cert=partners.server.cert_path,
                              server_key=partners.server.key_path,
                              local_domains=["contoso.test"], extra_mc=extra)
            labs.append(lab)
            lab.start()
        yield m, labs[0], labs[1]
    finally:
        for lab in labs:
            lab.stop()
        factory.close()


def _send(lab, subject: str, payload: bytes):
    with RawSMTP("127.0.0.1", lab.port) as smtp:
        smtp.cmd(b"EHLO client.example.test")
        return send_one(smtp, Sender(UNCOVERED_SENDER), subject, payload)


def _stored(lab, subject: str, timeout: float = 15.0):
    return wait_stored(lambda: stored_headers(lab.delivered_files()), {subject},
                       timeout).get(subject)


def _delivered_subjects(lab) -> set[str]:
    return set(stored_headers(lab.delivered_files()))


@pytest.mark.parametrize("kind", list(MESSAGES))
def test_sendmail_refuses_partner_from_beyond_limits_without_tls(sendmail_labs, kind):
    m, lab, _ = sendmail_labs
    subject = f"raised-{kind}"
    o = _send(lab, subject, MESSAGES[kind](subject))
    assert o.code // 100 == 5, (o, m.log_tail(5), lab.log_text()[-2000:])
    assert reason_from_reply(o.text) == "no_tls", o
    assert subject not in _delivered_subjects(lab)


@pytest.mark.parametrize("kind", list(CONTROLS))
def test_sendmail_delivers_the_same_without_partner_whole(sendmail_labs, kind):
    m, lab, _ = sendmail_labs
    subject = f"raised-{kind}"
    o = _send(lab, subject, CONTROLS[kind](subject))
    assert o.accepted, (o, lab.log_text()[-2000:])
    fields = _stored(lab, subject)
    assert fields is not None, lab.log_text()[-2000:]
    stamps = header(fields, "X-Milterd-TLS")
    assert len(stamps) == 1 and parse_stamp(stamps[0])["domain-secure"] == "none", stamps
    (value,) = header(fields, "From")
    assert value.endswith("CEO <ceo@fabrikam.test>"), value[-200:]
    if kind == "hdrs-control":
        assert len(fields) > FILLER_HEADERS
    else:
        assert len(value) >= LONG_FROM_BYTES - 2 * 1400   # unfolded: CRLF SP -> SP


@pytest.mark.parametrize("kind", list(MESSAGES) + list(CONTROLS))
def test_sendmail_default_max_headers_length_refuses_itself(sendmail_labs, kind):
    """Recorded behaviour: with its default MaxHeadersLength (32768) Sendmail refuses all of these
    with 552 5.6.0 "Headers too large" (fail closed, before milterd is asked)."""
    m, _, lab = sendmail_labs
    subject = f"default-{kind}"
    make = {**MESSAGES, **CONTROLS}[kind]
    o = _send(lab, subject, make(subject))
    assert o.code == 552 and "Headers too large (32768 max)" in o.text, o
    assert subject not in _delivered_subjects(lab)


def test_sendmail_default_delivers_plain_uncovered(sendmail_labs):
    m, _, lab = sendmail_labs
    o = _send(lab, "default-plain", simple_message("default-plain"))
    assert o.accepted, o
    assert _stored(lab, "default-plain") is not None, lab.log_text()[-2000:]
