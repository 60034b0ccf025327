"""``milterd store``: the shared store's schema, for admins.

- ``milterd store migrate [-c FILE]`` creates or upgrades the schema of ``[store] url`` (milterd
  does the same when it starts; this is for admins who prefer to run it by hand, e.g. before
  rolling a new version out to the fleet).  Safe to run on several hosts at once.
- ``milterd store status [-c FILE]`` prints the schema version and the rows per table.

Exit status: 0 done / up to date; 1 (status) the schema needs ``migrate``; 2 the config is
invalid, the store is unreachable or its schema is newer than this milterd.  The url is printed
without its password.
"""

from __future__ import annotations

import argparse
import os
import sys

#: Used when ``-c`` is not given and this file exists; otherwise the embedded default.
DEFAULT_CONFIG = "/etc/milterd/milterd.toml"


def register(subparsers: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    """Add the ``store`` command (sub-commands ``migrate`` and ``status``)."""
    p = subparsers.add_parser(
        "store", help="the shared store ([store] url): migrate the schema, show its status",
        description="The store holding what a fleet of milterd hosts shares (TLS-RPT records, "
                    "the MTA-STS cache, report-sending state): SQLite on one host, PostgreSQL "
                    "for several.")
    sub = p.add_subparsers(dest="store_command", metavar="SUBCOMMAND", required=True)
    for name, func, text in (
            ("migrate", _cmd_migrate, "create or upgrade the store's schema (idempotent; safe "
                                      "on several hosts at once)"),
            ("status", _cmd_status, "schema version and rows per table")):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("-c", "--config", default=None,
                       help=f"TOML config file (default: {DEFAULT_CONFIG} if it exists, else "
                            "the embedded default)")
        s.set_defaults(func=func)
    return p


def _open(args: argparse.Namespace):
    from milterd.core.config import ConfigError, load_config
    from milterd.store.api import StoreError, open_store, redact

    path = args.config
    if path is None and os.path.exists(DEFAULT_CONFIG):
        path = DEFAULT_CONFIG
    try:
        config = load_config(path)
    except ConfigError as exc:
        for e in exc.errors:
            print(e, file=sys.stderr)
        return None
    url = config.store.url
    print(f"store: {redact(url)}")
    try:
        return open_store(url)
    except StoreError as exc:
        print(f"milterd store: {exc}", file=sys.stderr)
        return None


def _unreachable(exc: Exception) -> int:
    print(f"milterd store: the store is unreachable or refused: {exc}", file=sys.stderr)
    return 2


def _cmd_migrate(args: argparse.Namespace) -> int:
    from milterd.store.api import SCHEMA_VERSION, StoreError

    store = _open(args)
    if store is None:
        return 2
    try:
        before = store.schema_version()
        print(f"schema version before: {before} (this milterd: {SCHEMA_VERSION})")
        after = store.migrate()
        print(f"schema version after: {after}"
              + (" (already up to date)" if after == before else ""))
        return 0
    except StoreError as exc:
        return _unreachable(exc)
    finally:
        store.close()


def _cmd_status(args: argparse.Namespace) -> int:
    from milterd.store.api import SCHEMA_VERSION, StoreError

    store = _open(args)
    if store is None:
        return 2
    try:
        version = store.schema_version()
        print(f"schema version: {version} (this milterd: {SCHEMA_VERSION})")
        if version > SCHEMA_VERSION:
            print("milterd store: the schema is newer than this milterd: upgrade milterd",
                  file=sys.stderr)
            return 2
        if version == 0:
            print("no schema yet: run `milterd store migrate` (or start milterd)")
            return 1
        counts = getattr(store, "counts", None)
        if counts is not None:
            for table, n in counts().items():
                print(f"{table}: {n}")
        if version < SCHEMA_VERSION:
            print("schema older than this milterd: run `milterd store migrate`")
            return 1
        return 0
    except StoreError as exc:
        return _unreachable(exc)
    finally:
        store.close()
