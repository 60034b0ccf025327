"""``milterd doctor``: pure checks over parsed MTA and milterd facts (``postfix``, ``sendmail``,
``milterd_checks``), the I/O that gathers those facts (``gather``), and the command (``cli``)."""

from milterd.doctor.model import FAIL, OK, WARN, Check, exit_code, summary

__all__ = ["Check", "OK", "WARN", "FAIL", "exit_code", "summary"]
