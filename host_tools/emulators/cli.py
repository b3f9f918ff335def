"""`dgc-host bench`: run a bench house for a board config, and inject faults into a running one.

The fault commands talk to the running house over its control socket (``bench_control``): by
default ``<dgr port>.control`` from the same board config, so ``dgc-host bench house FILE`` in one
terminal and ``dgc-host bench fault FILE --dgr link_cut`` in another need no other argument.

Exit status: 0 done; 1 the bench house is not running or failed; 2 bad input (arguments, board
config, a fault the emulator refuses), always with one line on stderr naming what was wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .dgr_emulator import FAULT_KINDS as DGR_KINDS

ALL_KINDS = "all"


class _OneLineParser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr naming the command and the problem, exit status 2.

    Unrecognised arguments are caught here too (argparse would leave them to the top-level
    parser, which prints its whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


class _Failed(Exception):
    """One line for stderr and the exit status."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _control_path(args: argparse.Namespace) -> Path:
    if args.control:
        return Path(args.control)
    from firmware.config import ConfigError, load_config

    from .bench_control import control_path_for

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        raise _Failed(str(exc), 2) from None
    return control_path_for(config.dgr.port)


def _send(args: argparse.Namespace, command: dict) -> dict:
    from .bench_control import BenchNotRunning, ControlError, request

    path = _control_path(args)
    try:
        answer = request(path, command, timeout_s=args.timeout)
    except BenchNotRunning as exc:
        raise _Failed(str(exc), 1) from None
    except ControlError as exc:
        raise _Failed(str(exc), 1) from None
    if not answer.get("ok"):
        status = 2 if answer.get("code") == "bad_command" else 1
        raise _Failed(f"the bench house refused: {answer.get('error', answer)}", status)
    return answer


def _run(args: argparse.Namespace, action) -> int:
    try:
        return action(args)
    except _Failed as exc:
        print(f"dgc-host bench {args.bench_command}: {exc}", file=sys.stderr)
        return exc.status


# --- house -----------------------------------------------------------------------------------------

def cmd_house(args: argparse.Namespace) -> int:
    from firmware.config import ConfigError

    from .bench_control import ControlError
    from .bench_house import serve_forever

    try:
        return serve_forever(args.config, control_path=args.control)
    except ConfigError as exc:
        print(f"dgc-host bench house: {exc}", file=sys.stderr)
        return 2
    except ControlError as exc:
        print(f"dgc-host bench house: {exc}", file=sys.stderr)
        return 1


# --- fault -----------------------------------------------------------------------------------------

