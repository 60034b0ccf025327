"""The certificate-expiry rows behind the daemon's gauge (no CLI here)."""

from __future__ import annotations

import logging
from typing import Iterable

from milterd.certs.common import load_certificates

log = logging.getLogger("milterd.cert")


def certificate_expiry(paths: Iterable[str]) -> list[tuple[str, str, float]]:
    """(path, subject RFC 4514, not-after unix time) for every certificate in each PEM file.

    For the gauge ``milterd_certificate_expiry_timestamp_seconds{path,subject}``; chain files
    yield one row per certificate, since an expiring intermediate breaks the chain too.
    Unreadable files are skipped with a warning so one bad path does not hide the others.
    """
    out: list[tuple[str, str, float]] = []
    for path in paths:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
            certs = load_certificates(data)
        except (OSError, ValueError) as exc:
            log.warning("cannot read certificate file %s: %s", path, exc)
            continue
        for cert in certs:
            out.append((path, cert.subject.rfc4514_string(), cert.not_valid_after_utc.timestamp()))
    return out
