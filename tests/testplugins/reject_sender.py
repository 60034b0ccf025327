"""Rejects MAIL FROM <blocked@…> with 550 5.7.1; everything else continues."""

from milterd.hookspecs import hookimpl
from milterd.verdict import reject


@hookimpl
def milterd_mail_from(message):
    if message.sender.strip("<>").lower().startswith("blocked@"):
        return reject("Sender blocked by test policy", reason="test_blocked")
    return None
