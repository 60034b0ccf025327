"""contrib/systemd/milterd.service is a valid unit (``systemd-analyze verify``).

``verify`` checks that ExecStart's binary exists and is executable, and the shipped unit points at
``/opt/milterd/bin/milterd`` (the Debian package's venv, or a pip install into a venv there), which
a test machine need not have.  So the test verifies a copy whose ExecStart points at this virtualenv's ``milterd`` script
(everything else byte-for-byte the shipped unit), in a temporary directory.  ``systemd-analyze``
comes with Debian's ``systemd`` package; when it is missing the test fails (it never skips).
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

UNIT = Path(__file__).resolve().parents[1] / "contrib" / "systemd" / "milterd.service"
SHIPPED_EXEC = "/opt/milterd/bin/milterd"


def _unit_options(text: str) -> dict[str, dict[str, str]]:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment]  # systemd keys are case-sensitive
    cp.read_string(text)
    return {s: dict(cp[s]) for s in cp.sections()}


def _venv_milterd() -> Path:
    exe = Path(sys.executable).parent / "milterd"
    assert exe.exists() and os.access(exe, os.X_OK), (
        f"{exe} missing: install milterd into the venv (scripts/setup.sh)")
    return exe


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    tool = shutil.which("systemd-analyze")
    assert tool, ("systemd-analyze not found: it is in Debian's 'systemd' package "
                  "(apt-get install systemd; scripts/setup.sh should install it)")
    text = UNIT.read_text()
    assert f"ExecStart={SHIPPED_EXEC} " in text
    copy = tmp_path / "milterd.service"
    copy.write_text(text.replace(f"ExecStart={SHIPPED_EXEC} ", f"ExecStart={_venv_milterd()} "))
    r = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    out = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, f"systemd-analyze verify failed (rc={r.returncode}):\n{out}"
    # verify also prints warnings with rc 0 for some problems (unknown keys, bad values)
    bad = [line for line in out.splitlines() if "milterd.service" in line]
    assert not bad, "systemd-analyze verify complained:\n" + out


def test_unit_has_the_required_hardening_and_reload():
    svc = _unit_options(UNIT.read_text())["Service"]
    assert svc["User"] == "milterd"
    # No Group=/SupplementaryGroups=: groups come from /etc/group (the package adds milterd to
    # "postfix" when Postfix is installed); a SupplementaryGroups=postfix would make the unit
    # fail on a Sendmail host, which has no such group.
    assert "Group" not in svc and "SupplementaryGroups" not in svc
    assert svc["RuntimeDirectory"] == "milterd"     # /run/milterd: Sendmail's socket
    assert svc["RuntimeDirectoryMode"] == "0750"
    # Postfix's socket directory inside its spool (chrooted smtpd); "-": absent on Sendmail hosts
    assert svc["ReadWritePaths"] == "-/var/spool/postfix/milterd"
    assert svc["UMask"] == "0007"
    assert svc["ExecStart"] == f"{SHIPPED_EXEC} run -c /etc/milterd/milterd.toml"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs"):
        assert svc[key] == "yes", key
    assert svc["ProtectSystem"] == "strict"
    assert set(svc["RestrictAddressFamilies"].split()) == {"AF_UNIX", "AF_INET", "AF_INET6"}
    # no StandardOutput=/StandardError= override: milterd's stderr goes to the journal
    assert "StandardError" not in svc and "StandardOutput" not in svc
