"""One bounded readiness check for the lab and the tests: poll until a predicate holds, never a
fixed sleep."""

from __future__ import annotations

import time
from typing import Callable, TypeVar, Union

T = TypeVar("T")

#: The longest pause between two polls; the first polls come quicker (exponential back-off).
MAX_INTERVAL = 0.1


def wait_until(predicate: Callable[[], T], timeout: float = 15.0,
               what: Union[str, Callable[[], str]] = "condition", *,
               interval: float = MAX_INTERVAL) -> T:
    """Call ``predicate`` until it returns a truthy value and return that value.

    Polls with a short back-off growing to ``interval`` seconds at the most. After ``timeout``
    seconds raises AssertionError naming ``what`` (a string, or a callable giving one, evaluated
    only on timeout, e.g. a log tail) and the predicate's last value.
    """
    deadline = time.monotonic() + timeout
    delay = min(0.005, interval)
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            name = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout:g}s waiting for {name} "
                                 f"(last value: {value!r})")
        time.sleep(min(delay, left))
        delay = min(delay * 2, interval)
