"""`dgc`: the board's command. Every command takes the board config file.

Exit status: 0 ok, 1 operational failure (a meter did not answer, ...), 2 bad input (invalid
config, unusable key file, wrong arguments) with one line on stderr saying what and where.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import BoardConfig, ConfigError, check_state_dir, load_config
from .logsetup import configure_logging

DEFAULT_CONFIG = "board_configs/sim.toml"
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit status 2."""


def _config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "config",
        nargs="?",
        default=os.environ.get("DGC_CONFIG", DEFAULT_CONFIG),
        metavar="FILE",
        help=f"board config (TOML); default $DGC_CONFIG or {DEFAULT_CONFIG}",
    )


def _key_path(args: argparse.Namespace, config: BoardConfig) -> Path:
    return Path(args.key_file) if args.key_file else config.board.key_file


def cmd_check_config(args: argparse.Namespace, config: BoardConfig) -> int:
    check_state_dir(config)  # what `dgc run` needs beyond parsing: nothing it accepts may fail there
    meters = ", ".join(f"{m.name}={m.model}@{m.bus}:{m.unit_id}" for m in config.meters)
    print(
        f"{config.path}: ok (board {config.board.name}, kind {config.board.kind}; "
        f"slots {config.market.slot_seconds}s x {config.market.markets_ahead}; meters {meters})"
    )
    return EXIT_OK


def cmd_keygen(args: argparse.Namespace, config: BoardConfig) -> int:
    from .keystore import generate_key_file

    path = _key_path(args, config)
    key = generate_key_file(path)
    print(f"created {path} (mode 0600)")
    print(f"public_key {key.public_key.hex()}")
    print(f"device_id {key.device_id}")
    return EXIT_OK


def cmd_pubkey(args: argparse.Namespace, config: BoardConfig) -> int:
    from .keystore import load_key_file

    key = load_key_file(_key_path(args, config))
    if args.json:
        print(json.dumps({"public_key": key.public_key.hex(), "device_id": key.device_id}))
    else:
        print(f"public_key {key.public_key.hex()}")
        print(f"device_id {key.device_id}")
    return EXIT_OK


