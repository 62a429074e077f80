"""Command line: `run`, `validate`, `render`, `schema`.

Every ordinary mistake (a missing file, no cluster, no nginx) ends in one line that says
what to do, and exit status 1; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from proxyctl.backend import Backend, parse_endpoints
from proxyctl.config import Config, ConfigError, check_file, holds_config, read_config, read_text
from proxyctl.nginx import NginxError, stream_module

DISTRIBUTION = "proxyctl-sidecar"
DEFAULT_CONFIG = "/etc/proxyctl/proxyctl.yaml"
DEFAULT_STATE_DIR = "/var/run/proxyctl"
YAML_SUFFIXES = (".yaml", ".yml")


class CliError(Exception):
    """An ordinary mistake in how proxyctl was started; the message says what to do."""


def schema() -> dict[str, object]:
    """The JSON Schema of the config file, as committed in schema/."""
    document = Config.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "proxyctl configuration", **document}


def cmd_schema(args: argparse.Namespace) -> int:
    print(json.dumps(schema(), indent=2, sort_keys=True))
    return 0


def _yaml_files(paths: Sequence[str]) -> Iterator[Path]:
    """The named files, and the `*.yaml`/`*.yml` files under the named directories.

    A directory with none is yielded itself, for `validate` to report.
    """
    for name in paths:
        path = Path(name)
        found = sorted(p for p in path.rglob("*") if p.suffix in YAML_SUFFIXES and p.is_file()) \
            if path.is_dir() else []
        yield from found or [path]


def cmd_validate(args: argparse.Namespace) -> int:
    failed = False
    for path in _yaml_files(args.paths):
        if path.is_dir():
            print(f"{path}: no *.yaml or *.yml file in it", file=sys.stderr)
            failed = True
            continue
        try:
            text = read_text(path)
        except ConfigError as exc:  # unreadable, too large, not UTF-8
            print(exc, file=sys.stderr)
            failed = True
            continue
        if not holds_config(text, str(path)):
            print(f"{path}: skipped, not a proxyctl config or a manifest holding one")
            continue
        problems = check_file(text, str(path))
        for problem in problems:
            print(problem, file=sys.stderr)
        failed |= bool(problems)
        if not problems:
            print(f"{path}: ok")
    return 1 if failed else 0


def _nginx_stream_module(binary: str) -> str | None:
    try:
        return stream_module(binary)
    except FileNotFoundError:
        raise CliError(f"nginx ({binary}) is not installed or not on PATH: install nginx and "
                       "libnginx-mod-stream, or pass --nginx") from None
    except NginxError as exc:
        raise CliError(str(exc)) from None


def _read_endpoints(name: str) -> dict[str, list[Backend]]:
    try:
        return parse_endpoints(YAML(typ="safe").load(read_text(Path(name), f"--endpoints {name}")), name)
    except ConfigError as exc:  # unreadable, too large, not UTF-8
        raise CliError(str(exc)) from None
    except (YAMLError, RecursionError) as exc:
        raise CliError(f"--endpoints {name}: not YAML: {exc}".replace("\n", " ")) from None
    except ValueError as exc:
        raise CliError(f"--endpoints {exc}") from None


def cmd_render(args: argparse.Namespace) -> int:
    import jinja2

    from proxyctl.kube import ApiError, NoCluster
    from proxyctl.render import render

    config = read_config(Path(args.config), os.environ)
    module = _nginx_stream_module(args.nginx)
    if args.endpoints:
        endpoints = _read_endpoints(args.endpoints)
    else:
        from proxyctl.discovery import list_endpoints

        try:
            endpoints = list_endpoints(config, os.environ)
        except NoCluster as exc:
            raise CliError(f"{exc}; or pass --endpoints FILE to render without a cluster") from None
        except (ApiError, RuntimeError) as exc:
            raise CliError(f"cannot list the pods: {exc}; pass --endpoints FILE to render without a cluster"
                           .replace("\n", " ")) from None
    template = _template(args.template)
    try:
        text = render(config, endpoints, Path(args.state_dir), module, template)
    except jinja2.TemplateError as exc:  # e.g. a variable the template names that render() does not give
        raise CliError(f"--template {args.template}: {exc}") from None
    sys.stdout.write(text)
    return 0


def _template(name: str | None) -> Path | None:
    """`--template`, checked now: a missing file or a syntax error is one line, not a traceback later."""
    import jinja2

    if name is None:
        return None
    try:
        jinja2.Environment().parse(Path(name).read_text(encoding="utf-8"), filename=name)
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"--template {name}: {getattr(exc, 'strerror', None) or exc}") from None
    except jinja2.TemplateSyntaxError as exc:
        raise CliError(f"--template {name}:{exc.lineno}: {exc.message}") from None
    return Path(name)


def _writable(directory: Path) -> str | None:
    """Why nginx could not write its config, pid and temp files in `directory`, or None when it can."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def _state_dir(state_dir: Path) -> Path:
    """`state_dir`; for the default, a private directory in the temp dir when it cannot be written.

    `docker|podman run --read-only --tmpfs /var/run/proxyctl` mounts a tmpfs owned by root
    with the image directory's mode less the umask (1755), so user 10001 cannot write there.
    """
    problem = _writable(state_dir)
    if problem is None:
        return state_dir
    if state_dir == Path(DEFAULT_STATE_DIR):
        try:
            fallback = Path(tempfile.mkdtemp(prefix="proxyctl-"))
        except OSError:
            pass
        else:
            print(f"proxyctl run: state dir {state_dir} is not writable ({problem}); using {fallback}",
                  file=sys.stderr)
            return fallback
    raise CliError(f"state dir {state_dir} is not writable ({problem}): mount a writable volume there "
                   "(an emptyDir, or --tmpfs DIR:mode=1777), or pass --state-dir")


