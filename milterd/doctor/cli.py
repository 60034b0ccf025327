"""``milterd doctor``: check a live MTA's Domain Security wiring and say exactly what to fix.

``milterd doctor [-c FILE] [--postfix-config DIR] [--sendmail-cf FILE] [--json]`` prints one line
per check (ok / warn / FAIL) with the line to fix, then a summary; exit 0 all ok, 1 warnings,
2 failures.  Without ``--sendmail-cf`` it reads the system's Postfix (``postconf`` without
``-c``) unless ``--postfix-config`` names another instance; with ``--sendmail-cf`` alone only
Sendmail is checked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from milterd.doctor.model import FAIL, WARN, Check, exit_code, fail, ok, summary

DEFAULT_CONFIG = "/etc/milterd/milterd.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor", help="check the MTA's Domain Security wiring (Postfix/Sendmail) and milterd; "
                       "exit 0 ok, 1 warnings, 2 failures")
    p.add_argument("-c", "--config", help=f"milterd config (default: {DEFAULT_CONFIG} if it "
                                          "exists, else the embedded default)")
    p.add_argument("--postfix-config", metavar="DIR",
                   help="Postfix config directory (postconf -c DIR; default: the system's)")
    p.add_argument("--sendmail-cf", metavar="FILE", help="Sendmail's .cf to check")
    p.add_argument("--json", action="store_true", help="JSON: {checks: [...], summary: {...}}")
    p.set_defaults(func=cmd_doctor)


def run_checks(config_path: str | None, postfix_config: str | None,
               sendmail_cf: str | None, *, postfix: bool | None = None) -> list[Check]:
    """Every check, in output order.  ``postfix`` None: check Postfix unless only a Sendmail .cf
    was given."""
    from milterd.core.config import ConfigError, load_config
    from milterd.doctor import gather
    from milterd.doctor.milterd_checks import milterd_checks
    from milterd.doctor.postfix import postfix_checks
    from milterd.doctor.sendmail import sendmail_checks

    if postfix is None:
        postfix = postfix_config is not None or sendmail_cf is None
    if config_path is None and os.path.exists(DEFAULT_CONFIG):
        config_path = DEFAULT_CONFIG
    checks: list[Check] = []
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return [fail("milterd.config", "; ".join(exc.errors),
                     f"milterd check-config -c {config_path}")]
    checks.append(ok("milterd.config", f"{config.source} loads ({len(config.partners)} "
                                       f"partners: {len(config.receive_entries)} receive, "
                                       f"{len(config.send_entries)} send)"))
    rt = gather.gather_runtime(config)
    macros = dict(rt.milter_macros) if rt.milter_macros is not None else None
    if postfix:
        try:
            pf = gather.gather_postfix(postfix_config, config)
        except gather.GatherError as exc:
            checks.append(fail("postfix.config", str(exc)))
        else:
            checks.append(ok("postfix.config", f"Postfix {pf.get('mail_version')}, "
                                               f"{pf.get('config_directory')}"))
            checks += postfix_checks(pf, config, macros)
    if sendmail_cf:
        try:
            sf = gather.gather_sendmail(sendmail_cf)
        except gather.GatherError as exc:
            checks.append(fail("sendmail.config", str(exc)))
        else:
            checks.append(ok("sendmail.config", f"{sendmail_cf}"))
            checks += sendmail_checks(sf, config)
    checks += milterd_checks(config, rt)
    return checks


def render_text(checks: list[Check]) -> str:
    width = max(len(c.id) for c in checks)
    lines = []
    for c in checks:
        label = {FAIL: "FAIL", WARN: "warn"}.get(c.status, "ok")
        lines.append(f"{label:<4}  {c.id:<{width}}  {c.message}")
        if c.fix:
            lines.append(f"{'':<4}  {'':<{width}}  fix: {c.fix}")
    s = summary(checks)
    lines.append(f"{len(checks)} checks: {s['ok']} ok, {s['warn']} warnings, "
                 f"{s['fail']} failures")
    return "\n".join(lines) + "\n"


def render_json(checks: list[Check]) -> str:
    return json.dumps({"checks": [c.as_dict() for c in checks], "summary": summary(checks)},
                      indent=2) + "\n"


def cmd_doctor(args: argparse.Namespace) -> int:
    checks = run_checks(args.config, args.postfix_config, args.sendmail_cf)
    sys.stdout.write(render_json(checks) if args.json else render_text(checks))
    return exit_code(checks)


def main(argv: list[str] | None = None) -> int:
    """``python -m milterd.doctor.cli`` (before the subcommand is registered in milterd.cli)."""
    parser = argparse.ArgumentParser(prog="milterd")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["doctor", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
