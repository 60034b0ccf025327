"""``milterd`` command line: run, check-config, partners, default-config, cert …, tlsrpt, demo."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="milterd", description=(
        "Plugin-based milter and policy daemon: Domain Security for Postfix and Sendmail."))
    from milterd import __version__

    parser.add_argument("--version", action="version", version=f"milterd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("-c", "--config", help="TOML config file (default: the embedded default)")
    p.add_argument("--log-format", choices=("text", "json"), default=None,
                   help="override [log] format")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("check-config", help="validate a config file (exit 2 listing every error)")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=_cmd_check_config)

    p = sub.add_parser("partners", help="print the effective terms of every partner "
                       "(lists, [partners] tables and defaults merged) and the certificates "
                       "last seen from it; `partners pin DOMAIN`: its pin lines")
    p.add_argument("-c", "--config", help="TOML config file (default: the embedded default)")
    p.add_argument("--json", action="store_true", help="JSON instead of TOML tables")
    p.add_argument("--no-store", action="store_true",
                   help="the terms only: do not read the certificate history from [store] url")
    p.add_argument("what", nargs="*", metavar="pin DOMAIN",
                   help="pin DOMAIN: print the pin lines of the certificates last seen from "
                        "DOMAIN (inbound and outbound), for its pins = [...]")
    p.set_defaults(func=_cmd_partners)

    p = sub.add_parser("default-config", help="print the embedded default config")
    p.set_defaults(func=_cmd_default_config)

    p = sub.add_parser("demo", help="live demo: Domain Security end to end on loopback")
    p.add_argument("--keep", action="store_true", help="keep the demo's work directory")
    p.add_argument("--mta", choices=("reference", "postfix"), default="reference",
                   help="reference: two reference MTAs, both directions (default); "
                        "postfix: a private Postfix in every TLS case (needs root)")
    p.set_defaults(func=_cmd_demo)

    for module in ("milterd.certs.cli", "milterd.outbound.tlsrpt_cli", "milterd.store.cli",
                   "milterd.doctor.cli"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError:
            continue
        register = getattr(mod, "register", None)
        if register is not None:
            register(sub)
    return parser


def _cmd_run(args: argparse.Namespace) -> int:
    from milterd.core.daemon import run

    return run(args.config, log_format=args.log_format)


def _load(path: str | None):
    """The config at ``path``, or None after printing every error (the caller exits 2)."""
    from milterd.core.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return None


def _cmd_check_config(args: argparse.Namespace) -> int:
    from milterd.core.app import App, build_dispatcher

    config = _load(args.config)
    if config is None:
        return 2
    try:
        build_dispatcher(App(config), config)
    except Exception as exc:
        print(f"{args.config}: plugins: {exc}", file=sys.stderr)
        return 2
    from milterd.core.partners import partner_notes

    for note in partner_notes(config):
        print(f"{args.config}: {note}", file=sys.stderr)
    print(f"{args.config}: OK")
    return 0


def _cmd_partners(args: argparse.Namespace) -> int:
    from milterd.core.partners import (load_history, render_partners, render_partners_seen,
                                       render_pins)

    config = _load(args.config)
    if config is None:
        return 2

    what = list(args.what or [])
    if what and (what[0] != "pin" or len(what) != 2):
        print("usage: milterd partners [-c CONFIG] [--json] | milterd partners [-c CONFIG] "
              "pin DOMAIN", file=sys.stderr)
        return 2
    if args.no_store and not what:
        sys.stdout.write(render_partners(config, as_json=args.json))
        return 0
    history, note = load_history(config)
    if what:
        if history is None:
            print(f"milterd partners pin: {note}", file=sys.stderr)
            return 2
        text, status = render_pins(config, what[1], history)
        (sys.stdout if status == 0 else sys.stderr).write(text)
        return status
    sys.stdout.write(render_partners_seen(config, history, note, as_json=args.json))
    return 0


def _cmd_default_config(args: argparse.Namespace) -> int:
    from milterd.core.config import default_config_text

    sys.stdout.write(default_config_text())
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from milterd.lab.demo import main as demo_main

    return demo_main(keep=args.keep, mta=args.mta)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
