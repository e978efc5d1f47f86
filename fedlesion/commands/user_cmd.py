"""`fedlesion user add NAME [--admin]`: create a web page account (there are no default credentials, design.md §6);
an admin may also install pending model versions."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("user", help="manage the web page's accounts")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = actions.add_parser("add", help="create an account (scrypt hash in <data_dir>/users.sqlite3)")
    add.add_argument("name", metavar="NAME", help="user name: letters, digits, '.', '_' or '-'")
    add.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin (no prompt)"
    )
    add.add_argument("--admin", action="store_true", help="the account may install pending model versions")
    add.set_defaults(func=run_add)
    listing = actions.add_parser("list", help="print the account names")
    listing.set_defaults(func=run_list)


def _store(args: argparse.Namespace):
    from fedlesion.settings import load_settings
    from inference.web.auth import UserStore

    settings = load_settings(Path(args.config) if args.config else None)
    return UserStore(settings.storage.data_dir)


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if password != getpass.getpass("Repeat: "):
        raise ValueError("the two passwords differ")
    return password


def run_add(args: argparse.Namespace) -> int:
    from inference.web.auth import check_user_name

    check_user_name(args.name)
    password = _read_password(args.password_stdin)
    store = _store(args)
    try:
        store.add_user(args.name, password, admin=args.admin)
    finally:
        store.close()
    print(f"{'admin' if args.admin else 'user'} {args.name} added")
    return 0


def run_list(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        for name in store.user_names():
            print(f"{name} (admin)" if store.is_admin(name) else name)
    finally:
        store.close()
    return 0
