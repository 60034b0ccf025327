"""Partner terms (issue #15) end to end against a real Postfix: one milterd with one
``[partners."…"]`` table per scenario, its ``[policy]`` delegation on a unix socket (key and
certificate pins arrive through it) and ``/metrics``; one private Postfix listening on [::1] and
on 127.0.0.1.  Every scenario uses its own partner domains, so the tests do not depend on their
order; every message sent is entered in a ledger of what milterd must count, which the last test
compares with ``/metrics`` exactly.
"""

from __future__ import annotations

import ssl
from collections import Counter
from dataclasses import dataclass

import pytest

from milterd.lab.metrics import scrape
from milterd.lab.net import free_port, pid_listens, wait_for_unix_socket
from milterd.lab.smtp import client_context, make_message, send
from milterd.lab.wait import wait_until
from milterd.policy.stamp import parse_stamp

from support import MilterdFactory, make_lab_dir
from ds_table import delivered_with_subject, reason_from_reply

pytestmark = pytest.mark.postfix

RCPT = "user@contoso.test"
V4, V6 = "127.0.0.1", "::1"

# What milterd must have counted, entered as each message is sent (the expected outcome, never
# the observed one): ("fail", domain, reason), ("pass", domain), ("verdict", accept|reject).
LEDGER: Counter = Counter()


@dataclass
class Lab:
    milterd: object
    postfix: object
    metrics_port: int
    port4: int           # Postfix's IPv4 listener (127.0.0.1); postfix.port is the [::1] one
    certs: dict


def _config(c: dict) -> str:
    def table(domain: str, **terms: str) -> str:
        body = "".join(f"{k} = {v}\n" for k, v in terms.items())
        return f'[partners."{domain}"]\nreceive = true\n{body}'

    return "\n".join([
        '[domain_security]\nmode = "enforce"\n',
        # 1. hosted partner: only woodgrovebank.test accepts the hoster's certificate name
        table("woodgrovebank.test", certificate_names='["mx.hoster.test"]'),
        table("fabrikam.test"),
        table("tailspin.test", certificate_names='[".hoster.test"]'),
        # 2. per-partner mode
        table("adatum.test", mode='"report"'),
        table("litware.test", mode='"enforce"'),
        # 3. client networks
        table("northwind.test", client_networks='["192.0.2.0/24"]'),
        table("tailspintoys.test", client_networks='["127.0.0.0/8"]'),
        table("wingtiptoys.test", client_networks='["::1/128"]'),
        # 4. pins
        table("proseware.test", pins=f'["key-sha256:{c["proseware"].pubkey_sha256}"]'),
        table("fourthcoffee.test", pins=f'["cert-sha256:{c["fourthcoffee"].sha256}"]'),
        # 5. per-partner TLS minimum (the global one stays TLSv1.2)
        table("cohowinery.test", min_version='"TLSv1.3"'),
        table("lucernepublishing.test"),
    ])


def _certs(pki) -> dict:
    """Every client certificate the scenarios present (stems prefixed: the PKI is shared)."""
    c = {
        "hoster": pki.issue("p15-hoster", "mx.hoster.test"),
        "hoster-impostor": pki.issue("p15-hoster-selfsigned", "mx.hoster.test", org="Evil",
                                     self_signed=True),
        "proseware": pki.issue("p15-proseware", "mail.proseware.test", org="Proseware",
                               self_signed=True),
        "fourthcoffee": pki.issue("p15-fourthcoffee", "mail.fourthcoffee.test",
                                  org="Fourth Coffee", self_signed=True),
    }
    # renewals: same key (same public-key pin, new certificate pin), and a re-key
    c["proseware-renewed"] = pki.issue("p15-proseware-renewed", "mail.proseware.test",
                                       org="Proseware", self_signed=True,
                                       key=c["proseware"].key)
    c["proseware-rekeyed"] = pki.issue("p15-proseware-rekeyed", "mail.proseware.test",
                                       org="Proseware", self_signed=True)
    c["fourthcoffee-renewed"] = pki.issue("p15-fourthcoffee-renewed", "mail.fourthcoffee.test",
                                          org="Fourth Coffee", self_signed=True,
                                          key=c["fourthcoffee"].key)
    for d in ("northwind", "tailspintoys", "wingtiptoys", "cohowinery", "lucernepublishing"):
        c[d] = pki.issue(f"p15-{d}", f"mail.{d}.test")
    return c


