"""Fixtures for the reference-MTA tests: a test PKI, a real pymilter milter
subprocess, and MTAs on ephemeral loopback ports (readiness checks, no fixed
sleeps).

Why not a conftest.py: tests/mta has no __init__.py, so a conftest.py here would
be imported under the module name ``conftest`` next to tests/conftest.py.
Test modules import the fixtures they use from here instead (module-scoped,
so each module gets its own milter and PKI).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import pytest
from mta_helpers import MilterProc, start_milter, stop_milter, base_config

from milterd.mta.__main__ import MtaThread
from milterd.lab.pki import TestPKI


@pytest.fixture(autouse=True)
def no_unexpected_warnings(request: pytest.FixtureRequest,
                           caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail a test whose MTA logged a warning it did not ask for
    (tests that provoke warnings request the ``allow_warnings`` fixture)."""
    caplog.set_level(logging.WARNING, logger="milterd.mta")
    yield
    if "allow_warnings" in request.fixturenames:
        return
    bad = [r for r in caplog.get_records("call") + caplog.get_records("teardown")
           if r.name.startswith("milterd.mta") and r.levelno >= logging.WARNING]
    assert not bad, "unexpected warnings: %s" % [r.getMessage() for r in bad]


@pytest.fixture
def allow_warnings() -> None:
    """Request this in a test that expects the MTA to log warnings."""


@pytest.fixture(scope="module")
def short_dir() -> Iterator[Path]:
    """A short path for unix sockets (sun_path is 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="mta", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("pki")
    ca = TestPKI(d, "Milterd Test CA", "Lab", days=30)
    other = TestPKI(d / "other", "Other CA", "Elsewhere", days=30)
    return SimpleNamespace(
        ca=ca,
        other=other,
        contoso_server=ca.issue("contoso", "mx.contoso.test"),
        woodgrove_client=ca.issue("wg_client", "mail.woodgrovebank.test"),
        woodgrove_selfsigned=ca.issue("wg_self", "mail.woodgrovebank.test", org="Evil",
                                      self_signed=True),
        woodgrove_server=ca.issue("wg_server", "mx.woodgrovebank.test"),
        wrongname_server=ca.issue("wrong", "mx.fabrikam.test"),
        untrusted_server=other.issue("untrusted", "mx.woodgrovebank.test"),
    )


# ---------------------------------------------------------------------- the pymilter milter


@pytest.fixture(scope="module")
def milter(short_dir: Path) -> Iterator[MilterProc]:
    m = start_milter(short_dir, "m")
    yield m
    stop_milter(m)


@pytest.fixture(scope="module")
def symlist_milter(short_dir: Path) -> Iterator[MilterProc]:
    m = start_milter(short_dir, "s", "--symlist")
    yield m
    stop_milter(m)


# ---------------------------------------------------------------------- MTAs


@pytest.fixture
def make_mta(tmp_path: Path, pki: SimpleNamespace) -> Iterator[Callable[..., MtaThread]]:
    started: list[MtaThread] = []

    def make(name: str = "contoso", *, on_outbound_result: Any = None,
             **kw: Any) -> MtaThread:
        cfg = base_config(tmp_path / name, pki, **kw)
        t = MtaThread(cfg, on_outbound_result=on_outbound_result).start()
        started.append(t)
        return t

    yield make
    for t in started:
        t.stop()