def _check_identity(env: Mapping[str, str]) -> None:
    """The node comes from NODE_NAME, or from reading our own pod, which needs its name."""
    if not any(env.get(k) for k in ("NODE_NAME", "MY_POD_NAME", "POD_NAME", "HOSTNAME")):
        raise CliError("cannot tell this pod's node: set NODE_NAME (in a pod, from the downward API's "
                       "spec.nodeName)")


def cmd_run(args: argparse.Namespace) -> int:
    from proxyctl.kube import Api, NoCluster
    from proxyctl.sidecar import run

    config = read_config(Path(args.config), os.environ)  # a mistake in it comes first, located
    _nginx_stream_module("nginx")
    template = _template(args.template)
    state_dir = _state_dir(Path(args.state_dir))
    try:
        Api(os.environ)
    except NoCluster as exc:
        raise CliError(str(exc)) from None
    _check_identity(os.environ)
    return run(Path(args.config), config, state_dir, template, os.environ)


def _version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where the help already says what happens without it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxyctl", description=__doc__.split("\n\n")[0],
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    config_file = os.environ.get("PROXYCTL_CONFIG") or DEFAULT_CONFIG

    def command(name: str, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)

    run = command("run", "the sidecar: discover, render, run and reload nginx, serve health")
    run.add_argument("--config", default=config_file, help="config file ($PROXYCTL_CONFIG sets the default)")
    run.add_argument("--template", help="jinja2 nginx template (default: the one shipped in the package)")
    run.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="writable dir for nginx.conf, pid, temp files")
    run.set_defaults(handler=cmd_run)

    validate = command("validate", "check config files or ConfigMap manifests; directories are searched for "
                                   "*.yaml and *.yml; exit 1 on errors")
    validate.add_argument("paths", nargs="+", metavar="PATH", help="file or directory")
    validate.set_defaults(handler=cmd_validate)

    render = command("render", "print the nginx config that would run")
    render.add_argument("--config", default=config_file, help="config file ($PROXYCTL_CONFIG sets the default)")
    render.add_argument("--endpoints", metavar="FILE",
                        help="YAML {route: [ip:port, ...]} to use instead of listing pods in the cluster")
    render.add_argument("--template", help="jinja2 nginx template (default: the one shipped in the package)")
    render.add_argument("--state-dir", default=DEFAULT_STATE_DIR, help="state dir written into the config")
    render.add_argument("--nginx", default="nginx", help="nginx binary, asked whether stream is a dynamic module")
    render.set_defaults(handler=cmd_render)

    command("schema", "print the JSON Schema of the config file").set_defaults(handler=cmd_schema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
    except CliError as exc:
        print(f"proxyctl {args.command}: {exc}", file=sys.stderr)
    except BrokenPipeError:  # `proxyctl schema | head`: nothing more can be written there
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as exc:  # a directory given as a file, a file that cannot be read
        print(f"proxyctl {args.command}: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