def _dual_stack_postfix_class():
    from milterd.lab.postfix import PostfixLab

    class DualStackPostfix(PostfixLab):
        """The lab on [::1] (both protocols on) plus a second smtpd listener on 127.0.0.1."""

        port4: int = 0

        def write_config(self) -> None:
            super().write_config()
            master = self.conf / "master.cf"
            master.write_text(master.read_text() +
                              f"{V4}:{self.port4} inet n - n - - smtpd\n")

    return DualStackPostfix


@pytest.fixture(scope="module")
def lab(partners):
    from milterd.lab.postfix import PostfixTLS

    certs = _certs(partners.pki)
    root = make_lab_dir("milterd-partners-")
    factory = MilterdFactory(root)
    pf = None
    try:
        metrics_port = free_port()
        policy_sock = root / "policy.sock"
        m = factory(_config(certs) + f'[policy]\nlisten = "unix:{policy_sock}"\n'
                    f'[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n')
        assert wait_for_unix_socket(policy_sock, timeout=15), m.log_tail()
        pf = _dual_stack_postfix_class()(
            milter_socket=m.socket_spec,
            tls=PostfixTLS(partners.server.cert_path, partners.server.key_path,
                           partners.pki.ca_path),
            policy_service=f"unix:{policy_sock}", listen_address=V6)
        pf.port4 = free_port()
        pf.start_verified()
        wait_until(lambda: bool(pf.master_pid()) and pid_listens(pf.master_pid(), V4, pf.port4),
                   15, lambda: f"Postfix's master on {V4}:{pf.port4}{pf.log_tail()}")
        yield Lab(m, pf, metrics_port, pf.port4, certs)
    finally:
        if pf is not None:
            pf.cleanup()
        factory.close()


def _tls(partners, cert, *, tls12: bool = False) -> ssl.SSLContext:
    return client_context(partners.pki.ca_path, cert.cert_path, cert.key_path,
                          max_version=ssl.TLSVersion.TLSv1_2 if tls12 else None)


def _stamp(msg) -> dict:
    stamps = msg.get_all("X-Milterd-TLS") or []
    assert len(stamps) == 1, stamps
    return parse_stamp(str(stamps[0]))


def mail(lab, partners, subject: str, *, domain: str, cert=None, tls12: bool = False,
         host: str = V4, from_domain: str | None = None, expect: str, reason: str | None = None,
         match: str | None = None, counted: str | None = None) -> dict | None:
    """Send one message from ``alice@<domain>`` (``From:`` at ``from_domain`` if given), with
    ``cert`` over STARTTLS (None: no TLS), from ``host``; assert the outcome ``expect``:

    * ``pass`` — delivered, stamped domain-secure=pass, partner=domain, match=``match``;
    * ``refused`` — 5xx whose reply names ``reason``, not delivered;
    * ``report`` — delivered, stamped domain-secure=fail with ``reason``, no match.

    ``counted`` is the partner the counters must charge (default ``domain``).  Returns the stamp.
    """
    counted = counted or domain
    if expect == "pass":
        LEDGER["pass", counted] += 1
        LEDGER["verdict", "accept"] += 1
    else:
        LEDGER["fail", counted, reason] += 1
        LEDGER["verdict", "reject" if expect == "refused" else "accept"] += 1
    sender = f"alice@{domain}"
    from_header = f"Alice <alice@{from_domain}>" if from_domain else None
    data = make_message(sender, RCPT, subject, from_header=from_header)
    port = lab.port4 if host == V4 else lab.postfix.port
    tls = _tls(partners, cert, tls12=tls12) if cert is not None else None
    result = send(port, sender, [RCPT], data, host=host, tls=tls)

    if expect == "refused":
        assert result.reply_class == "5xx", (subject, result)
        assert reason_from_reply(result.text) == reason, (subject, result.text)
        assert f"Domain Security: mail from {counted} " in result.text, (subject, result.text)
        assert all(d["Subject"] != subject for d in lab.postfix.delivered()), subject
        return None
    assert result.accepted, (subject, result)
    msg = delivered_with_subject(lab.postfix, subject)
    assert msg is not None, f"{subject} accepted but not delivered{lab.postfix.log_tail()}"
    stamp = _stamp(msg)
    assert stamp.get("domain") == counted and stamp.get("partner") == counted, (subject, stamp)
    if expect == "pass":
        assert stamp["domain-secure"] == "pass", (subject, stamp)
        assert stamp.get("match") == match and "reason" not in stamp, (subject, stamp)
    else:
        assert expect == "report", expect
        assert stamp["domain-secure"] == "fail", (subject, stamp)
        assert stamp.get("reason") == reason and "match" not in stamp, (subject, stamp)
    return stamp


