"""A reference pure-Python MTA for tests and demos of milterd.

It plays the part Postfix or Sendmail plays in production, on loopback and
without root: an ESMTP server with STARTTLS and client certificates
(:mod:`.server`, on aiosmtpd), a milter protocol v6 client that speaks to a
milter exactly as an MTA does (:mod:`.milter_client`, :mod:`.milter_codec`),
the message and its header edits (:mod:`.message`), a durable queue
(:mod:`.queue`), Maildir delivery and SMTP relay with a
Domain Security send policy (:mod:`.delivery`), and an Exchange-style
protocol log (:mod:`.protocol_log`). TLS macros follow Sendmail's dialect
(``{verify}``, ``{cert_subject}``, ``{cn_subject}``, ``{cert_fp}`` ...).

Start one in a test::

    from milterd.mta.__main__ import MtaThread
    from milterd.mta.config import MtaConfig

    cfg = MtaConfig(hostname="mx.contoso.test", maildir_root=tmp / "maildir",
                    queue_dir=tmp / "queue", local_domains=("contoso.test",),
                    tls_cert=..., tls_key=..., ca_files=(ca,),
                    milter="unix:/path/milter.sock")
    with MtaThread(cfg, on_outbound_result=callback) as mta:
        smtplib.SMTP("127.0.0.1", mta.port)

or as a process: ``python -m milterd.mta --config mta.toml`` (prints
``READY <port>``). Nothing here is imported by the daemon itself.
"""
