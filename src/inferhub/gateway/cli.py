"""The gateway's subcommands of `inferhub`: accounts, keys, credit, usage and prices.

`register(subparsers)` adds `admin`, `keys`, `credit`, `usage` and `prices` to the main parser;
each leaf sets `func(args) -> int`. They work on the same database as the server (SQLite in
`--data-dir`, or `--database-url`), safely while it runs. Amounts are decimal currency units
(`12.5`), stored exactly as integer micro-units.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from inferhub.gateway import accounts
from inferhub.gateway.auth import hash_password, set_password
from inferhub.gateway.db import Database
from inferhub.gateway.factory import open_database
from inferhub.gateway.interface import GatewayError
from inferhub.gateway.money import format_amount, parse_amount
from inferhub.gateway.records import KeyLimits
from inferhub.gateway.sessions import end_account_sessions
from inferhub.gateway.usage import UsageFilter, usage_totals

Handler = Callable[[Database, argparse.Namespace], None]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", default="data", help="where the SQLite database lives")
    parser.add_argument("--database-url", help="postgresql://... instead of SQLite")


def _command(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            db = open_database(args.database_url, Path(args.data_dir))
        except Exception as exc:
            print(f"error: cannot open the database: {exc}", file=sys.stderr)
            return 1
        try:
            handler(db, args)
        except (GatewayError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            db.close()
        return 0

    return run


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(c) for c in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _since(text: str) -> datetime:
    """An ISO date/time (UTC if naive) or a relative `7d` / `24h`."""
    if text[-1:] in ("d", "h") and text[:-1].isdigit():
        unit = {"d": "days", "h": "hours"}[text[-1]]
        return datetime.now(UTC) - timedelta(**{unit: int(text[:-1])})
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- handlers ----------------------------------------------------------------------------------


def _prompt_password() -> str:
    """A console password typed twice at the terminal (never an argument: others could read
    the command line)."""
    first = getpass.getpass("Console password: ")
    if getpass.getpass("Again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _read_password(args: argparse.Namespace) -> str | None:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    return _prompt_password() if args.password else None


def _create_account(db: Database, args: argparse.Namespace) -> None:
    password = _read_password(args)
    password_hash = hash_password(password) if password is not None else None
    account = accounts.create_account(
        db, args.name, email=args.email, role=args.role, password_hash=password_hash
    )
    print(f"created account {account.name} ({account.id}), role {account.role}")
    if args.credit:
        entry = accounts.add_credit(
            db, account.id, parse_amount(args.credit), note="initial credit"
        )
        print(f"credit {format_amount(entry.amount_micros)}")
    if args.with_key:
        created = accounts.create_key(db, account.id, name="default")
        print(f"API key (shown only this once): {created.secret}")


def _set_password(db: Database, args: argparse.Namespace) -> None:
    account = accounts.find_account(db, args.account)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = _prompt_password()
    set_password(db, account.id, password)
    ended = end_account_sessions(db, account.id)
    print(f"console password of {account.name} set ({ended} console session(s) ended)")


def _keys_create(db: Database, args: argparse.Namespace) -> None:
    account = accounts.find_account(db, args.account)
    expires = None
    if args.expires_in_days is not None:
        expires = datetime.now(UTC) + timedelta(days=args.expires_in_days)
    created = accounts.create_key(
        db,
        account.id,
        name=args.name or "",
        allowed_models=[m for m in (args.models or "").split(",") if m],
        limits=KeyLimits(rpm=args.rpm, tpm=args.tpm, concurrency=args.concurrency),
        spend_cap_micros=parse_amount(args.spend_cap) if args.spend_cap else None,
        expires_at=expires,
    )
    print(f"created key {created.key.id} for {account.name}")
    print(f"API key (shown only this once): {created.secret}")


def _keys_list(db: Database, args: argparse.Namespace) -> None:
    account_id = accounts.find_account(db, args.account).id if args.account else None
    rows = [
        (
            k.id,
            k.prefix + "...",
            k.account_id,
            k.name,
            ",".join(k.allowed_models) or "*",
            f"{k.limits.rpm or '-'}/{k.limits.tpm or '-'}/{k.limits.concurrency or '-'}",
            "revoked" if k.revoked else "active",
            k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "never",
        )
        for k in accounts.list_keys(db, account_id)
    ]
    _table(("ID", "KEY", "ACCOUNT", "NAME", "MODELS", "RPM/TPM/CONC", "STATE", "LAST USED"), rows)


def _keys_revoke(db: Database, args: argparse.Namespace) -> None:
    key = accounts.revoke_key(db, args.key_id)
    print(f"revoked key {key.id} ({key.prefix}...)")


def _credit_add(db: Database, args: argparse.Namespace) -> None:
    account = accounts.find_account(db, args.account)
    kind = "credit" if args.amount.strip()[:1] != "-" else "adjustment"
    entry = accounts.add_credit(
        db, account.id, parse_amount(args.amount), note=args.note, kind=kind
    )
    print(
        f"{account.name}: {format_amount(entry.amount_micros)} added, "
        f"balance {format_amount(entry.balance_micros or 0)}"
    )


def _usage(db: Database, args: argparse.Namespace) -> None:
    f = UsageFilter(
        account_id=accounts.find_account(db, args.account).id if args.account else None,
        key_id=args.key,
        model=args.model,
        since=_since(args.since) if args.since else None,
    )
    groups = usage_totals(db, f, args.group_by)
    rows = [
        (g.group, g.requests, g.prompt_tokens, g.completion_tokens, format_amount(g.cost_micros))
        for g in groups
    ]
    title = (args.group_by or "total").upper()
    _table((title, "REQUESTS", "PROMPT", "COMPLETION", "COST"), rows)


def _prices_set(db: Database, args: argparse.Namespace) -> None:
    price = accounts.set_price(db, args.model, parse_amount(args.input), parse_amount(args.output))
    print(
        f"{price.model}: input {format_amount(price.input_micros_per_mtok)}, "
        f"output {format_amount(price.output_micros_per_mtok)} per million tokens"
    )


def _prices_list(db: Database, args: argparse.Namespace) -> None:
    rows = [
        (p.model, format_amount(p.input_micros_per_mtok), format_amount(p.output_micros_per_mtok))
        for p in accounts.list_prices(db)
    ]
    _table(("MODEL", "INPUT/1M", "OUTPUT/1M"), rows)


# -- the parser --------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the gateway's commands to the `inferhub` parser."""

    def leaf(
        parent: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        help: str,
        handler: Handler,
    ) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help)
        _common(parser)
        parser.set_defaults(func=_command(handler))
        return parser

    def group(name: str, help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        parser = subparsers.add_parser(name, help=help)
        return parser.add_subparsers(dest=f"{name}_command", required=True, metavar="COMMAND")

    admin = group("admin", "manage accounts")
    p = leaf(admin, "create-account", "create an account", _create_account)
    p.add_argument("name")
    p.add_argument("--email")
    p.add_argument("--role", choices=["user", "admin"], default="user")
    p.add_argument("--credit", help="initial credit, in currency units")
    p.add_argument("--with-key", action="store_true", help="also create a key and print it")
    p.add_argument("--password", action="store_true", help="prompt for a console password")
    p.add_argument("--password-stdin", action="store_true", help="read a console password")
    p = leaf(admin, "set-password", "set an account's console password", _set_password)
    p.add_argument("account", help="account id, name or email")
    p.add_argument("--password-stdin", action="store_true", help="read it from stdin, not a prompt")

    keys = group("keys", "manage API keys")
    p = leaf(keys, "create", "create a key (printed once)", _keys_create)
    p.add_argument("--account", required=True, help="account id, name or email")
    p.add_argument("--name")
    p.add_argument("--models", help="comma-separated models the key may use (default: all)")
    p.add_argument("--rpm", type=int, help="requests per minute")
    p.add_argument("--tpm", type=int, help="tokens per minute")
    p.add_argument("--concurrency", type=int, help="requests in flight")
    p.add_argument("--spend-cap", help="the most this key may spend, in currency units")
    p.add_argument("--expires-in-days", type=float)
    p = leaf(keys, "list", "list keys (never their secrets)", _keys_list)
    p.add_argument("--account", help="only this account's keys")
    p = leaf(keys, "revoke", "revoke a key", _keys_revoke)
    p.add_argument("key_id")

    credit = group("credit", "top up or adjust an account's credit")
    p = leaf(credit, "add", "add credit (negative: adjust down)", _credit_add)
    p.add_argument("account", help="account id, name or email")
    p.add_argument("amount", help="currency units, e.g. 10 or 0.25")
    p.add_argument("--note", default="")

    p = subparsers.add_parser("usage", help="tokens and cost of requests")
    _common(p)
    p.add_argument("--account")
    p.add_argument("--key", help="a key id")
    p.add_argument("--model")
    p.add_argument("--since", help="ISO date/time (UTC) or 7d / 24h")
    p.add_argument("--group-by", choices=["day", "model", "account", "key"])
    p.set_defaults(func=_command(_usage))

    prices = group("prices", "per-model prices per million tokens")
    p = leaf(prices, "set", "set a model's price ('*' is the default)", _prices_set)
    p.add_argument("model")
    p.add_argument("--input", required=True, help="currency units per million input tokens")
    p.add_argument("--output", required=True, help="currency units per million output tokens")
    leaf(prices, "list", "list prices", _prices_list)


def main(argv: list[str] | None = None) -> int:
    """Run one gateway command, as `inferhub` would (for tests and `python -m`)."""
    parser = argparse.ArgumentParser(prog="inferhub")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
