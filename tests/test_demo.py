"""`milterd demo` (the README's main command) runs green from the installed package."""

from __future__ import annotations

import subprocess
import sys

import pytest


def _demo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "milterd", "demo", *args], capture_output=True,
                          text=True, timeout=180)


def test_reference_mta_demo_both_directions():
    r = _demo()
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


@pytest.mark.postfix
def test_postfix_demo_every_tls_case():
    r = _demo("--mta", "postfix")
    assert r.returncode == 0, r.stdout + r.stderr
    for reason in ("(no_tls)", "(no_trusted_cert)", "(pin_mismatch)"):
        assert reason in r.stdout
    assert "all outcomes as expected" in r.stdout
