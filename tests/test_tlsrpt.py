"""TLS-RPT (RFC 8460) report: field-list validation and agreement with the given sessions."""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import ipaddress
import json
import re

import pytest

from milterd.outbound.maillog_parser import MaillogParser
from milterd.outbound.tlspolicy import PolicyAnswer
from milterd.outbound.tlsrpt import (POLICY_TYPES, RESULT_TYPES, build_report, load_sessions,
                                     session_record)
from milterd.outbound.tlsrpt_cli import register

_RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)\Z")


def validate_rfc8460(report: dict, *, require_ips: bool = True) -> None:
    """Check the RFC 8460 §4.4 field list (raises AssertionError naming the field)."""
    for key in ("organization-name", "date-range", "contact-info", "report-id", "policies"):
        assert key in report, f"missing {key}"
    for key in ("organization-name", "contact-info", "report-id"):
        assert isinstance(report[key], str) and report[key], f"{key} must be a non-empty string"
    dr = report["date-range"]
    for key in ("start-datetime", "end-datetime"):
        assert isinstance(dr.get(key), str) and _RFC3339.match(dr[key]), f"date-range.{key}"
    assert dr["start-datetime"] <= dr["end-datetime"]
    assert isinstance(report["policies"], list)
    for i, pol in enumerate(report["policies"]):
        where = f"policies[{i}]"
        for key in ("policy", "summary"):
            assert key in pol, f"{where}: missing {key}"
        p = pol["policy"]
        assert p.get("policy-type") in POLICY_TYPES, f"{where}.policy.policy-type"
        assert isinstance(p.get("policy-domain"), str) and p["policy-domain"], f"{where}.policy-domain"
        for key in ("policy-string", "mx-host"):
            if key in p:
                assert isinstance(p[key], list) and all(isinstance(x, str) for x in p[key]), key
        if p["policy-type"] != "no-policy-found":
            assert p.get("policy-string"), f"{where}: policy-string required for {p['policy-type']}"
        s = pol["summary"]
        for key in ("total-successful-session-count", "total-failure-session-count"):
            assert isinstance(s.get(key), int) and s[key] >= 0, f"{where}.summary.{key}"
        details = pol.get("failure-details", [])
        assert isinstance(details, list)
        assert sum(d["failed-session-count"] for d in details) == s["total-failure-session-count"]
        for j, d in enumerate(details):
            w = f"{where}.failure-details[{j}]"
            assert d.get("result-type") in RESULT_TYPES, f"{w}.result-type"
            assert isinstance(d.get("failed-session-count"), int) and d["failed-session-count"] > 0, w
            ip_keys = ("sending-mta-ip", "receiving-ip")
            for key in ip_keys:
                if require_ips:
                    assert key in d, f"{w}: missing {key}"
                if key in d:
                    ipaddress.ip_address(d[key])
            for key in ("receiving-mx-hostname", "receiving-mx-helo", "additional-information",
                        "failure-reason-code"):
                if key in d:
                    assert isinstance(d[key], str)
            allowed = {"result-type", "sending-mta-ip", "receiving-mx-hostname", "receiving-mx-helo",
                       "receiving-ip", "failed-session-count", "additional-information",
                       "failure-reason-code"}
            assert set(d) <= allowed, f"{w}: unknown keys {set(d) - allowed}"


STS = {"policy_type": "sts", "policy_string": ["version: STSv1", "mode: enforce",
                                               "mx: *.mail.sts.test", "max_age: 86400"],
       "mx_host": ["*.mail.sts.test"]}


def rec(ts, domain, result, rtype=None, mx="mx1.mail.sts.test", ip="192.0.2.1", code=None, **pol):
    return {"ts": ts, "policy_domain": domain, "receiving_mx_hostname": mx, "receiving_ip": ip,
            "result": result, "result_type": rtype, "failure_reason_code": code, **pol}


SESSIONS = [
    rec("2026-11-24T01:00:00Z", "sts.test", "success", **STS),
    rec("2026-11-24T02:00:00Z", "sts.test", "success", **STS),
    rec("2026-11-24T03:00:00Z", "sts.test", "failure", "certificate-expired",
        code="certificate has expired", **STS),
    rec("2026-11-24T04:00:00Z", "sts.test", "failure", "certificate-expired",
        code="certificate has expired", **STS),
    rec("2026-11-24T05:00:00Z", "sts.test", "failure", "starttls-not-supported",
        mx="mx2.mail.sts.test", ip="192.0.2.2", **STS),
    rec("2026-11-24T06:00:00Z", "dane.test", "success", policy_type="tlsa",
        policy_string=["3 1 1 abcd"], mx_host=["mx.dane.test"]),
    rec("2026-11-24T07:00:00Z", "plain.test", "failure", "starttls-not-supported",
        mx="mx.plain.test", ip="2001:db8::7", policy_type="no-policy-found"),
    rec("2026-11-23T23:59:59Z", "sts.test", "success", **STS),    # other day
    rec("2026-11-25T00:00:00Z", "sts.test", "failure", "validation-failure", **STS),
    {"garbage": True},
]