# -- 1. hosted partner: certificate_names ---------------------------------------------------------

def test_hosted_partner_certificate_names(lab, partners):
    hoster, impostor = lab.certs["hoster"], lab.certs["hoster-impostor"]
    # the hoster's trusted certificate speaks for the partner that names it ...
    stamp = mail(lab, partners, "hosted/woodgrove", domain="woodgrovebank.test", cert=hoster,
                 expect="pass", match="certificate_name")
    assert stamp["verify"] == "ok" and stamp["subject"].endswith("mx.hoster.test"), stamp
    # ... and for one that names its parent (".hoster.test": any host under it)
    mail(lab, partners, "hosted/tailspin-dot-entry", domain="tailspin.test", cert=hoster,
         expect="pass", match="certificate_name")
    # the same certificate claiming a partner without that term: the name does not match
    mail(lab, partners, "hosted/fabrikam", domain="fabrikam.test", cert=hoster,
         expect="refused", reason="name_mismatch")
    # a self-signed impostor with the hoster's CN: not trusted, and nothing is pinned
    mail(lab, partners, "hosted/impostor", domain="woodgrovebank.test", cert=impostor,
         expect="refused", reason="no_trusted_cert")


# -- 2. per-partner mode in one daemon ------------------------------------------------------------

def test_report_and_enforce_partners_in_one_daemon(lab, partners):
    stamp = mail(lab, partners, "mode/report-no-tls", domain="adatum.test", expect="report",
                 reason="no_tls")
    assert stamp["tls"] == "none", stamp
    mail(lab, partners, "mode/enforce-no-tls", domain="litware.test", expect="refused",
         reason="no_tls")
    # a message covered by both (envelope: the report partner, From: the enforce partner):
    # the enforce partner's failure wins, at end of data
    mail(lab, partners, "mode/both-no-tls", domain="adatum.test", from_domain="litware.test",
         expect="refused", reason="no_tls", counted="litware.test")


# -- 3. client networks ---------------------------------------------------------------------------

def test_client_networks_ipv4(lab, partners):
    c = lab.certs
    mail(lab, partners, "net/v4-outside", domain="northwind.test", cert=c["northwind"],
         expect="refused", reason="client_network")
    mail(lab, partners, "net/v4-inside", domain="tailspintoys.test", cert=c["tailspintoys"],
         expect="pass", match="domain")
    mail(lab, partners, "net/v4-v6-only-partner", domain="wingtiptoys.test",
         cert=c["wingtiptoys"], expect="refused", reason="client_network")


