"""Per-message cost of deciding coverage (the pure part on milterd's hot path), in one run.

    .venv/bin/python bench/coverage_bench.py [--messages N] [--rounds R]

Compares, on the same generated messages (every sender and From: value distinct, so no memo
helps), milterd's coverage (:mod:`milterd.policy.coverage`: every reading, no parser) with the reading
it replaced (one RFC 5321 envelope domain, a regex fast path for plain From: values and
``email.utils.getaddresses`` for the rest), and with the fixed cost of building the plugin's
Message value.  Prints microseconds per message (median of rounds) and the ratio new/old for:
plain mail (``Name <local@domain>``), mail with comments/quotes/encoded words, and 8-bit mail.
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from email.utils import getaddresses

from milterd.policy import coverage
from milterd.policy.names import address_domain, domain_listed

RECEIVE = ("woodgrovebank.test", ".woodgrovebank.test", "contoso.test")

# The reading milterd used before coverage.py (kept here only to measure against).
_SIMPLE_FROM = re.compile(
    r"[ \t]*(?:(?:[A-Za-z0-9][A-Za-z0-9 \t._-]*)?<([A-Za-z0-9._+=-]+@[A-Za-z0-9.-]+)>"
    r"|([A-Za-z0-9._+=-]+@[A-Za-z0-9.-]+))[ \t]*")


def old_covered(sender: str, froms: list[str]) -> list[str]:
    out = []
    d = address_domain(sender)
    if d and domain_listed(d, RECEIVE):
        out.append(d)
    simple = _SIMPLE_FROM.fullmatch(froms[0]) if len(froms) == 1 else None
    if simple is not None:
        domains = [address_domain(simple.group(1) or simple.group(2))]
    else:
        domains = [address_domain(a) for _n, a in getaddresses(froms) if a]
    for d in domains:
        if d and domain_listed(d, RECEIVE) and d not in out:
            out.append(d)
    return out


def new_covered(sender: str, froms: list[str]) -> tuple[str, ...]:
    env = coverage.envelope_covered(sender, RECEIVE)
    return env + tuple(d for d in coverage.from_covered(froms, RECEIVE) if d not in env)


def messages(kind: str, n: int, salt: int) -> list[tuple[str, list[str]]]:
    out = []
    for i in range(n):
        u = f"user{salt}x{i}"
        if kind == "plain":
            out.append((f"<{u}@fabrikam.test>", [f"Alice Example <{u}@fabrikam.test>"]))
        elif kind == "hostile":
            out.append((f'<"{u} x"@fabrikam.test>',
                        [f'"Example, Alice" (team {i}) <{u}@fabrikam.test>, '
                         f"=?utf-8?q?B=C3=B6b?= <b{u}@example.test>"]))
        else:
            out.append((f"<{u}@fabrikam.test>", [f"Jürgen Müller <{u}@bücher.test>"]))
    return out


def per_message_us(fn, batch) -> float:
    coverage._value_domains_cached.cache_clear()
    start = time.perf_counter()
    for sender, froms in batch:
        fn(sender, froms)
    return (time.perf_counter() - start) / len(batch) * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print(f"{'kind':8} {'old us/msg':>10} {'new us/msg':>10} {'new/old':>8}")
    for kind in ("plain", "hostile", "8bit"):
        old, new = [], []
        for r in range(args.rounds):  # alternate, fresh values every round: no memo helps
            old.append(per_message_us(old_covered, messages(kind, args.messages, 2 * r)))
            new.append(per_message_us(new_covered, messages(kind, args.messages, 2 * r + 1)))
        o, n = statistics.median(old), statistics.median(new)
        print(f"{kind:8} {o:10.1f} {n:10.1f} {n / o:8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
