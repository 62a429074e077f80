"""Command line: `run`, `validate`, `render`, `schema` (DESIGN.md §3)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from ruamel.yaml import YAML

from proxyctl.backend import parse_endpoints
from proxyctl.config import Config, ConfigError, check_file, holds_config, read_config, read_text

DEFAULT_CONFIG = "/etc/proxyctl/proxyctl.yaml"
DEFAULT_STATE_DIR = "/var/run/proxyctl"


def schema() -> dict[str, object]:
    """The JSON Schema of the config file, as committed in schema/."""
    document = Config.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "proxyctl configuration", **document}


def _config_path(arg: str | None) -> Path:
    return Path(arg or os.environ.get("PROXYCTL_CONFIG") or DEFAULT_CONFIG)


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(schema(), indent=2, sort_keys=True))
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for name in args.paths:
        path = Path(name)
        try:
            text = read_text(path, name)
        except ConfigError as exc:  # unreadable, too large, not UTF-8
            print(exc, file=sys.stderr)
            failed = True
            continue
        problems = check_file(text, name)
        for problem in problems:
            print(problem, file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            print(f"{name}: ok" if holds_config(text) else f"{name}: skipped, no proxyctl config in it")
    return 1 if failed else 0


def cmd_render(args: argparse.Namespace) -> int:
    from proxyctl.nginx import stream_module
    from proxyctl.render import render

    config = read_config(_config_path(args.config), os.environ)
    if args.endpoints:
        endpoints = parse_endpoints(YAML(typ="safe").load(Path(args.endpoints).read_text()), args.endpoints)
    else:
        from proxyctl.discovery import list_endpoints

        endpoints = list_endpoints(config, os.environ)
    module = stream_module(args.nginx) if args.nginx else None
    sys.stdout.write(render(config, endpoints, Path(args.state_dir), module, args.template and Path(args.template)))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from proxyctl.sidecar import run

    return run(_config_path(args.config), Path(args.state_dir), args.template and Path(args.template), os.environ)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="proxyctl", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="the sidecar: discover, render, run and reload nginx, serve health")
    run.add_argument("--config", help=f"config file (default: $PROXYCTL_CONFIG or {DEFAULT_CONFIG})")
    run.add_argument("--template", help="jinja2 nginx template (default: the shipped one)")
    run.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="writable dir for nginx.conf, pid, temp files")
    run.set_defaults(handler=cmd_run)

    validate = commands.add_parser("validate", help="check config files or ConfigMap manifests (exit 1 on errors)")
    validate.add_argument("paths", nargs="+", metavar="PATH")
    validate.set_defaults(handler=cmd_validate)

    render = commands.add_parser("render", help="print the nginx config that would run")
    render.add_argument("--config", help=f"config file (default: $PROXYCTL_CONFIG or {DEFAULT_CONFIG})")
    render.add_argument("--endpoints", metavar="FILE", help="YAML {route: [ip:port, ...]} instead of the cluster")
    render.add_argument("--template", help="jinja2 nginx template (default: the shipped one)")
    render.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="state dir written into the config")
    render.add_argument("--nginx", default="nginx", help="nginx binary, asked whether stream is a dynamic module")
    render.set_defaults(handler=cmd_render)

    commands.add_parser("schema", help="print the JSON Schema of the config file").set_defaults(handler=cmd_schema)

    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