def test_report_matches_sessions():
    report = build_report(SESSIONS, "2026-11-24", "Example Org", "mailto:tlsrpt@example.test",
                          "2026-11-24T00:00:00Z_r1", sending_mta_ip="198.51.100.5")
    validate_rfc8460(report)
    assert report["date-range"] == {"start-datetime": "2026-11-24T00:00:00Z",
                                    "end-datetime": "2026-11-24T23:59:59Z"}
    by_domain = {p["policy"]["policy-domain"]: p for p in report["policies"]}
    assert set(by_domain) == {"sts.test", "dane.test", "plain.test"}
    sts = by_domain["sts.test"]
    assert sts["policy"] == {"policy-type": "sts", "policy-string": STS["policy_string"],
                             "policy-domain": "sts.test", "mx-host": ["*.mail.sts.test"]}
    assert sts["summary"] == {"total-successful-session-count": 2, "total-failure-session-count": 3}
    assert sts["failure-details"] == [
        {"result-type": "certificate-expired", "sending-mta-ip": "198.51.100.5",
         "receiving-mx-hostname": "mx1.mail.sts.test", "receiving-ip": "192.0.2.1",
         "failed-session-count": 2, "failure-reason-code": "certificate has expired"},
        {"result-type": "starttls-not-supported", "sending-mta-ip": "198.51.100.5",
         "receiving-mx-hostname": "mx2.mail.sts.test", "receiving-ip": "192.0.2.2",
         "failed-session-count": 1},
    ]
    dane = by_domain["dane.test"]
    assert dane["policy"]["policy-type"] == "tlsa" and "failure-details" not in dane
    assert by_domain["plain.test"]["policy"]["policy-type"] == "no-policy-found"
    json.dumps(report)  # serialisable


def test_domain_filter_and_empty_day():
    report = build_report(SESSIONS, dt.date(2026, 11, 24), "O", "c@example.test", "id",
                          policy_domain="DANE.test.", sending_mta_ip="198.51.100.5")
    validate_rfc8460(report)
    assert [p["policy"]["policy-domain"] for p in report["policies"]] == ["dane.test"]
    empty = build_report(SESSIONS, "2020-01-01", "O", "c@example.test", "id")
    validate_rfc8460(empty)
    assert empty["policies"] == []


def test_validator_catches_missing_fields():
    report = build_report(SESSIONS, "2026-11-24", "O", "c@example.test", "id",
                          sending_mta_ip="198.51.100.5")
    broken = json.loads(json.dumps(report))
    del broken["policies"][0]["failure-details"][0]["result-type"]
    with pytest.raises(AssertionError):
        validate_rfc8460(broken)
    no_ip = build_report(SESSIONS, "2026-11-24", "O", "c@example.test", "id")
    with pytest.raises(AssertionError, match="sending-mta-ip"):
        validate_rfc8460(no_ip)
    validate_rfc8460(no_ip, require_ips=False)


def test_end_to_end_from_log_lines():
    """Postfix log lines -> session records -> report."""
    p = MaillogParser(now=lambda: dt.datetime(2026, 11, 24, 12, tzinfo=dt.timezone.utc),
                      tz=dt.timezone.utc)
    answer = PolicyAnswer("secure", "secure match=.mail.sts.test", "mta-sts", "sts.test",
                          tlsrpt_policy_type="sts", policy_strings=tuple(STS["policy_string"]),
                          mx_patterns=("*.mail.sts.test",))
    h = "Nov 24 08:25:01 mail postfix/smtp"
    lines = [
        f"{h}[1]: Verified TLS connection established to mx1.mail.sts.test[192.0.2.1]:25: TLSv1.3 "
        "with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        f"{h}[1]: AAA1: to=<a@sts.test>, relay=mx1.mail.sts.test[192.0.2.1]:25, delay=1, "
        "delays=0/0/0.5/0.5, dsn=2.0.0, status=sent (250 ok)",
        f"{h}[2]: server certificate verification failed for mx2.mail.sts.test[192.0.2.2]:25: "
        "certificate has expired",
        f"{h}[2]: Untrusted TLS connection established to mx2.mail.sts.test[192.0.2.2]:25: TLSv1.3 "
        "with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
        f"{h}[2]: AAA2: to=<b@sts.test>, relay=mx2.mail.sts.test[192.0.2.2]:25, delay=1, "
        "delays=0/0/1/0, dsn=4.7.5, status=deferred (Server certificate not trusted)",
    ]
    records = []
    for line in lines:
        r = p.feed(line)
        if r is not None:
            records.append(session_record(r, answer))
    report = build_report(records, "2026-11-24", "O", "c@example.test", "id",
                          sending_mta_ip="198.51.100.5")
    validate_rfc8460(report)
    (pol,) = report["policies"]
    assert pol["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 1}
    (detail,) = pol["failure-details"]
    assert detail["result-type"] == "certificate-expired"
    assert detail["receiving-mx-hostname"] == "mx2.mail.sts.test"


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="milterd")
    sub = parser.add_subparsers(dest="cmd", required=True)
    register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path, capsys):
    sessions = tmp_path / "sessions.jsonl"
    sessions.write_text("\n".join(json.dumps(s) for s in SESSIONS) + "\nnot json\n")
    assert len(load_sessions(sessions)) == len(SESSIONS)
    base = ["tlsrpt", "--sessions", str(sessions), "--date", "2026-11-24", "--org", "Example Org",
            "--contact", "tlsrpt@example.test", "--sending-ip", "198.51.100.5"]
    assert run_cli(base) == 0
    report = json.loads(capsys.readouterr().out)
    validate_rfc8460(report)
    assert report["report-id"].startswith("2026-11-24")
    out = tmp_path / "report.json.gz"
    assert run_cli(base + ["--out", str(out), "--report-id", "r-1", "--domain", "sts.test"]) == 0
    report = json.loads(gzip.decompress(out.read_bytes()))
    validate_rfc8460(report)
    assert report["report-id"] == "r-1" and len(report["policies"]) == 1
    assert run_cli(base[:4] + ["2026-13-01"] + base[5:]) == 2
    assert run_cli(["tlsrpt", "--sessions", str(tmp_path / "missing"), "--date", "2026-11-24",
                    "--org", "O", "--contact", "c"]) == 2
    assert "--sessions" in capsys.readouterr().err
