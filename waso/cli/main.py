"""`waso`: the entry point of every waso process and tool."""

from __future__ import annotations

import argparse
import logging
import sys


def _operator(args: argparse.Namespace) -> int:
    from waso.operator.config import ConfigError, load_config

    try:
        config = load_config()
    except ConfigError as error:
        print(f"waso operator: {error}", file=sys.stderr)
        return 2
    import kopf

    import waso.operator.handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    logging.getLogger("waso.operator").info("configuration: max_sessions=%d", config.max_sessions)
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        liveness_endpoint=args.liveness,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="waso", description="WhatsApp Session Operator")
    commands = parser.add_subparsers(dest="command", required=True)

    operator = commands.add_parser(
        "operator", help="run the operator (configuration: WASO_CONFIG file, WASO_* variables)"
    )
    operator.add_argument(
        "-n", "--namespace", action="append", help="watch only these namespaces (glob patterns); default: all"
    )
    operator.add_argument("--peering", help="kopf peering name: run several replicas, one active (default: standalone)")
    operator.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    operator.add_argument("--liveness", help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("-v", "--verbose", action="store_true")
    operator.set_defaults(handler=_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
