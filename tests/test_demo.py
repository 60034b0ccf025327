"""`milterd demo` (the README's main command) runs green from the installed package."""

from __future__ import annotations

import functools
import subprocess
import sys

import pytest


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "milterd", "demo", *args], capture_output=True,
                          text=True, timeout=180)


@functools.cache
def _reference_demo() -> subprocess.CompletedProcess[str]:
    """One run of the reference-MTA demo, shared by the tests that read its output."""
    return _demo()


def test_reference_mta_demo_both_directions():
    r = _reference_demo()
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    assert "domain-secured contoso.test -> woodgrovebank.test    deliver   delivered" in out
    assert "domain-secured woodgrovebank.test -> contoso.test    deliver   delivered" in out
    assert "domain-secure=pass; domain=contoso.test" in out
    assert "domain-secure=pass; domain=woodgrovebank.test" in out
    assert 'milterd_domain_security_failures_total{domain="woodgrovebank.test",reason="no_tls"} 1.0' in out
    assert out.count("domain-secured sent (secured)") == 2
    assert "Certificate thumbprint" in out
    assert "all outcomes as expected" in out


def _line(out: str, start: str) -> str:
    lines = [line for line in out.splitlines() if line.startswith(start)]
    assert len(lines) == 1, (start, out)
    return lines[0]


def _assert_hosted_partner(out: str, accepted: str, refused: str) -> None:
    """Issue #15: the hoster's certificate (mx.hoster.test) is accepted for the partner whose
    terms list it in certificate_names, and the same mail refused for one whose terms do not."""
    assert 'certificate_names = ["mx.hoster.test"]' in out       # the partner table is shown
    ok = _line(out, accepted)
    assert " accept " in ok and " 250 " in ok and "UNEXPECTED" not in ok
    no = _line(out, refused)
    assert " refuse " in no and " 550 5.7.1 " in no and no.endswith("(name_mismatch)")
    assert ("domain-secure=pass; domain=hosted.test; partner=hosted.test; "
            "match=certificate_name") in out
    traces = out.split("== trace headers of delivered mail", 1)[1].split("\n== ", 1)[0]
    stamp = traces.split(f"   {accepted}:\n", 1)[1].splitlines()[0]
    assert "CN=mx.hoster.test" in stamp or 'subject="mx.hoster.test"' in stamp, stamp
    assert "match=certificate_name" in stamp, stamp
    assert "litware.test" not in traces    # refused: never delivered, never stamped
    assert 'milterd_domain_security_failures_total{domain="litware.test",' \
           'reason="name_mismatch"} 1.0' in out
    assert "milterd_domain_secured_messages_received_total" \
           '{domain="hosted.test"} 1.0' in out


def test_reference_mta_demo_hosted_partner():
    r = _reference_demo()
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_hosted_partner(r.stdout, "hosted.test via mx.hoster.test (certificate_names)",
                           "litware.test via mx.hoster.test (no such term)")


@pytest.mark.postfix
def test_postfix_demo_every_tls_case():
    r = _demo("--mta", "postfix")
    assert r.returncode == 0, r.stdout + r.stderr
    for reason in ("(no_tls)", "(no_trusted_cert)", "(pin_mismatch)"):
        assert reason in r.stdout
    assert "all outcomes as expected" in r.stdout
    _assert_hosted_partner(r.stdout, "hosted.test via mx.hoster.test",
                           "litware.test via mx.hoster.test")
