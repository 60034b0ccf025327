"""The same Domain Security table as the Postfix tests, through a real Sendmail and through the
reference pure-Python MTA (both speak Sendmail's macro dialect: {verify}, DNs, {cert_fp})."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterd.lab.smtp import make_message, send

from support import MilterdFactory, make_lab_dir
from ds_table import (ROWS, ReferenceMtaLab, check_row, client_tls, delivered_with_subject,
                      ds_config)

RCPT = "user@contoso.test"


class _Sendmail:
    def __init__(self, partners, milter_spec: str, base: Path):
        from sendmail_lab import SendmailLab, ensure_provisioned

        ensure_provisioned()
        self.lab = SendmailLab(base / "sendmail", milter_socket=milter_spec,
                               ca_cert=partners.pki.ca_path,
                               server_cert=partners.server.cert_path,
                               server_key=partners.server.key_path,
                               local_domains=["contoso.test"])
        self.lab.start()
        self.port = self.lab.port

    def delivered(self):
        return self.lab.delivered()

    def stop(self):
        self.lab.stop()




MTAS = {"sendmail": _Sendmail, "reference-mta": ReferenceMtaLab}


@pytest.fixture(scope="module", params=list(MTAS))
def parity_lab(request, partners):
    base = make_lab_dir("milterd-parity-")
    factory = MilterdFactory(base)
    m = factory(ds_config(partners), name="m")
    mta = MTAS[request.param](partners, m.socket_spec, base)
    yield request.param, m, mta
    mta.stop()
    factory.stop_all()


@pytest.mark.sendmail
@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_domain_security_table(parity_lab, partners, row):
    kind, m, mta = parity_lab
    subject = f"{kind}:{row.name}"
    data = make_message(row.sender, RCPT, subject, from_header=row.from_header)
    result = send(mta.port, row.sender, [RCPT], data, tls=client_tls(partners, row.client))
    msg = delivered_with_subject(mta, subject) if result.accepted else None
    check_row(row, result, msg)


@pytest.mark.sendmail
def test_milterd_down_tempfails(parity_lab):
    kind, m, mta = parity_lab
    m.stop()
    r = send(mta.port, "a@fabrikam.test", [RCPT], make_message("a@fabrikam.test", RCPT, "down"))
    assert r.reply_class == "4xx", r
    assert all(d["Subject"] != "down" for d in mta.delivered())
