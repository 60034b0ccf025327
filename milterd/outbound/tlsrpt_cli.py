"""``milterd tlsrpt``: RFC 8460 reports from the recorded outbound sessions.

- ``milterd tlsrpt send [-c FILE] [--date YYYY-MM-DD] [--dry-run]`` delivers every policy domain
  its daily report (:mod:`milterd.outbound.tlsrpt_send`; run daily by
  ``contrib/systemd/milterd-tlsrpt.timer``);
- ``milterd tlsrpt build --sessions FILE --date … --org … --contact …`` prints (or writes) one
  day's report; the same flags without ``build`` still work (the form before ``send`` existed).

The records and the report itself are :mod:`milterd.outbound.tlsrpt`."""

from __future__ import annotations

import argparse
import datetime as _dt
import gzip
import json
import sys
import uuid

from milterd.core.files import atomic_write
from milterd.outbound.tlsrpt import build_report, load_sessions


def _build_arguments(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument("--sessions", required=required, metavar="FILE",
                   help="JSON-lines session file written by the maillog follower")
    p.add_argument("--date", required=required, metavar="YYYY-MM-DD", help="UTC day to report")
    p.add_argument("--org", required=required, metavar="NAME", help="organization-name")
    p.add_argument("--contact", required=required, metavar="EMAIL", help="contact-info")
    p.add_argument("--out", metavar="FILE", help="write here (.gz: gzip) instead of stdout")
    p.add_argument("--domain", metavar="DOMAIN", help="only this policy domain")
    p.add_argument("--report-id", metavar="ID", help="report-id (default: generated)")
    p.add_argument("--sending-ip", metavar="IP", help="sending-mta-ip for failure details")


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``tlsrpt`` command; its ``func(args) -> int`` is set with set_defaults."""
    p = subparsers.add_parser(
        "tlsrpt", help="RFC 8460 TLS-RPT: send the daily reports, or build one",
        description="SMTP TLS Reporting (RFC 8460). 'send' delivers each policy domain its "
                    "daily report; 'build' prints one day's report. The build flags are also "
                    "accepted without 'build'.")
    # the form before sub-commands existed: `milterd tlsrpt --sessions … --date …`
    _build_arguments(p, required=False)
    p.set_defaults(func=_run_legacy)
    sub = p.add_subparsers(dest="tlsrpt_command", metavar="SUBCOMMAND")

    s = sub.add_parser(
        "send", help="deliver each policy domain its report for every finished UTC day",
        description="Deliver RFC 8460 reports: for each finished UTC day of the last "
                    "7 (or --date) and each policy domain with recorded sessions that publishes "
                    "a TLSRPT record, send the day's report to every rua (mailto: through the "
                    "local MTA, https: by POST). Each (day, domain, rua) is sent once; "
                    "temporary failures are retried by later runs. Sessions of every host and "
                    "the sending state are in the store ([store] url): every host of a fleet "
                    "may run this, each report is still sent once. This host's counters and "
                    "tlsrpt.prom live in [outbound] state_dir. Exit 0: done; 1: a delivery was "
                    "given up; 2: configuration error; 75: the store is unavailable (nothing "
                    "was sent past that point; the next run continues).")
    s.add_argument("-c", "--config", default="/etc/milterd/milterd.toml",
                   help="TOML config file (default: %(default)s)")
    s.add_argument("--date", dest="send_date", metavar="YYYY-MM-DD",
                   help="only this finished UTC day (within the lookback)")
    s.add_argument("--dry-run", action="store_true",
                   help="look up records and build reports, send nothing, change no state")
    s.set_defaults(func=run_send)

    b = sub.add_parser("build", help="print one day's report from a session file",
                       description="Build an RFC 8460 SMTP TLS report (JSON) for one UTC day.")
    _build_arguments(b, required=True)
    b.set_defaults(func=run_tlsrpt)
    return p


def _run_legacy(args: argparse.Namespace) -> int:
    missing = [f"--{k}" for k in ("sessions", "date", "org", "contact")
               if getattr(args, k, None) is None]
    if missing:
        print("milterd tlsrpt: give a sub-command (send, build), or for a report: "
              f"the arguments {', '.join(missing)} are required", file=sys.stderr)
        return 2
    return run_tlsrpt(args)


def run_send(args: argparse.Namespace) -> int:
    import logging

    from milterd.core.config import ConfigError, load_config
    from milterd.outbound.tlsrpt_send import (EXIT_STORE_DOWN, SendError, StoreUnavailable,
                                              TlsRptSender)

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for e in exc.errors:
            print(f"milterd tlsrpt send: {e}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"milterd tlsrpt send: -c: {exc.strerror}: {args.config}", file=sys.stderr)
        return 2
    try:
        from milterd.core.logs import setup_logging

        setup_logging(config)
    except Exception:  # pragma: no cover - logging setup must not stop the reports
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    if logging.getLogger().level > logging.INFO:
        logging.getLogger("milterd.tlsrpt").setLevel(logging.INFO)  # one line per outcome
    day = None
    if args.send_date:
        try:
            day = _dt.date.fromisoformat(args.send_date)
        except ValueError:
            print(f"milterd tlsrpt send: --date: not a YYYY-MM-DD date: {args.send_date!r}",
                  file=sys.stderr)
            return 2
    try:
        sender = TlsRptSender(config, dry_run=args.dry_run)
        outcomes = sender.run(day)
    except StoreUnavailable as exc:
        print(f"milterd tlsrpt send: {exc}; the next run (timer) tries again", file=sys.stderr)
        return EXIT_STORE_DOWN
    except SendError as exc:
        print(f"milterd tlsrpt send: {exc}", file=sys.stderr)
        return 2
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.result] = counts.get(o.result, 0) + 1
    summary = ", ".join(f"{n} {r}" for r, n in sorted(counts.items())) or "nothing to do"
    logging.getLogger("milterd.tlsrpt").info("tlsrpt send: done: %s", summary)
    return 1 if counts.get("gave_up") else 0


def run_tlsrpt(args: argparse.Namespace) -> int:
    try:
        day = _dt.date.fromisoformat(args.date)
    except ValueError:
        print(f"milterd tlsrpt: --date: not a YYYY-MM-DD date: {args.date!r}", file=sys.stderr)
        return 2
    try:
        sessions = load_sessions(args.sessions)
    except OSError as exc:
        print(f"milterd tlsrpt: --sessions: {exc.strerror}: {args.sessions}", file=sys.stderr)
        return 2
    report_id = args.report_id or f"{day.isoformat()}T00:00:00Z_{uuid.uuid4().hex}"
    report = build_report(sessions, day, args.org, args.contact, report_id,
                          policy_domain=args.domain, sending_mta_ip=args.sending_ip)
    text = json.dumps(report, indent=2) + "\n"
    if not args.out:
        sys.stdout.write(text)
        return 0
    try:
        data = text.encode("utf-8")
        if args.out.endswith(".gz"):
            data = gzip.compress(data)
        atomic_write(args.out, data, 0o644)
    except OSError as exc:
        print(f"milterd tlsrpt: --out: {exc.strerror}: {args.out}", file=sys.stderr)
        return 2
    return 0