def cmd_meter_read(args: argparse.Namespace, config: BoardConfig) -> int:
    from .drivers.meter import MeterReadError, MeterSet

    names = [m.name for m in config.meters]
    if args.meter and args.meter not in names:
        raise UsageError(f"--meter {args.meter}: expected one of {', '.join(names)}")
    wanted = [args.meter] if args.meter else names
    failed = False

    def show_frames(exchange) -> None:
        """--raw: each request and its answer as they happen, before the decoded reading."""
        if args.json:
            print(json.dumps({"frame": exchange.as_dict()}, sort_keys=True), flush=True)
        else:
            for line in exchange.describe():
                print(line, flush=True)

    with MeterSet.from_config(config, frame_trace=show_frames if args.raw else None) as meters:
        for name in wanted:
            try:
                reading = meters.read(name)
            except MeterReadError as exc:
                failed = True
                print(f"{name}: unavailable: {exc}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps(reading.as_dict(), sort_keys=True))
            else:
                print(reading.describe())
    return EXIT_FAILED if failed else EXIT_OK


# glibc gives each thread that allocates its own malloc arena (up to 8 per core), and each
# arena keeps freed memory in its own pool: ~0.5 MiB of resident memory for nothing with the
# daemon's threads (bench/idle_footprint.py). glibc reads MALLOC_ARENA_MAX only at process start,
# so it is set by whoever starts the daemon: systemd/dgc.service (Environment=MALLOC_ARENA_MAX=2)
# and the demo/test launchers (host_tools/neighbourhood.py). `dgc run` no longer re-executes
# itself to set it: the re-exec delayed the first router frame of a restart (issue 7 o).
MALLOC_ARENA_MAX = "2"


def cmd_run(args: argparse.Namespace, config: BoardConfig) -> int:
    check_state_dir(config, create=True)  # before the control socket and the journal are made in it
    from .journal import JournalSchemaError
    from .scheduler.daemon import run_daemon

    try:
        return run_daemon(config, key_path=_key_path(args, config))
    except JournalSchemaError as exc:  # a journal of a newer release (A/B rollback): one line, exit 2
        raise UsageError(str(exc)) from None


def cmd_status(args: argparse.Namespace, config: BoardConfig) -> int:
    """Ask the running daemon through its control socket; exit 1 (and say so) if none answers."""
    from .scheduler.control import ControlUnavailable, request
    from .scheduler.status import format_answer

    try:
        answer = request(config.control_socket_path, {"cmd": args.show}, timeout_s=args.timeout)
    except ControlUnavailable as exc:
        print(f"dgc: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not answer.get("ok"):
        print(f"dgc: the daemon refused {args.show!r}: {answer.get('error')}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps(answer[args.show], sort_keys=True))
    else:
        print("\n".join(format_answer(answer)))
    return EXIT_OK


def cmd_rollback(args: argparse.Namespace, config: None) -> int:
    """Board-side rollback (dgc-rollback.service); needs no board config, which may be what broke."""
    from .rollback import main as rollback_main

    return rollback_main(["--root", args.root, "--dgc-dir", args.dgc_dir, *(["--dry-run"] if args.dry_run else [])])


def cmd_identity(args: argparse.Namespace, config: BoardConfig) -> int:
    """Answer a provisioning host's challenge: public key, device id, signature (never the secret)."""
    from .identity import IdentityError, answer_challenge, parse_challenge
    from .keystore import load_key_file

    try:
        challenge = parse_challenge(args.challenge)
    except IdentityError as exc:
        raise UsageError(f"--challenge: {exc}") from None
    path = _key_path(args, config)
    answer = answer_challenge(load_key_file(path), challenge)
    if args.json:
        print(json.dumps({**answer, "key_file": str(path)}, sort_keys=True))
    else:
        for name in ("public_key", "device_id", "signature"):
            print(f"{name} {answer[name]}")
    return EXIT_OK


def cmd_selftest(args: argparse.Namespace, config: BoardConfig) -> int:
    """Health check of this release on this board: one line per check; exit 0 all passed, 1 otherwise."""
    from .selftest import run_selftest

    checks = run_selftest(config, key_path=_key_path(args, config), allow_missing_key=args.allow_missing_key)
    for check in checks:
        print(check.line(), flush=True)
    failed = [c.name for c in checks if not c.ok]
    print(f"selftest: {'failed: ' + ', '.join(failed) if failed else f'all {len(checks)} checks passed'}")
    return EXIT_FAILED if failed else EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgc",
        description="Digital grid controller firmware: reads meters, bids, delivers and reports energy trades.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check-config", help="validate a board config; exit 2 with one line naming the problem")
    _config_arg(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("keygen", help="create the device key (0600, atomic); refuses to overwrite one")
    _config_arg(p)
    p.add_argument("--key-file", help="key path (default: [board] key_file of the config)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("pubkey", help="print the device's public key and device id")
    _config_arg(p)
    p.add_argument("--key-file", help="key path (default: [board] key_file of the config)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_pubkey)

    meter = sub.add_parser("meter", help="meter commands")
    meter_sub = meter.add_subparsers(dest="meter_command", metavar="ACTION", required=True)
    p = meter_sub.add_parser("read", help="read the configured meters once")
    _config_arg(p)
    p.add_argument("--meter", help="only this meter (a [[meter]] name)")
    p.add_argument("--json", action="store_true", help="one JSON object per meter")
    p.add_argument("--raw", action="store_true",
                   help="also show every Modbus request and answer frame in hex, with timings in ms")
    p.set_defaults(func=cmd_meter_read)

    p = sub.add_parser("run", help="run the trading daemon (Ctrl-C or SIGTERM stops it cleanly)")
    _config_arg(p)
    p.add_argument("--key-file", help="key path (default: [board] key_file of the config)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="ask the running daemon (control socket) for its status; exit 1 if it is not running")
    _config_arg(p)
    p.add_argument("--json", action="store_true", help="the daemon's answer as one JSON object (or list)")
    p.add_argument("--show", choices=("status", "orders", "trades", "deliveries", "meters"), default="status",
                   help="what to show (default: status)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer (default 10)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("rollback", help="switch /opt/dgc/current back to the previous release (run by dgc-rollback.service)")
    p.add_argument("--root", default="/", help="filesystem prefix, for tests and images (default /)")
    p.add_argument("--dgc-dir", default="/opt/dgc", help="the install directory under the root (default /opt/dgc)")
    p.add_argument("--dry-run", action="store_true", help="say what would be switched, change nothing")
    p.set_defaults(func=cmd_rollback, needs_config=False)

    from .release_cli import add_parser as add_release_parser  # helper E: `dgc release verify|rotate-key|revoke-key`
    add_release_parser(sub)

    p = sub.add_parser("identity", help="prove possession of the device key: sign a provisioning challenge")
    _config_arg(p)
    p.add_argument("--challenge", required=True, metavar="HEX", help="the host's fresh challenge, 64 hex characters")
    p.add_argument("--key-file", help="key path (default: [board] key_file of the config)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser("selftest", help="health check: config, key, meters, DGR, ledger, clock, registration; exit 0/1")
    _config_arg(p)
    p.add_argument("--key-file", help="key path (default: [board] key_file of the config)")
    p.add_argument("--allow-missing-key", action="store_true",
                   help="pass the key check when no key file exists yet (a board not provisioned yet)")
    p.set_defaults(func=cmd_selftest)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .keystore import KeyFileError

    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = load_config(args.config) if getattr(args, "needs_config", True) else None
        return args.func(args, config)
    except (ConfigError, KeyFileError, UsageError) as exc:
        print(f"dgc: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
