"""Probe milter for the Sendmail lab tests (run as a subprocess, not imported by pytest).

Records, per callback, the macros Sendmail sent as one JSON line:
    {"stage": "envfrom", "conn": 3, "args": [...], "macros": {"{verify}": "OK", ...}}
Only macros that are present are recorded (absent = not sent; "" = sent empty).
Relies on Sendmail's configured macro lists (contrib/sendmail/milterd.mc); it does not call
setsymlist, so what it sees is exactly what that configuration delivers.

    python sendmail_probe_milter.py --socket unix:/path/milter.sock --out events.jsonl \
        [--reject-sender bad@example.test]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading

import Milter

MACROS = [
    "j", "_", "i", "{daemon_name}", "{daemon_addr}", "{daemon_port}", "{if_name}", "{if_addr}",
    "{client_addr}", "{client_port}", "{client_name}", "{client_ptr}", "{client_resolve}",
    "{verify}", "{cert_subject}", "{cert_issuer}", "{cn_subject}", "{cn_issuer}",
    "{tls_version}", "{cipher}", "{cipher_bits}", "{cert_fp}", "{cert_md5}",
    "{auth_type}", "{auth_authen}", "{auth_ssf}", "{auth_author}",
    "{mail_mailer}", "{mail_host}", "{mail_addr}", "{rcpt_mailer}", "{rcpt_host}", "{rcpt_addr}",
    "{msg_id}", "{s}",
]

_lock = threading.Lock()
_counter = itertools.count(1)
_out = None
_reject: set[str] = set()


def _record(stage: str, conn: int, macros: dict, args: list) -> None:
    line = json.dumps({"stage": stage, "conn": conn, "args": args, "macros": macros})
    with _lock:
        _out.write(line + "\n")
        _out.flush()


class Probe(Milter.Base):
    def __init__(self) -> None:
        self.conn = next(_counter)

    def _macros(self) -> dict:
        seen = {}
        for name in MACROS:
            v = self.getsymval(name)
            if v is not None:
                seen[name] = v
        return seen

    def connect(self, hostname, family, hostaddr):
        _record("connect", self.conn, self._macros(), [hostname, str(hostaddr)])
        return Milter.CONTINUE

    def hello(self, heloname):
        _record("helo", self.conn, self._macros(), [heloname])
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        _record("envfrom", self.conn, self._macros(), [mailfrom, *params])
        if mailfrom.strip("<>").lower() in _reject:
            self.setreply("550", "5.7.1", "rejected by probe milter")
            return Milter.REJECT
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        _record("envrcpt", self.conn, self._macros(), [rcpt, *params])
        return Milter.CONTINUE

    def eom(self):
        _record("eom", self.conn, self._macros(), [])
        return Milter.ACCEPT


def main() -> int:
    global _out
    ap = argparse.ArgumentParser()
    ap.add_argument("--socket", required=True, help="unix:/path or inet:port@host")
    ap.add_argument("--out", required=True)
    ap.add_argument("--reject-sender", action="append", default=[])
    ap.add_argument("--timeout", type=int, default=30)
    a = ap.parse_args()
    _reject.update(s.lower() for s in a.reject_sender)
    _out = open(a.out, "a", encoding="utf-8")
    os.umask(0o077)  # sendmail connects to the milter as root; nobody else needs the socket
    Milter.factory = Probe
    print(f"probe milter pid {os.getpid()} on {a.socket}", file=sys.stderr, flush=True)
    Milter.runmilter("probe", a.socket, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
