"""A real pymilter milter for the reference-MTA tests (run as a subprocess).

Usage: python mta_testmilter.py SOCKETSPEC EVENTS.jsonl [--symlist]

* MAIL FROM containing "reject@" -> 550 5.7.1 via setreply (SMFIR_REPLYCODE);
  "tempfail@" -> 451 4.7.1; "discard@" -> DISCARD; "quarantine" -> quarantine at EOM.
* At end of message: adds X-Test-Added, inserts X-Test-Top at index 0,
  changes Subject, deletes X-Delete-Me, and records what it saw.
* Every callback's macros are appended as one JSON line to EVENTS.jsonl so
  tests can assert what the MTA sent (Sendmail's TLS macros in particular).

Subclasses Milter.Base (only the callbacks defined here are negotiated; body
stays off, so the MTA must honour SMFIP_NOBODY). The module is not called
milter.py: that would shadow pymilter's C module.
"""

import json
import sys
import threading

import Milter

MACROS = ("j", "_", "i", "{daemon_name}", "{client_addr}", "{client_port}", "{client_name}",
          "{tls_version}", "{cipher}", "{cipher_bits}", "{verify}", "{cert_subject}",
          "{cert_issuer}", "{cn_subject}", "{cn_issuer}", "{cert_fp}", "{mail_addr}",
          "{rcpt_addr}")

SOCKET, EVENTS = sys.argv[1], sys.argv[2]
SYMLIST = "--symlist" in sys.argv[3:]
_lock = threading.Lock()


def record(**event):
    with _lock, open(EVENTS, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(event) + "\n")


class TestMilter(Milter.Base):
    def __init__(self):
        self.headers = []
        self.sender = ""

    def negotiate(self, opts):
        rc = super().negotiate(opts)
        if SYMLIST:
            # pymilter's setsymlist() is broken on Python 3; the ctx call works.
            self._ctx.setsymlist(Milter.M_ENVFROM, "{verify} {cert_fp}")
        return rc

    def macros(self):
        return {m: self.getsymval(m) for m in MACROS if self.getsymval(m) is not None}

    def connect(self, hostname, family, hostaddr):
        record(stage="connect", hostname=hostname, hostaddr=list(hostaddr) if hostaddr else None,
               macros=self.macros())
        return Milter.CONTINUE

    def hello(self, hostname):
        record(stage="helo", helo=hostname, macros=self.macros())
        return Milter.CONTINUE

    def envfrom(self, mailfrom, *params):
        self.sender = mailfrom
        self.headers = []
        record(stage="mail", sender=mailfrom, macros=self.macros())
        if "reject@" in mailfrom:
            self.setreply("550", "5.7.1", "Sender %s rejected by test milter" % mailfrom)
            return Milter.REJECT
        if "discard@" in mailfrom:
            return Milter.DISCARD
        if "tempfail@" in mailfrom:
            self.setreply("451", "4.7.1", "Try again later, says the test milter")
            return Milter.TEMPFAIL
        return Milter.CONTINUE

    def envrcpt(self, rcpt, *params):
        record(stage="rcpt", rcpt=rcpt, macros=self.macros())
        if "norcpt@" in rcpt:
            self.setreply("550", "5.1.1", "No such user here")
            return Milter.REJECT
        return Milter.CONTINUE

    @Milter.noreply
    def header(self, name, value):
        self.headers.append([name, value])
        return Milter.CONTINUE

    def eoh(self):
        return Milter.CONTINUE

    def eom(self):
        record(stage="eom", sender=self.sender, headers=self.headers, macros=self.macros())
        self.addheader("X-Test-Added", "yes")
        self.addheader("X-Test-Top", "inserted", 0)
        self.chgheader("Subject", 1, "changed by milter")
        self.chgheader("X-Delete-Me", 1, None)
        if "quarantine" in self.sender:
            self.quarantine("test quarantine")
        return Milter.ACCEPT

    def abort(self):
        record(stage="abort")
        return Milter.CONTINUE

    def close(self):
        return Milter.CONTINUE


def main():
    Milter.factory = TestMilter
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.QUARANTINE | Milter.SETSYMLIST)
    Milter.runmilter("mtatest", SOCKET, 30)


if __name__ == "__main__":
    main()
