"""What a doctor check returns, and how results add up to an exit status."""

from __future__ import annotations

from dataclasses import asdict, dataclass

OK, WARN, FAIL = "ok", "warn", "fail"
STATUSES = (OK, WARN, FAIL)


@dataclass(frozen=True)
class Check:
    """One check's result.  ``id`` is stable (scripts and the tests key on it); ``fix`` is the
    exact line to run or to put in a file, empty when nothing is to be done."""

    id: str
    status: str
    message: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {self.status!r}")

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def ok(id: str, message: str) -> Check:
    return Check(id, OK, message)


def warn(id: str, message: str, fix: str = "") -> Check:
    return Check(id, WARN, message, fix)


def fail(id: str, message: str, fix: str = "") -> Check:
    return Check(id, FAIL, message, fix)


def summary(checks: list[Check]) -> dict[str, int]:
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    return {**counts, "exit": exit_code(checks)}


def exit_code(checks: list[Check]) -> int:
    """0 all ok, 1 warnings only, 2 any failure."""
    if any(c.status == FAIL for c in checks):
        return 2
    if any(c.status == WARN for c in checks):
        return 1
    return 0
