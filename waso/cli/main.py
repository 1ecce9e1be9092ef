"""`waso`: the entry point of every waso process and tool."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING

from waso.cli.connection import CliError, Cluster

if TYPE_CHECKING:
    from waso.logs import LogFormat


def _operator(args: argparse.Namespace) -> int:
    from waso.operator.config import ConfigError, load_config

    try:
        config = load_config()
    except ConfigError as error:
        print(f"waso operator: {error}", file=sys.stderr)
        return 2
    import kopf

    from waso.operator import handlers  # registers the handlers

    if args.namespace:
        os.environ[handlers.NAMESPACES_ENV] = ",".join(args.namespace)

    _logging(args.verbose, log_format=config.log_format)
    logging.getLogger("waso.operator").info("configuration: max_sessions=%d", config.max_sessions)
    kopf.run(
        # Standalone: with kopf peering, a paused standby would still run waso's controller loop
        # (it is not a kopf handler); waso elects its leader on a Lease (waso.operator.leadership).
        standalone=True,
        clusterwide=True,  # tenant patterns filter the events: see waso.operator.handlers
        liveness_endpoint=args.liveness,
    )
    return 0


def _runtime(args: argparse.Namespace) -> int:
    import asyncio

    from pydantic import ValidationError

    from waso.session_runtime.config import RuntimeConfig

    try:
        config = RuntimeConfig()  # from WASO_* variables
    except ValidationError as error:
        problems = "\n  ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in error.errors())
        print(f"waso runtime: invalid configuration:\n  {problems}", file=sys.stderr)
        return 2
    _logging(args.verbose, tenant=config.namespace, log_format=config.log_format)
    from waso.session_runtime.main import serve

    asyncio.run(serve(config))
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from waso.simulator.server import run

    _logging(args.verbose)
    run(args.host, args.port, qr_interval=args.qr_interval, auto_pair=args.auto_pair, first_device=args.first_device)
    return 0


def _cluster(args: argparse.Namespace) -> Cluster:
    return Cluster(args.kubeconfig, args.context)


def _status(args: argparse.Namespace) -> int:
    from waso.cli.status import main

    namespace = None if args.all_namespaces else args.namespace
    return main(_cluster(args), namespace, args.session, args.output)


def _legacy_scan(args: argparse.Namespace) -> int:
    from waso.legacy.command import scan_command

    return scan_command(args.directory, args.mapping, args.output, args.write_manifests)


def _legacy_import(args: argparse.Namespace) -> int:
    from waso.legacy.importer import import_command

    return import_command(args.directory, args.store_dir, args.phone)


def _repair(args: argparse.Namespace) -> int:
    from waso.cli.repair import main

    return main(_cluster(args), args.words, args.backup)


def _pair(args: argparse.Namespace) -> int:
    from waso.cli.pair import main

    return main(_cluster(args), args.session, url=args.url, service_account=args.service_account, token=args.token,
                code=args.code, invert=args.invert)  # fmt: skip


def _evict(args: argparse.Namespace) -> int:
    from waso.cli.evict import main

    return main(_cluster(args), args.command, args.session)


def _migrate(args: argparse.Namespace) -> int:
    from waso.cli import migrate

    if args.migrate_command == "plan":
        return migrate.plan_command(args.tenant, args.output)
    if args.migrate_command == "apply":
        return migrate.apply_command(args.tenant, args.all, args.yes, args.delay, args.state, args.log_dir)
    return migrate.rollback_command(args.tenant, args.yes, args.state, args.log_dir)


def _logging(verbose: bool, *, tenant: str | None = None, log_format: LogFormat = "text") -> None:
    from waso import logs

    logs.configure(logging.DEBUG if verbose else logging.INFO, tenant=tenant, log_format=log_format)


def build_parser(prog: str = "waso") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="WhatsApp Session Operator")
    commands = parser.add_subparsers(dest="command", required=True)
    # kubectl's flags for which cluster, on every command that talks to one.
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--kubeconfig", help="the kubeconfig file (default: KUBECONFIG, then ~/.kube/config)")
    cluster.add_argument("--context", help="the kubeconfig context to use (default: its current context)")

    operator = commands.add_parser(
        "operator", help="run the operator (configuration: WASO_CONFIG file, WASO_* variables)"
    )
    operator.add_argument(
        "-n", "--namespace", action="append", help="watch only these namespaces (glob patterns); default: all"
    )
    operator.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("-v", "--verbose", action="store_true")
    operator.set_defaults(handler=_operator)

    runtime = commands.add_parser("runtime", help="run a session runtime (the container command of session pods)")
    runtime.add_argument("-v", "--verbose", action="store_true")
    runtime.set_defaults(handler=_runtime)

    simulator = commands.add_parser("simulator", help="run the WhatsApp sandbox")
    simulator.add_argument("--host", default="127.0.0.1")
    simulator.add_argument("--port", type=int, default=8090)
    simulator.add_argument("--qr-interval", type=float, default=20.0, help="seconds before a QR code rotates")
    simulator.add_argument(
        "--auto-pair", type=float, default=None, metavar="SECONDS", help="scan every QR code after SECONDS (demos)"
    )
    simulator.add_argument("--first-device", type=int, default=1, help="first device number of each account")
    simulator.add_argument("-v", "--verbose", action="store_true")
    simulator.set_defaults(handler=_simulator)

    repair = commands.add_parser(
        "repair",
        parents=[cluster],
        help="ask for a repair (back up, reset, re-pair) or, with `rollback`, a restore of a session's credentials",
        usage="waso repair NAMESPACE/NAME | waso repair rollback NAMESPACE/NAME [--backup ID]",
    )
    repair.add_argument("words", nargs="+", metavar="[rollback] NAMESPACE/NAME")
    repair.add_argument("--backup", help="with rollback: the backup to restore (default: the latest)")
    repair.set_defaults(handler=_repair)

    for command, text in (
        ("evict", "park a session now, credentials kept, until `waso resume` (annotation waso.dev/evict)"),
        ("suspend", "stop a session and release its slot (spec.suspend: true)"),
        ("resume", "bring a suspended (spec.suspend) or evicted (annotation waso.dev/resume) session back"),
    ):
        parser_ = commands.add_parser(command, help=text, parents=[cluster])
        parser_.add_argument("session", metavar="NAMESPACE/NAME")
        parser_.set_defaults(handler=_evict)

    pair = commands.add_parser(
        "pair", parents=[cluster], help="draw the session's QR code in the terminal until a phone links it"
    )
    pair.add_argument("session", metavar="NAMESPACE/NAME")
    pair.add_argument("--code", action="store_true", help="pair by phone number: print the code to enter instead")
    pair.add_argument(
        "--service-account", default="app", metavar="NAME",
        help="the tenant's ServiceAccount whose 10-minute token calls the runtime (default: app)",
    )  # fmt: skip
    pair.add_argument("--token", help="a token for the audience waso instead (also WASO_TOKEN)")
    pair.add_argument("--url", help="the runtime's base URL, instead of a port-forward to its session pod")
    pair.add_argument("--invert", action="store_true", help="dark modules as blocks (light terminals)")
    pair.set_defaults(handler=_pair)

    _migrate_parser(commands)

    status = commands.add_parser("status", help="report tenants and sessions", parents=[cluster])
    status.add_argument("session", nargs="?", help="only this session (with -n)")
    status.add_argument("-n", "--namespace", help="only this tenant; default: all")
    status.add_argument("-A", "--all-namespaces", action="store_true", help="every tenant (the default)")
    status.add_argument("-o", "--output", choices=("text", "json", "yaml"), default="text")
    status.set_defaults(handler=_status)

    legacy = commands.add_parser(
        "legacy", help="the legacy Baileys gateway: scan its credential directories, import one"
    )
    legacy_commands = legacy.add_subparsers(dest="legacy_command", required=True, metavar="COMMAND")
    scan = legacy_commands.add_parser(
        "scan", help="judge <DIR>/<phone>/creds.json per phone and count them per company (exit 0 with findings)"
    )
    scan.add_argument("directory", metavar="DIR", help="the tree of Baileys multi-file auth directories")
    scan.add_argument(
        "--mapping", required=True, metavar="FILE", help="phone to company: .csv (phone,company) or .yaml/.yml"
    )
    scan.add_argument("-o", "--output", choices=("text", "json"), default="text")
    scan.add_argument(
        "--write-manifests", metavar="OUT", help="write <namespace>.yaml per company (Namespace, WhatsAppSessions)"
    )
    scan.set_defaults(handler=_legacy_scan)
    legacy_import = legacy_commands.add_parser(
        "import",
        help="write a session's whatsmeow.db from <phone>/creds.json, to connect as the same device without a scan",
    )
    legacy_import.add_argument("directory", metavar="CREDS_DIR", help="one Baileys auth directory, holding creds.json")
    legacy_import.add_argument(
        "--store-dir", required=True, metavar="DIR", help="the session's store directory; whatsmeow.db must not exist"
    )
    legacy_import.add_argument("--phone", help="the phone (+E.164) when CREDS_DIR is not named after it")
    legacy_import.set_defaults(handler=_legacy_import)
    return parser


def _migrate_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    migrate = commands.add_parser(
        "migrate", help="repair broken device identities tenant by tenant: plan, apply (resumable), rollback"
    )
    migrate_commands = migrate.add_subparsers(dest="migrate_command", required=True, metavar="COMMAND")
    files = argparse.ArgumentParser(add_help=False)
    files.add_argument("--state", default="waso-migrate-state.json", metavar="FILE", help="the migration's state")
    files.add_argument("--log-dir", default="waso-migrate-logs", metavar="DIR", help="<DIR>/<tenant>.log")

    plan = migrate_commands.add_parser("plan", help="per tenant: the unhealthy sessions and what would happen")
    plan.add_argument("--tenant", action="append", metavar="NS", help="only this tenant (repeatable); default: all")
    plan.add_argument("-o", "--output", choices=("table", "json"), default="table")

    apply = migrate_commands.add_parser(
        "apply", parents=[files], help="request the repairs tenant by tenant (a dry run unless --yes)"
    )
    which = apply.add_mutually_exclusive_group(required=True)
    which.add_argument("--tenant", action="append", metavar="NS", help="this tenant (repeatable)")
    which.add_argument("--all", action="store_true", help="every namespace with WhatsAppSessions")
    mode = apply.add_mutually_exclusive_group()
    mode.add_argument("--yes", action="store_true", help="really write the requests")
    mode.add_argument("--dry-run", action="store_true", help="print what would be done, change nothing (default)")
    apply.add_argument("--delay", type=float, default=5.0, metavar="SECONDS", help="between tenants (default 5)")

    rollback = migrate_commands.add_parser(
        "rollback", parents=[files], help="restore the latest backup of the sessions this migration repaired"
    )
    rollback.add_argument("--tenant", required=True, metavar="NS")
    rollback_mode = rollback.add_mutually_exclusive_group()
    rollback_mode.add_argument("--yes", action="store_true", help="really write the requests")
    rollback_mode.add_argument("--dry-run", action="store_true", help="change nothing (default)")
    migrate.set_defaults(handler=_migrate)


def main(argv: list[str] | None = None, prog: str = "waso") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return int(args.handler(args))
    except CliError as error:
        print(f"{prog} {args.command}: {error}", file=sys.stderr)
        return error.code
    except KeyboardInterrupt:
        return 130


def kubectl_main() -> int:
    """``kubectl waso ...``: kubectl runs ``kubectl-waso`` found on PATH (installed with the package)."""
    return main(prog="kubectl waso")


if __name__ == "__main__":
    sys.exit(main())
