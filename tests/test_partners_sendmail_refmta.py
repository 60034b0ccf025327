"""Per-partner terms (issue #15) end to end, through the reference MTA and through a real Sendmail.

One milterd serves both MTAs with one ``[partners."…"]`` config (:func:`partner_config`):

=====================  ==============================================================
partner                terms
=====================  ==============================================================
woodgrovebank.test     hosted at mx.hoster.test: ``certificate_names``; default TLS minimum
fabrikam.test          defaults only (the global enforce mode), no certificate names
tailspin.test          ``mode = "report"``
litware.test           ``mode = "enforce"``
adatum.test            ``pins = ["key-sha256:…"]`` only (Direct Trust on the public key)
northwind.test         ``pins = ["cert-sha256:…"]`` only (Direct Trust on the certificate)
fourthcoffee.test      ``min_version = "TLSv1.3"``
=====================  ==============================================================

The outcome is read where an operator sees it: the SMTP reply (class and ``(reason)``) for a
refusal, the delivered message's X-Milterd-TLS trace header (``domain-secure``, ``reason``,
``partner``, ``match``) for a delivery.

Sendmail has no macro for the client certificate's public-key fingerprint (the reference MTA
sends milterd's own ``{cert_pubkey_fp}``), so the same self-signed certificate that a key pin lets
through the reference MTA must be refused through Sendmail with ``pin_mismatch``: what the MTA
cannot tell milterd is never silently accepted (the limitation is documented by
:func:`test_pins_and_rotation`).
"""

from __future__ import annotations

import ssl
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from milterd.lab.pki import Issued
from milterd.lab.smtp import SendResult, client_context, make_message, send
from milterd.policy.stamp import parse_stamp

from ds_table import ReferenceMtaLab, delivered_with_subject, reason_from_reply
from support import MilterdFactory, make_lab_dir

RCPT = "user@contoso.test"
HEADER = "X-Milterd-TLS"
HOSTER = "mx.hoster.test"


# ---------------------------------------------------------------------------- certificates
@pytest.fixture(scope="module")
def certs(partners) -> SimpleNamespace:
    """This module's client certificates, from the session's test CA (stems prefixed p15-)."""
    pki = partners.pki
    adatum = pki.issue("p15-adatum", "mail.adatum.test", org="Adatum Direct", self_signed=True)
    northwind = pki.issue("p15-northwind", "mail.northwind.test", org="Northwind Direct",
                          self_signed=True)
    return SimpleNamespace(
        # the hoster's trusted certificate, and an impostor's self-signed one with its name
        hoster=pki.issue("p15-hoster", HOSTER),
        hoster_impostor=pki.issue("p15-hoster-impostor", HOSTER, org="Evil", self_signed=True),
        woodgrove=partners.partner,  # trusted, CN mail.woodgrovebank.test
        fourthcoffee=pki.issue("p15-fourthcoffee", "mail.fourthcoffee.test"),
        # Direct Trust partners: the pinned certificate, a renewal with the same key (new
        # certificate pin, same key pin) and a re-key (both pins change)
        adatum=adatum,
        adatum_renewed=pki.issue("p15-adatum-renewed", "mail.adatum.test", org="Adatum Direct",
                                 self_signed=True, key=adatum.key),
        adatum_rekeyed=pki.issue("p15-adatum-rekeyed", "mail.adatum.test", org="Adatum Direct",
                                 self_signed=True),
        northwind=northwind,
        northwind_renewed=pki.issue("p15-northwind-renewed", "mail.northwind.test",
                                    org="Northwind Direct", self_signed=True,
                                    key=northwind.key),
    )


def partner_config(certs: SimpleNamespace) -> str:
    return f"""
[domain_security]
mode = "enforce"
[tls]
min_version = "TLSv1.2"

[partners."woodgrovebank.test"]
receive = true
certificate_names = ["{HOSTER}"]

[partners."fabrikam.test"]
receive = true

[partners."tailspin.test"]
receive = true
mode = "report"

[partners."litware.test"]
receive = true
mode = "enforce"

[partners."adatum.test"]
receive = true
pins = ["key-sha256:{certs.adatum.pubkey_sha256}"]

[partners."northwind.test"]
receive = true
pins = ["cert-sha256:{certs.northwind.sha256}"]

[partners."fourthcoffee.test"]
receive = true
min_version = "TLSv1.3"
"""


def test_pin_fixtures_are_what_the_rotation_cases_claim(certs):
    """The premises of the pin cases: a same-key renewal keeps the key pin and changes the
    certificate pin; a re-key changes both (else the rotation cases would prove nothing)."""
    assert certs.adatum_renewed.pubkey_sha256 == certs.adatum.pubkey_sha256
    assert certs.adatum_renewed.sha256 != certs.adatum.sha256
    assert certs.adatum_rekeyed.pubkey_sha256 != certs.adatum.pubkey_sha256
    assert certs.northwind_renewed.sha256 != certs.northwind.sha256
    assert certs.northwind_renewed.pubkey_sha256 == certs.northwind.pubkey_sha256