def test_client_networks_ipv6(lab, partners):
    c = lab.certs
    mail(lab, partners, "net/v6-inside", domain="wingtiptoys.test", cert=c["wingtiptoys"],
         host=V6, expect="pass", match="domain")
    mail(lab, partners, "net/v6-v4-only-partner", domain="tailspintoys.test",
         cert=c["tailspintoys"], host=V6, expect="refused", reason="client_network")
    mail(lab, partners, "net/v6-outside", domain="northwind.test", cert=c["northwind"],
         host=V6, expect="refused", reason="client_network")
    # Postfix really saw these three clients on [::1]
    v6_connects = [line for line in lab.postfix.log_text().splitlines()
                   if "postfix/smtpd" in line and " connect from " in line
                   and f"[{V6}]" in line]
    assert len(v6_connects) >= 3, lab.postfix.log_tail()


# -- 4. pins: key pins survive a same-key renewal, certificate pins do not ------------------------

def test_key_pin_survives_renewal_not_rekey(lab, partners):
    a, renewed, rekeyed = (lab.certs[k] for k in
                           ("proseware", "proseware-renewed", "proseware-rekeyed"))
    assert renewed.pubkey_sha256 == a.pubkey_sha256 and renewed.sha256 != a.sha256
    assert rekeyed.pubkey_sha256 != a.pubkey_sha256
    mail(lab, partners, "pin/key-original", domain="proseware.test", cert=a,
         expect="pass", match="key_pin")
    mail(lab, partners, "pin/key-renewed", domain="proseware.test", cert=renewed,
         expect="pass", match="key_pin")
    mail(lab, partners, "pin/key-rekeyed", domain="proseware.test", cert=rekeyed,
         expect="refused", reason="pin_mismatch")


def test_cert_pin_does_not_survive_renewal(lab, partners):
    c, renewed = lab.certs["fourthcoffee"], lab.certs["fourthcoffee-renewed"]
    assert renewed.pubkey_sha256 == c.pubkey_sha256 and renewed.sha256 != c.sha256
    mail(lab, partners, "pin/cert-original", domain="fourthcoffee.test", cert=c,
         expect="pass", match="cert_pin")
    mail(lab, partners, "pin/cert-renewed", domain="fourthcoffee.test", cert=renewed,
         expect="refused", reason="pin_mismatch")


# -- 5. per-partner TLS minimum -------------------------------------------------------------------

def test_per_partner_tls_minimum(lab, partners):
    c = lab.certs
    mail(lab, partners, "tls/min13-over-12", domain="cohowinery.test", cert=c["cohowinery"],
         tls12=True, expect="refused", reason="tls_version")
    stamp = mail(lab, partners, "tls/min13-over-13", domain="cohowinery.test",
                 cert=c["cohowinery"], expect="pass", match="domain")
    assert stamp["tls"] == "TLSv1.3", stamp
    stamp = mail(lab, partners, "tls/default-over-12", domain="lucernepublishing.test",
                 cert=c["lucernepublishing"], tls12=True, expect="pass", match="domain")
    assert stamp["tls"] == "TLSv1.2", stamp


# -- 6. counters, exactly per partner (runs last) -------------------------------------------------

def test_counters_exact_per_partner(lab):
    assert LEDGER, "no scenario ran before the counters test"
    metrics = scrape(lab.metrics_port)

    def family(name: str) -> dict[str, float]:
        return {k: v for k, v in metrics.items()
                if (k.split("{", 1)[0] == name) and v}

    expected_failures = {
        f'milterd_domain_security_failures_total{{domain="{k[1]}",reason="{k[2]}"}}': float(n)
        for k, n in LEDGER.items() if k[0] == "fail"}
    expected_passes = {
        f'milterd_domain_secured_messages_received_total{{domain="{k[1]}"}}': float(n)
        for k, n in LEDGER.items() if k[0] == "pass"}
    expected_verdicts = {f'milterd_messages_total{{verdict="{k[1]}"}}': float(n)
                         for k, n in LEDGER.items() if k[0] == "verdict"}
    assert family("milterd_domain_security_failures_total") == expected_failures
    assert family("milterd_domain_secured_messages_received_total") == expected_passes
    assert family("milterd_messages_total") == expected_verdicts
