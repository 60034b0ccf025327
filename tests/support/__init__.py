"""Support code the test modules share: the lab directory, the partner certificates, the
milterd process factory, the traceback check and a fake clock.  Fixtures stay in conftest.py."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from milterd.lab.net import free_port
from milterd.lab.pki import TestPKI
from milterd.lab.proc import MilterdProcess

TESTS_DIR = Path(__file__).resolve().parent.parent


def make_lab_dir(prefix: str = "milterd-test-") -> Path:
    """A directory Postfix's unprivileged processes can traverse (pytest's tmp dirs are 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


class Partners:
    """The certificates of the TLS cases (notes/postfix.md table) plus Domain Security extras."""

    def __init__(self, pki: TestPKI):
        self.pki = pki
        self.server = pki.issue("mx-contoso", "mx.contoso.test")
        self.partner = pki.issue("wg-trusted", "mail.woodgrovebank.test")
        self.other = pki.issue("fabrikam-trusted", "mail.fabrikam.test")
        self.self_signed = pki.issue("wg-selfsigned", "mail.woodgrovebank.test",
                                     org="Evil", self_signed=True)
        self.pinned = pki.issue("wg-pinned", "mail.woodgrovebank.test", org="Woodgrove Direct",
                                self_signed=True)


class MilterdFactory:
    def __init__(self, root: Path):
        self.root = root
        self.started: list[MilterdProcess] = []
        self.n = 0

    def __call__(self, config: str = "", *, name: str | None = None, inet: bool = False,
                 plugin_modules: tuple[str, ...] = (), env: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = ()) -> MilterdProcess:
        self.n += 1
        d = self.root / (name or f"milterd{self.n}")
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
        if inet:
            spec = f"inet:{free_port()}@127.0.0.1"
        else:
            spec = f"unix:{d}/milter.sock"
        modules = ", ".join(f'"{m}"' for m in plugin_modules)
        text = f'[milter]\nlisten = "{spec}"\n'
        if "[plugins]" not in config:
            text += f"[plugins]\nmodules = [{modules}]\n"
        text += config
        (d / "milterd.toml").write_text(text)
        full_env = {"PYTHONPATH": str(TESTS_DIR) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        full_env.update(env or {})
        proc = MilterdProcess(d / "milterd.toml", spec, log_path=d / "milterd.log",
                              env=full_env, extra_args=extra_args)
        proc.dir = d  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc.start()

    def stop_all(self) -> None:
        for p in self.started:
            p.stop()

    def close(self) -> None:
        """Stop every milterd, remove the lab directory, then fail on any unexpected traceback
        in their logs (read before the directory goes)."""
        self.stop_all()
        logs = [p.log_text() for p in self.started]
        shutil.rmtree(self.root, ignore_errors=True)
        assert_no_tracebacks(logs)


def assert_no_tracebacks(logs: list[str]) -> None:
    for text in logs:
        # A plugin error is logged with its traceback on purpose; anything else is a bug.
        for block in text.split("Traceback (most recent call last):")[1:]:
            assert "test plugin exploded" in block or "TestPluginError" in block, (
                "unexpected traceback in milterd's log:\n" + block[:2000])


class FakeClock:
    """A settable clock for code that takes ``clock=`` (a callable returning seconds)."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
