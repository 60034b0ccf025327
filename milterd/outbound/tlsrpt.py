"""SMTP TLS Reporting (RFC 8460): the session records and the aggregate reports built from them.

Records: :func:`session_record` turns the delivery line that opens an SMTP session (per
recipient domain) into one JSON line (the :class:`milterd.outbound.maillog_follower.MaillogFollower`
appends them to its ``sessions_file``), ``{"ts", "key", "policy_domain", "policy_type",
"policy_string", "mx_host", "receiving_mx_hostname", "receiving_ip", "result":
"success"|"failure", "result_type", "failure_reason_code", …}``.  ``key`` names the session:
:func:`build_report` counts each key once.  ``failure_reason_code`` holds Postfix's fixed words
only (never remote reply text or certificate names).

Output (RFC 8460 §4.4): ``organization-name``, ``date-range`` {``start-datetime``,
``end-datetime``} covering one UTC day, ``contact-info``, ``report-id``, and one ``policies[]``
entry per (policy domain, policy) with ``policy`` {``policy-type`` (sts | tlsa |
no-policy-found), ``policy-string[]``, ``policy-domain``, ``mx-host[]``}, ``summary``
{``total-successful-session-count``, ``total-failure-session-count``} and ``failure-details[]``
aggregated by (result type, sending MTA IP, receiving MX host name, receiving IP, reason code).

``milterd tlsrpt --sessions FILE --date YYYY-MM-DD --org NAME --contact EMAIL [--out FILE]``
prints (or writes; ``.gz`` → gzip, the ``application/tlsrpt+gzip`` form) the report.
Submitting reports to the ``rua`` of ``_smtp._tls.<domain>`` is not done here.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Iterable

from milterd.policy import reasons

if TYPE_CHECKING:
    from milterd.outbound.maillog_parser import OutboundResult

__all__ = ["build_report", "load_sessions", "session_record", "tlsrpt_result_type",
           "RESULT_TYPES", "POLICY_TYPES"]

log = logging.getLogger(__name__)

POLICY_TYPES = ("sts", "tlsa", "no-policy-found")
RESULT_TYPES = (
    # §4.3.1 negotiation failures
    "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure",
    # §4.3.2 policy failures: DANE
    "tlsa-invalid", "dnssec-invalid", "dane-required",
    # §4.3.2 policy failures: MTA-STS
    "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid",
)


# -- session records ----------------------------------------------------------------------------
#: failure-reason-code texts: Postfix's fixed words only, never text a remote party chose.
_REASON_CODE = {
    reasons.OUTBOUND_STARTTLS_NOT_OFFERED: "TLS is required, but was not offered",
    reasons.OUTBOUND_UNTRUSTED_CERT: "Server certificate not verified",
    reasons.OUTBOUND_NAME_MISMATCH: "Server certificate not verified: name mismatch",
    reasons.OUTBOUND_HANDSHAKE_FAILED: "Cannot start TLS: handshake failure",
}
_VALIDATION = ("not_yet_valid", "purpose", "chain_too_long", "other")


def tlsrpt_result_type(result: OutboundResult, policy_type: str) -> str | None:
    """RFC 8460 §4.3 result type for a failed session, None for a successful one.

    Decided by Postfix's own words only: the delivery reason (an exact Postfix text) and the
    certificate problem code of the session's TLS lines (``result.cert_error``)."""
    cert = getattr(result, "cert_error", "")
    if result.status == "sent":
        if result.tls_level != "none":
            return None
        return "validation-failure" if cert else "starttls-not-supported"
    if result.reason == reasons.OUTBOUND_STARTTLS_NOT_OFFERED:
        return "starttls-not-supported"
    if result.reason in (reasons.OUTBOUND_UNTRUSTED_CERT, reasons.OUTBOUND_NAME_MISMATCH):
        if policy_type == "tlsa":
            return "tlsa-invalid"
        if result.reason == reasons.OUTBOUND_NAME_MISMATCH or cert == "hostname_mismatch":
            return "certificate-host-mismatch"
        if cert == "expired":
            return "certificate-expired"
        if cert in _VALIDATION:
            return "validation-failure"
        return "certificate-not-trusted"
    if result.reason == reasons.OUTBOUND_HANDSHAKE_FAILED:
        return "validation-failure"
    return None  # a non-TLS failure after TLS was established: the TLS session succeeded


def failure_reason_code(result: OutboundResult, rtype: str | None) -> str | None:
    """A fixed-words ``failure-reason-code`` for a failed session (None for a success)."""
    if rtype is None:
        return None
    from milterd.outbound.maillog_parser import CERT_ERROR_TEXT

    parts = []
    if result.reason in _REASON_CODE:
        parts.append(_REASON_CODE[result.reason])  # type: ignore[index]
    elif result.status == "sent":
        parts.append("delivered without TLS")
    cert = getattr(result, "cert_error", "")
    if cert:
        parts.append(CERT_ERROR_TEXT.get(cert, "certificate verification failed"))
    return ": ".join(parts) or None


