"""Verdicts and header edits: the two things a plugin can ask of the MTA, as distinct types.

Verdicts compose deterministically: the most severe wins (reject > tempfail > continue); among
equals, the first in hook-call order wins, so the reply text is stable.  Header edits are a
separate type, collected from all plugins and applied only at end of message, only when the
message is accepted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Iterable


class Action(enum.IntEnum):
    # Ordered by severity: higher wins.
    CONTINUE = 0
    TEMPFAIL = 1
    REJECT = 2


@dataclass(frozen=True)
class Verdict:
    action: Action
    code: str = ""         # "550"; empty: the MTA's default for the action
    xcode: str = ""        # "5.7.1"
    text: str = ""         # reply text (must not contain CR/LF; '%' is escaped on the way out)
    reason: str = ""       # machine-readable reason, shared with logs, headers and metrics
    plugin: str = ""       # filled in by the core: which plugin gave it

    @property
    def metric_name(self) -> str:
        return {Action.CONTINUE: "accept", Action.TEMPFAIL: "tempfail",
                Action.REJECT: "reject"}[self.action]

    def reply_text(self) -> str:
        parts = [p for p in (self.xcode, self.text) if p]
        return " ".join(parts)


CONTINUE = Verdict(Action.CONTINUE)


def reject(text: str, *, reason: str, code: str = "550", xcode: str = "5.7.1") -> Verdict:
    return Verdict(Action.REJECT, code, xcode, _one_line(text), reason)


def tempfail(text: str, *, reason: str, code: str = "450", xcode: str = "4.7.1") -> Verdict:
    return Verdict(Action.TEMPFAIL, code, xcode, _one_line(text), reason)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def compose(verdicts: Iterable[Verdict | None]) -> Verdict:
    """The most severe verdict; the first of equal severity; CONTINUE when there is none."""
    best = CONTINUE
    for v in verdicts:
        if v is not None and v.action > best.action:
            best = v
    return best


@dataclass(frozen=True)
class AddHeader:
    """Add a header; ``index`` 0 puts it at the top (above the MTA's own Received header)."""

    name: str
    value: str
    index: int = 0


@dataclass(frozen=True)
class DeleteHeader:
    """Delete the ``occurrence``-th (1-based, among headers of that name) copy of ``name``."""

    name: str
    occurrence: int


HeaderEdit = AddHeader | DeleteHeader
