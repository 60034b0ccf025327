"""Shared fixtures: a test PKI, real milterd processes and private Postfix instances on loopback.

MTA-facing tests use real parts only: Debian's Postfix, pymilter/libmilter, real TLS.  When the
MTA cannot be provisioned the test fails (never skips): run scripts/setup.sh first.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import pytest

from milterd.lab.pki import TestPKI
from milterd.lab.postfix import PostfixLab, PostfixTLS

from support import MilterdFactory, Partners, make_lab_dir


@pytest.fixture(scope="session")
def lab_root() -> Iterator[Path]:
    d = make_lab_dir("milterd-tests-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="session")
def partners(lab_root: Path) -> Partners:
    return Partners(TestPKI(lab_root / "pki"))


@pytest.fixture
def milterd_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MilterdFactory]:
    root = make_lab_dir("milterd-proc-")
    f = MilterdFactory(root)
    yield f
    f.close()


@pytest.fixture
def postfix_factory(partners: Partners) -> Iterator[Callable[..., PostfixLab]]:
    labs: list[PostfixLab] = []

    def make(milter_socket: str | None, **kwargs) -> PostfixLab:
        kwargs.setdefault("tls", PostfixTLS(partners.server.cert_path, partners.server.key_path,
                                            partners.pki.ca_path))
        lab = PostfixLab(milter_socket=milter_socket, **kwargs)
        labs.append(lab)
        return lab.start()

    yield make
    for lab in labs:
        lab.cleanup()
