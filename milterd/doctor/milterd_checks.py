"""milterd itself: its config, certificates, and whether what it should serve answers.

The probes (a milter option negotiation, socketmap lookups, a policy request, a /metrics GET, the
certificates' expiry) are made by :mod:`milterd.doctor.gather` into a :class:`RuntimeFacts`;
the checks here only judge them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING

from milterd.doctor.model import Check, fail, ok, warn

if TYPE_CHECKING:
    from milterd.core.config import Config

EXPIRY_WARN_DAYS = 30


@dataclass(frozen=True)
class Probe:
    ok: bool
    detail: str


@dataclass(frozen=True)
class RuntimeFacts:
    now: dt.datetime
    milter: Probe
    # the macro lists milterd requested in negotiation (stage -> names); None if no answer
    milter_macros: tuple[tuple[int, tuple[str, ...]], ...] | None = None
    policy: Probe | None = None                          # None: no [policy] listen
    socketmap: tuple[tuple[str, Probe], ...] = ()        # (queried domain, answer)
    metrics: Probe | None = None                         # None: no [metrics] listen
    # (path, notAfter or None, error) per [tls] certificates entry
    certificates: tuple[tuple[str, dt.datetime | None, str], ...] = ()


def check_certificates(config: "Config", rt: RuntimeFacts) -> Check:
    cid = "milterd.certificates"
    if not config.tls.certificates:
        return ok(cid, "[tls] certificates lists none")
    failed, warned, fine = [], [], []
    for path, not_after, error in rt.certificates:
        if not_after is None:
            failed.append(f"{path}: {error}")
            continue
        left = not_after - rt.now
        when = not_after.strftime("%Y-%m-%d")
        if left.total_seconds() <= 0:
            failed.append(f"{path} expired on {when}")
        elif left < dt.timedelta(days=EXPIRY_WARN_DAYS):
            warned.append(f"{path} expires on {when} ({left.days} days)")
        else:
            fine.append(f"{path} until {when}")
    if failed:
        return fail(cid, "; ".join(failed + warned), f"renew: {failed[0].split(':')[0].split()[0]}")
    if warned:
        return warn(cid, "; ".join(warned), f"renew: {warned[0].split()[0]}")
    return ok(cid, "valid: " + "; ".join(fine))


def check_milter(config: "Config", rt: RuntimeFacts) -> Check:
    cid = "milterd.milter"
    if rt.milter.ok:
        return ok(cid, f"{config.milter.listen} answers option negotiation ({rt.milter.detail})")
    return fail(cid, f"{config.milter.listen}: {rt.milter.detail}: the MTA tempfails all mail",
                f"systemctl start milterd   (or: milterd run -c {config.source})")


def check_policy(config: "Config", rt: RuntimeFacts) -> Check:
    cid = "milterd.policy"
    if config.policy_listen is None or rt.policy is None:
        return ok(cid, "[policy] listen is not set")
    if rt.policy.ok:
        return ok(cid, f"{config.policy_listen} answers ({rt.policy.detail})")
    return fail(cid, f"{config.policy_listen}: {rt.policy.detail}",
                f"systemctl start milterd   (or: milterd run -c {config.source})")


def check_socketmap(config: "Config", rt: RuntimeFacts) -> Check:
    cid = "milterd.socketmap"
    if not config.send_entries:
        return ok(cid, "no send partners")
    if config.socketmap_listen is None:
        return fail(cid, "send partners but no [socketmap] listen",
                    '[socketmap] listen = "127.0.0.1:10041"   (milterd.toml)')
    bad = [f"{d}: {p.detail}" for d, p in rt.socketmap if not p.ok]
    if bad:
        return fail(cid, f"{config.socketmap_listen}: " + "; ".join(bad),
                    f"systemctl start milterd   (or: milterd run -c {config.source})")
    return ok(cid, f"{config.socketmap_listen}: " + "; ".join(
        f"{d} -> {p.detail}" for d, p in rt.socketmap))


def check_metrics(config: "Config", rt: RuntimeFacts) -> Check:
    cid = "milterd.metrics"
    if config.metrics_listen is None or rt.metrics is None:
        return ok(cid, "[metrics] listen is not set")
    if rt.metrics.ok:
        return ok(cid, f"http://{config.metrics_listen}/metrics {rt.metrics.detail}")
    return fail(cid, f"http://{config.metrics_listen}/metrics: {rt.metrics.detail}",
                f"systemctl start milterd   (or: milterd run -c {config.source})")


def socketmap_probe_domain(entry: str) -> str:
    """The name to ask for a send entry: the domain itself, or a host under a ``.parent``."""
    return f"doctor-probe{entry}" if entry.startswith(".") else entry


def judge_socketmap_answer(answer: str) -> Probe:
    if answer.startswith("OK "):
        policy = answer[3:]
        if policy.split()[0] in ("secure", "verify", "dane-only", "fingerprint"):
            return Probe(True, policy)
        return Probe(False, f"answered {policy!r}: not a mandatory verified policy")
    return Probe(False, f"answered {answer!r}")


def milterd_checks(config: "Config", rt: RuntimeFacts) -> list[Check]:
    return [check_certificates(config, rt), check_milter(config, rt), check_policy(config, rt),
            check_socketmap(config, rt), check_metrics(config, rt)]