# ------------------------------------------------------------------------------------ labs
@pytest.fixture(scope="module")
def lab_base() -> SimpleNamespace:
    return SimpleNamespace(path=make_lab_dir("milterd-p15-"))


@pytest.fixture(scope="module")
def milterd(lab_base, certs):
    """One milterd with every partner of the module; both MTAs use it."""
    factory = MilterdFactory(lab_base.path)
    m = factory(partner_config(certs), name="m")
    yield m
    factory.close()  # stops it, removes the lab directory, fails on tracebacks in its log




class _Sendmail:
    kind = "sendmail"

    def __init__(self, partners, milter_spec: str, base: Path):
        from sendmail_lab import SendmailLab, ensure_provisioned

        ensure_provisioned()  # fails (never skips) when Sendmail cannot be provisioned
        self.lab = SendmailLab(base / "sendmail", milter_socket=milter_spec,
                               ca_cert=partners.pki.ca_path,
                               server_cert=partners.server.cert_path,
                               server_key=partners.server.key_path,
                               local_domains=["contoso.test"])
        self.lab.start()  # returns once the daemon's own PID holds the listening socket
        self.port = self.lab.port

    def delivered(self):
        return self.lab.delivered()

    def stop(self):
        self.lab.stop()


@pytest.fixture(scope="module")
def refmta(partners, milterd, lab_base):
    mta = ReferenceMtaLab(partners, milterd.socket_spec, lab_base.path / "refmta")
    yield mta
    mta.stop()


@pytest.fixture(scope="module")
def sendmail(partners, milterd, lab_base):
    mta = _Sendmail(partners, milterd.socket_spec, lab_base.path)
    yield mta
    mta.stop()


@pytest.fixture(scope="module", params=["reference-mta",
                                        pytest.param("sendmail", marks=pytest.mark.sendmail)])
def mta(request):
    """Each MTA in turn (both are module-scoped: started once, shared with the single-MTA
    tests)."""
    return request.getfixturevalue("refmta" if request.param == "reference-mta" else "sendmail")


# --------------------------------------------------------------------------------- helpers
def transact(mta, certs, partners, sender: str, client: Issued | None, *,
             from_header: str | None = None, tls12: bool = False):
    """One message over STARTTLS with ``client``'s certificate; (reply, delivered message)."""
    subject = f"{mta.kind}:{sender}:{uuid.uuid4().hex[:10]}"
    tls = client_context(partners.pki.ca_path,
                         client.cert_path if client else None,
                         client.key_path if client else None,
                         max_version=ssl.TLSVersion.TLSv1_2 if tls12 else None)
    data = make_message(sender, RCPT, subject, from_header=from_header)
    result = send(mta.port, sender, [RCPT], data, tls=tls)
    msg = delivered_with_subject(mta, subject) if result.accepted else None
    if msg is None:  # refused, or accepted and lost: either way nothing may sit in the mailbox
        assert all(m["Subject"] != subject for m in mta.delivered()), (subject, result)
    return result, msg


def stamp_of(msg) -> dict[str, str]:
    stamps = msg.get_all(HEADER) or []
    assert len(stamps) == 1, stamps
    return parse_stamp(str(stamps[0]))


def assert_passed(result: SendResult, msg, partner: str, match: str) -> dict[str, str]:
    assert result.accepted, result
    assert msg is not None, f"accepted but not delivered: {result}"
    stamp = stamp_of(msg)
    assert stamp["domain-secure"] == "pass", stamp
    assert stamp["partner"] == partner, stamp
    assert stamp["domain"] == partner.lstrip("."), stamp
    assert stamp["match"] == match, stamp
    assert "reason" not in stamp, stamp
    return stamp


def assert_refused(result: SendResult, msg, partner: str, reason: str, *,
                   stage: str = "mail") -> None:
    assert msg is None, msg
    assert result.reply_class == "5xx", result
    assert result.stage == stage, result
    assert reason_from_reply(result.text) == reason, result.text
    assert f"mail from {partner}" in result.text, result.text  # whose terms refused


# ------------------------------------------------------------------------------------ tests
HOSTED_CASES = [
    # (id, sender domain, client certificate attribute, expected)
    ("own-cert/partner-domain", "woodgrovebank.test", "woodgrove", ("pass", "domain")),
    ("hoster-cert/partner-with-certificate-name", "woodgrovebank.test", "hoster",
     ("pass", "certificate_name")),
    ("hoster-cert/partner-without-it", "fabrikam.test", "hoster", ("refuse", "name_mismatch")),
    ("self-signed-hoster-impostor", "woodgrovebank.test", "hoster_impostor",
     ("refuse", "no_trusted_cert")),
]


