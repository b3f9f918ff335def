"""`dgc release ...`: the board's own decisions about releases (verify, key rotation, revocation).

Why a board command: the board, not the engineer's laptop, is the authority over what it runs.
`dgc-host flash` uploads a bundle and then runs `dgc release verify` from the board's *running*
release (firmware/bundle.py); the key statements are checked here against the key pinned on
this board. Messages name keys by their public half only; no secret is ever read here.

Exit status: 0 accepted / done; 1 operational failure; 2 refused (one line saying why).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


def _root_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", default="/", help="filesystem prefix, for tests and SD card images (default /)")


def cmd_release(args: argparse.Namespace, config: None) -> int:
    from . import bundle

    try:
        if args.release_command == "verify":
            _, line = bundle.verify_on_board(Path(args.root), Path(args.bundle), board_kind=args.board_kind,
                                             allow_downgrade=args.force_downgrade, installed=not args.not_installed)
        elif args.release_command == "rotate-key":
            line = bundle.TrustStore.load(Path(args.root)).rotate(Path(args.statement).read_bytes(), args.statement)
        elif args.release_command == "revoke-key":
            line = bundle.TrustStore.load(Path(args.root)).revoke(Path(args.statement).read_bytes(), args.statement)
        else:
            raise AssertionError(args.release_command)
    except bundle.BundleRefused as exc:
        print(f"dgc release {args.release_command}: refused: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:
        print(f"dgc release {args.release_command}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(line)
    return EXIT_OK


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `dgc release` on the board CLI's sub-parsers (firmware/cli.py)."""
    release = sub.add_parser("release", help="verify a bundle on the board; rotate or revoke the release key")
    rsub = release.add_subparsers(dest="release_command", metavar="ACTION", required=True)
    p = rsub.add_parser("verify", help="verify an uploaded bundle against the key pinned on this board (exit 2: refused)")
    p.add_argument("bundle", metavar="DIR", help="the uploaded release directory (or a bundle, with --not-installed)")
    p.add_argument("--board-kind", help="the board's kind, when it has no config yet")
    p.add_argument("--force-downgrade", action="store_true", help="accept a release older than the running one")
    p.add_argument("--not-installed", action="store_true", help="DIR is a bare bundle (no venv/, board.toml, installed.json)")
    _root_arg(p)
    p = rsub.add_parser("rotate-key", help="pin a new release key, by a statement signed with the pinned key")
    p.add_argument("statement", metavar="FILE")
    _root_arg(p)
    p = rsub.add_parser("revoke-key", help="revoke a release key, by a statement signed by it or by the pinned key")
    p.add_argument("statement", metavar="FILE")
    _root_arg(p)
    release.set_defaults(func=cmd_release, needs_config=False)