def _value(text: str) -> Any:
    """--set values: JSON if they parse (numbers, true, null, lists), else the plain string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def fault_spec(args: argparse.Namespace) -> dict:
    """The fault object to send, from the options that were given (and only those)."""
    kind = args.dgr if args.dgr else args.meter[1]
    spec: dict[str, Any] = {"kind": kind}
    for option, key in (("count", "count"), ("delay_ms", "delay_ms"), ("duration_ms", "duration_ms"),
                        ("which", "which"), ("verb", "verb"), ("ratio", "ratio")):
        value = getattr(args, option)
        if value is not None:
            spec[key] = value
    if args.code is not None:
        spec["code"] = int(args.code) if args.code.isdigit() else args.code
    for item in args.set or []:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise _Failed(f"--set {item!r}: expected KEY=VALUE, e.g. --set ratio=0.2", 2)
        spec[key] = _value(text)
    return spec


def cmd_fault(args: argparse.Namespace) -> int:
    def action(args: argparse.Namespace) -> int:
        spec = fault_spec(args)
        if args.dgr:
            from .dgr_emulator import FaultSpecError, parse_fault

            try:
                parse_fault(spec)  # the same check the emulator makes: bad input is exit 2 even offline
            except FaultSpecError as exc:
                raise _Failed(str(exc), 2) from None
            command = {"target": "dgr", "fault": spec}
        else:
            command = {"target": "meter", "meter": args.meter[0], "fault": spec}
        answer = _send(args, command)
        if args.json:
            print(json.dumps(answer))
        else:
            where = "dgr" if args.dgr else f"meter {answer.get('meter')} (unit {answer.get('unit_id')})"
            print(f"{where}: injected {spec['kind']}; active: {_describe_active(answer.get('active'))}")
        return 0

    return _run(args, action)


def _describe_active(active) -> str:
    if not active:
        return "none"
    if isinstance(active, list):
        return ", ".join(_describe_one(a) for a in active)
    return json.dumps(active, separators=(",", ":"))


def _describe_one(fault) -> str:
    if not isinstance(fault, dict):
        return str(fault)
    rest = ",".join(f"{k}={v}" for k, v in fault.items() if k != "kind" and v is not None)
    return f"{fault.get('kind')}({rest})" if rest else str(fault.get("kind"))


# --- clear -----------------------------------------------------------------------------------------

def cmd_clear(args: argparse.Namespace) -> int:
    def action(args: argparse.Namespace) -> int:
        command: dict[str, Any] = {"cmd": "clear"}
        if args.dgr is not None and args.meter is not None:
            raise _Failed("--dgr and --meter: expected at most one (neither clears everything)", 2)
        if args.dgr is not None:
            command["target"] = "dgr"
            if args.dgr != ALL_KINDS:
                command["kind"] = args.dgr
        elif args.meter is not None:
            command.update(target="meter", meter=args.meter)
        if args.counters:
            if args.dgr is not None:
                raise _Failed("--counters: only for meters (it undoes a meter's counter_reset)", 2)
            command["counters"] = True
        answer = _send(args, command)
        if args.json:
            print(json.dumps(answer))
        else:
            print(f"cleared: {', '.join(answer.get('cleared', [])) or 'nothing'}"
                  + (f"; dgr still active: {_describe_active(answer['dgr_active'])}" if answer.get("dgr_active") else ""))
        return 0

    return _run(args, action)


# --- status ----------------------------------------------------------------------------------------

def cmd_status(args: argparse.Namespace) -> int:
    def action(args: argparse.Namespace) -> int:
        answer = _send(args, {"cmd": "status"})
        if args.json:
            print(json.dumps(answer))
            return 0
        dgr = answer.get("dgr", {})
        print(f"bench house {answer.get('house')} up {answer.get('uptime_s')} s")
        print(f"dgr   mode={dgr.get('mode')} link={'CUT' if dgr.get('link_cut') else 'ok'} session={dgr.get('session')} "
              f"faults={','.join(dgr.get('faults', [])) or '-'} export_wh={dgr.get('export_wh')} "
              f"import_wh={dgr.get('import_wh')} hb_timeout_ms={dgr.get('hb_timeout_ms')}")
        for t in dgr.get("transfers", []):
            print(f"      transfer trade={t['trade_id']} {t['direction']} {t['power_w']} W until {t['end_at']}: "
                  f"{t['moved_wh']:.1f}/{t['energy_wh']} Wh")
        print(f"      injected: {_describe_active(dgr.get('injected'))}")
        counters = dgr.get("counters", {})
        print("      counters: " + (" ".join(f"{k}={v}" for k, v in sorted(counters.items())) or "-"))
        for m in answer.get("meters", []):
            extra = " ".join(f"{k}={json.dumps(m[k], separators=(',', ':'))}" for k in ("faults", "faults_applied") if m.get(k))
            print(f"meter {m['name']} ({m['model']}, unit {m['unit_id']} on {m['bus']}): requests={m['requests']} "
                  f"answers={m['answers']}" + (f" {extra}" if extra else ""))
        return 0

    return _run(args, action)


# --- parser ----------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="FILE", help="the board config the bench house was started with")
    p.add_argument("--control", metavar="PATH",
                   help="the house's control socket (default: the config's [dgr] port + '.control')")
    p.add_argument("--json", action="store_true", help="print the bench house's answer as one JSON line")
    p.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait for the answer (default 5)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, found {text!r}")
    return value


def cmd_flash(args: argparse.Namespace) -> int:
    from . import mpy_build

    argv = ["deploy", "--out", args.out, "--device", args.port]
    if args.board_json:
        if not Path(args.board_json).is_file():
            print(f"dgc-host bench flash: --board-json {args.board_json}: expected an existing board.json file", file=sys.stderr)
            return 2
        argv += ["--config", args.board_json]
    if args.dry_run:
        argv.append("--dry-run")
    return mpy_build.main(argv)


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    bench_sub = parser.add_subparsers(dest="bench_command", metavar="ACTION", required=True,
                                      parser_class=_OneLineParser)

    p = bench_sub.add_parser(
        "house",
        help="emulate a whole house for a board config: meters (Modbus RTU) and DGR on virtual serial lines "
        "linked at the config's ports, fed by a load/PV/battery model from its [sim] table; runs until Ctrl-C",
        description="Emulate a whole house for a board config until Ctrl-C or SIGTERM: Modbus RTU meters and the "
        "DGR on virtual serial lines linked at the config's ports, and a control socket for fault injection "
        "(see `dgc-host bench fault --help` and docs/bench-faults.md).",
    )
    p.add_argument("config", metavar="FILE", help="board config (TOML), e.g. board_configs/sim.toml")
    p.add_argument("--control", metavar="PATH",
                   help="where to listen for control commands (default: the config's [dgr] port + '.control')")
    p.set_defaults(func=cmd_house)

    p = bench_sub.add_parser(
        "flash",
        help="compile the MicroPython bench-board emulators with mpy-cross and deploy them to an RP2040 with mpremote",
        description="Compile the bench-board emulators (Modbus RTU meter slave and DGR router, "
        "host_tools/emulators/micropython/) with mpy-cross, write the board's board.json (meters on UART0 with the "
        "RS-485 driver-enable on GP2, DGR on UART1), copy both to the RP2040 on --port with mpremote, set its clock "
        "to UTC and reset it. Wiring: docs/bench-boards.md.",
    )
    p.add_argument("--port", required=True, metavar="PORT",
                   help="the board's USB serial device, e.g. /dev/serial/by-id/usb-MicroPython_Board_in_FS_mode_...-if00")
    p.add_argument("--board-json", metavar="FILE", help="board.json to deploy (default: written for the standard wiring)")
    p.add_argument("--out", default="build/bench-board", metavar="DIR", help="build directory (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="build and print the mpremote command without running it")
    p.set_defaults(func=cmd_flash)

    p = bench_sub.add_parser(
        "fault",
        help="inject a fault into a running bench house's DGR or one of its meters",
        description="Inject a fault into a running bench house (started with `dgc-host bench house FILE`). "
        "DGR kinds: dropped_frame [--count N] [--which request|answer]; delay --delay-ms D [--count N]; "
        "bad_checksum [--count N]; error_reply --code C [--count N] [--verb VERB] (answer with NAK C, not "
        "executed); fault --code NAME (latched, RESUME clears it); stuck_in_fault --code NAME (RESUME does not "
        "clear it until `bench clear`); reboot; link_cut [--duration-ms D] (nothing in or out until cleared). "
        "Meter kinds are the meter emulator's (see docs/bench-faults.md). Example: "
        "dgc-host bench fault board.toml --dgr error_reply --code 35 --verb START",
    )
    _common(p)
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--dgr", metavar="KIND", choices=DGR_KINDS, help=f"a DGR fault: {', '.join(DGR_KINDS)}")
    target.add_argument("--meter", nargs=2, metavar=("NAME", "KIND"),
                        help="a fault of the meter NAME (a [[meter]] name of the config), e.g. --meter house fail_ratio")
    p.add_argument("--count", type=_positive_int, metavar="N", help="how many frames/requests it applies to")
    p.add_argument("--code", metavar="C",
                   help="error_reply: a NAK code (e.g. 35) or name (CAPACITY); fault/stuck_in_fault: a fault name "
                   "(e.g. overtemp); meters: a Modbus exception code")
    p.add_argument("--delay-ms", type=_positive_int, metavar="D", help="delay: milliseconds added before each answer")
    p.add_argument("--duration-ms", type=_positive_int, metavar="D", help="link_cut: restore by itself after D ms")
    p.add_argument("--which", choices=("request", "answer"),
                   help="dropped_frame: lose the request (not executed) or the answer (executed); default answer")
    p.add_argument("--verb", metavar="VERB", help="error_reply: only requests with this verb, e.g. START")
    p.add_argument("--ratio", type=float, metavar="R", help="meters: the share of requests affected, 0..1")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="any other key of the fault object (value parsed as JSON if it can be); repeatable")
    p.set_defaults(func=cmd_fault)

    p = bench_sub.add_parser(
        "clear",
        help="remove injected faults from a running bench house (all, the DGR's, or one meter's)",
        description="Remove injected fault causes from a running bench house. What the router latched because "
        "of them (safe mode, a latched fault) stays until the DGC sends RESUME or HELLO, as on real hardware; "
        "a cut link is restored.",
    )
    _common(p)
    p.add_argument("--dgr", nargs="?", const=ALL_KINDS, metavar="KIND", choices=(ALL_KINDS, *DGR_KINDS),
                   help="only the DGR's faults (or only one KIND of them)")
    p.add_argument("--meter", metavar="NAME", help="only this meter's faults")
    p.add_argument("--counters", action="store_true",
                   help="also undo a meter's counter_reset (by default a reset meter stays reset, like a real one)")
    p.set_defaults(func=cmd_clear)

    p = bench_sub.add_parser(
        "status",
        help="show a running bench house: router mode, transfers, counters, meter traffic, faults in force",
        description="Show a running bench house: router mode and transfers, energy counters, injected faults "
        "and what they did, meter request/answer counts.",
    )
    _common(p)
    p.set_defaults(func=cmd_status)

    from host_tools.community.cli import add_bench_command  # issue 8: the trading benchmark

    add_bench_command(bench_sub)