@pytest.mark.parametrize("case", HOSTED_CASES, ids=[c[0] for c in HOSTED_CASES])
def test_hosted_partner_certificate_names(mta, certs, partners, case):
    """A trusted certificate for the hoster's name (mx.hoster.test) passes for the partner whose
    ``certificate_names`` list it (``match=certificate_name``) and only for that partner; a
    self-signed certificate with the same name passes for nobody; the partner's own certificate
    still passes by the domain (``match=domain``)."""
    _, domain, client, (outcome, detail) = case
    result, msg = transact(mta, certs, partners, f"alice@{domain}", getattr(certs, client))
    if outcome == "pass":
        stamp = assert_passed(result, msg, domain, detail)
        assert stamp["verify"] == "ok", stamp
    else:
        assert_refused(result, msg, domain, detail)


def test_report_and_enforce_partners_in_one_daemon(mta, certs, partners):
    """The same failure (a trusted certificate naming neither partner) is delivered and stamped
    for the report partner and refused for the enforce partner; a message covered by both (the
    report partner's envelope, the enforce partner's From:) is refused: a report partner never
    masks an enforce partner's failure."""
    result, msg = transact(mta, certs, partners, "alice@tailspin.test", certs.hoster)
    assert result.accepted, result
    assert msg is not None, result
    stamp = stamp_of(msg)
    assert stamp["domain-secure"] == "fail", stamp
    assert stamp["reason"] == "name_mismatch", stamp
    assert stamp["partner"] == "tailspin.test", stamp
    assert "match" not in stamp, stamp

    result, msg = transact(mta, certs, partners, "alice@litware.test", certs.hoster)
    assert_refused(result, msg, "litware.test", "name_mismatch")

    result, msg = transact(mta, certs, partners, "alice@tailspin.test", certs.hoster,
                           from_header="CEO <ceo@litware.test>")
    # the envelope (report) passes MAIL FROM; the From: field (enforce) refuses at end of data
    assert_refused(result, msg, "litware.test", "name_mismatch", stage="data")


# (partner, client certificate attribute) -> expected outcome per MTA.  Sendmail cannot give a
# key fingerprint: key pins never match there (fail closed), certificate pins do ({cert_fp}).
PIN_CASES = [
    ("key-pin/pinned", "adatum.test", "adatum",
     {"reference-mta": ("pass", "key_pin"), "sendmail": ("refuse", "pin_mismatch")}),
    ("key-pin/same-key-renewal", "adatum.test", "adatum_renewed",
     {"reference-mta": ("pass", "key_pin"), "sendmail": ("refuse", "pin_mismatch")}),
    ("key-pin/re-keyed", "adatum.test", "adatum_rekeyed",
     {"reference-mta": ("refuse", "pin_mismatch"), "sendmail": ("refuse", "pin_mismatch")}),
    ("cert-pin/pinned", "northwind.test", "northwind",
     {"reference-mta": ("pass", "cert_pin"), "sendmail": ("pass", "cert_pin")}),
    ("cert-pin/same-key-renewal", "northwind.test", "northwind_renewed",
     {"reference-mta": ("refuse", "pin_mismatch"), "sendmail": ("refuse", "pin_mismatch")}),
]


@pytest.mark.parametrize("case", PIN_CASES, ids=[c[0] for c in PIN_CASES])
def test_pins_and_rotation(mta, certs, partners, case):
    """Direct Trust per partner with self-signed certificates.  Reference MTA: a key pin passes
    (``match=key_pin``) and survives a same-key renewal, a re-key fails (``pin_mismatch``); a
    certificate pin passes (``match=cert_pin``) and a renewal breaks it.  Sendmail: the certificate
    pin works the same, and the key-pinned-only partner is REFUSED with ``pin_mismatch`` even for
    the exact pinned certificate (Sendmail has no public-key macro; the limitation fails closed)."""
    _, domain, client, expected = case
    outcome, detail = expected[mta.kind]
    result, msg = transact(mta, certs, partners, f"alice@{domain}", getattr(certs, client))
    if outcome == "pass":
        stamp = assert_passed(result, msg, domain, detail)
        assert stamp["verify"] == "fail", stamp  # self-signed: the pin alone let it through
    else:
        assert_refused(result, msg, domain, detail)


def test_per_partner_min_version(mta, certs, partners):
    """``min_version = "TLSv1.3"`` for one partner refuses its TLS 1.2 session
    (``tls_version``) and passes its TLS 1.3 one, while a partner on the global default
    (TLSv1.2) passes over TLS 1.2 in the same daemon."""
    result, msg = transact(mta, certs, partners, "alice@fourthcoffee.test", certs.fourthcoffee,
                           tls12=True)
    assert_refused(result, msg, "fourthcoffee.test", "tls_version")

    result, msg = transact(mta, certs, partners, "alice@fourthcoffee.test", certs.fourthcoffee)
    stamp = assert_passed(result, msg, "fourthcoffee.test", "domain")
    assert stamp["tls"] == "TLSv1.3", stamp

    result, msg = transact(mta, certs, partners, "alice@woodgrovebank.test", certs.woodgrove,
                           tls12=True)
    stamp = assert_passed(result, msg, "woodgrovebank.test", "domain")
    assert stamp["tls"] == "TLSv1.2", stamp
