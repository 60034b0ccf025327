"""Writes each transaction's TLS facts as a JSON line to $MILTERD_TEST_RECORD (at MAIL FROM)."""

import json
import os

from milterd.hookspecs import hookimpl


@hookimpl
def milterd_mail_from(connection, message):
    t = connection.tls
    with open(os.environ["MILTERD_TEST_RECORD"], "a") as f:
        f.write(json.dumps({
            "sender": message.sender, "helo": connection.helo,
            "client_address": connection.client_address, "client_port": connection.client_port,
            "version": t.version, "cipher": t.cipher, "bits": t.bits, "verify": t.verify.value,
            "subject_cn": t.subject_cn, "subject_dn": t.subject_dn, "issuer": t.issuer,
            "fingerprint": t.fingerprint_sha256, "dialect": t.dialect,
        }) + "\n")
    return None