def session_record(result: OutboundResult, policy: Any | None) -> dict | None:
    """The JSON-line record for TLS-RPT, or None when the line opens no TLS-RPT session.

    Only the line that opens a session for its recipient domain (``result.session_key``, see
    :mod:`milterd.outbound.maillog_parser`) gives a record, keyed ``key`` by that session, so
    one SMTP session to several recipients is one record, and a record written twice (a crash
    between append and state save) is counted once by :func:`build_report`."""
    if (result.service != "smtp" or result.relay == "none" or not result.recipient_domain
            or not getattr(result, "session_key", "")):
        return None
    if (result.status != "sent" and result.reason == reasons.OUTBOUND_OTHER
            and result.tls_level == "none" and not getattr(result, "cert_error", "")):
        return None  # no TLS session was attempted (connection error, plain-text refusal)
    pol = policy.to_json() if policy is not None and hasattr(policy, "to_json") else {}
    policy_type = pol.get("policy_type", "no-policy-found")
    rtype = tlsrpt_result_type(result, policy_type)
    return {
        "ts": result.timestamp.astimezone(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "key": result.session_key,
        "queue_id": result.queue_id,
        "policy_domain": result.recipient_domain,
        "policy_type": policy_type,
        "policy_string": pol.get("policy_string", []),
        "mx_host": pol.get("mx_host", []),
        "receiving_mx_hostname": result.relay_host,
        "receiving_ip": result.relay_ip,
        "status": result.status,
        "tls_level": result.tls_level,
        "result": "failure" if rtype else "success",
        "result_type": rtype,
        "failure_reason_code": failure_reason_code(result, rtype),
    }


# -- reports ------------------------------------------------------------------------------------
def _day(date: str | _dt.date) -> _dt.date:
    if isinstance(date, _dt.date):
        return date
    return _dt.date.fromisoformat(date)


def session_day(ts: Any) -> _dt.date | None:
    """The UTC day of a record's ``ts`` (ISO 8601, ``Z`` or an offset; naive = UTC), or None."""
    if not isinstance(ts, str):
        return None
    try:
        t = _dt.datetime.fromisoformat(ts.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.timezone.utc)
    return t.astimezone(_dt.timezone.utc).date()


def build_report(sessions: Iterable[dict], date: str | _dt.date, organization_name: str,
                 contact_info: str, report_id: str, *, policy_domain: str | None = None,
                 sending_mta_ip: str | None = None) -> dict:
    """Build the RFC 8460 report for the sessions of one UTC ``date``.

    :param sessions: session records (see the module docstring); records of other days, of
        other domains (when ``policy_domain`` is given) and malformed records are skipped.
    :param sending_mta_ip: the sending MTA's address for ``failure-details`` when a record
        has none (the Postfix log does not name the local address).
    """
    day = _day(date)
    groups: "OrderedDict[tuple, dict]" = OrderedDict()
    seen_keys: set[str] = set()
    for s in sessions:
        if not isinstance(s, dict) or session_day(s.get("ts")) != day:
            continue
        key = s.get("key")
        if isinstance(key, str) and key:
            if key in seen_keys:
                continue  # the same session recorded twice (e.g. replayed after a crash)
            seen_keys.add(key)
        domain = s.get("policy_domain")
        if not isinstance(domain, str) or not domain:
            continue
        if policy_domain is not None and domain != policy_domain.lower().rstrip("."):
            continue
        ptype = s.get("policy_type") if s.get("policy_type") in POLICY_TYPES else "no-policy-found"
        pstrings = tuple(str(x) for x in s.get("policy_string") or ())
        mx_hosts = tuple(str(x) for x in s.get("mx_host") or ())
        key = (domain, ptype, pstrings, mx_hosts)
        g = groups.setdefault(key, {"ok": 0, "fail": 0, "details": OrderedDict()})
        if s.get("result") == "failure":
            g["fail"] += 1
            rtype = s.get("result_type")
            if rtype not in RESULT_TYPES:
                rtype = "validation-failure"
            dkey = (rtype, s.get("sending_mta_ip") or sending_mta_ip or "",
                    s.get("receiving_mx_hostname") or "", s.get("receiving_ip") or "",
                    s.get("failure_reason_code") or "")
            g["details"][dkey] = g["details"].get(dkey, 0) + 1
        else:
            g["ok"] += 1
    policies = []
    for (domain, ptype, pstrings, mx_hosts), g in groups.items():
        details = []
        for (rtype, send_ip, mx_name, recv_ip, code), count in g["details"].items():
            d: dict[str, Any] = {"result-type": rtype}
            if send_ip:
                d["sending-mta-ip"] = send_ip
            if mx_name:
                d["receiving-mx-hostname"] = mx_name
            if recv_ip:
                d["receiving-ip"] = recv_ip
            d["failed-session-count"] = count
            if code:
                d["failure-reason-code"] = code
            details.append(d)
        entry: dict[str, Any] = {
            "policy": {"policy-type": ptype, "policy-string": list(pstrings),
                       "policy-domain": domain, "mx-host": list(mx_hosts)},
            "summary": {"total-successful-session-count": g["ok"],
                        "total-failure-session-count": g["fail"]},
        }
        if details:
            entry["failure-details"] = details
        policies.append(entry)
    return {
        "organization-name": organization_name,
        "date-range": {"start-datetime": f"{day.isoformat()}T00:00:00Z",
                       "end-datetime": f"{day.isoformat()}T23:59:59Z"},
        "contact-info": contact_info,
        "report-id": report_id,
        "policies": policies,
    }


def load_sessions(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines session file; malformed lines are skipped (and counted in the log)."""
    out: list[dict] = []
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
    if bad:
        log.warning("%s: %d malformed session line(s) skipped", path, bad)
    return out
