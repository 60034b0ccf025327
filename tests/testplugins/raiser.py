"""Raises at end of message when the Subject contains "boom" (a buggy third-party plugin)."""

from milterd.hookspecs import hookimpl


@hookimpl
def milterd_end_of_message(message):
    if any("boom" in v for v in message.header_values("Subject")):
        raise RuntimeError("test plugin exploded")
    return None
