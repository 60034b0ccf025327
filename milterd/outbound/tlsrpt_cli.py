"""``milterd tlsrpt``: build a day's RFC 8460 report from the recorded sessions (and, later,
deliver it).  The records and the report itself are :mod:`milterd.outbound.tlsrpt`."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import uuid
import datetime as _dt

from milterd.outbound.tlsrpt import build_report, load_sessions


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``tlsrpt`` sub-command; its ``func(args) -> int`` is set with set_defaults."""
    p = subparsers.add_parser(
        "tlsrpt", help="build an RFC 8460 TLS-RPT report from recorded outbound sessions",
        description="Build an RFC 8460 SMTP TLS report (JSON) for one UTC day.")
    p.add_argument("--sessions", required=True, metavar="FILE",
                   help="JSON-lines session file written by the maillog follower")
    p.add_argument("--date", required=True, metavar="YYYY-MM-DD", help="UTC day to report")
    p.add_argument("--org", required=True, metavar="NAME", help="organization-name")
    p.add_argument("--contact", required=True, metavar="EMAIL", help="contact-info")
    p.add_argument("--out", metavar="FILE", help="write here (.gz: gzip) instead of stdout")
    p.add_argument("--domain", metavar="DOMAIN", help="only this policy domain")
    p.add_argument("--report-id", metavar="ID", help="report-id (default: generated)")
    p.add_argument("--sending-ip", metavar="IP", help="sending-mta-ip for failure details")
    p.set_defaults(func=run_tlsrpt)
    return p


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
    tmp = f"{args.out}.tmp"
    try:
        data = text.encode("utf-8")
        if args.out.endswith(".gz"):
            data = gzip.compress(data)
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, args.out)
    except OSError as exc:
        print(f"milterd tlsrpt: --out: {exc.strerror}: {args.out}", file=sys.stderr)
        return 2
    return 0
