"""The configuration file: pydantic models, and a loader that locates every error.

`load_config` is a pure function from text to `Config`; it raises `ConfigError` carrying
*all* problems, each as `FILE:LINE:COL: routes[i].field: message`, so one CI run shows
everything wrong with a ConfigMap instead of one mistake per push.

A ConfigMap is shared by every pod that mounts it, so no input may cost more than a small
bounded amount of time and memory to reject, nor end in anything but a `ConfigError`.
"""

from __future__ import annotations

import difflib
import errno
import re
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Annotated, Any, Iterable, Iterator, Literal, Mapping

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.composer import Composer
from ruamel.yaml.events import AliasEvent
from ruamel.yaml.scalarstring import LiteralScalarString
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, SequenceNode

from proxyctl.backend import plain_ip
from proxyctl.selector import Selector, SelectorError, parse_selector, selector_from_mapping

CONFIGMAP_KEY = "proxyctl.yaml"

# Limits that bound what rejecting any input costs. ruamel reads YAML at some 30-40 KiB/s
# of dense input here, so a file is limited to 64 KiB (some 400 routes): a few seconds and
# 15 MB at worst. Aliases may repeat a value, so the values a file expands to are counted
# too; and only the first errors are listed.
MAX_FILE_BYTES = 64 * 1024
MAX_VALUES = 20_000
MAX_DEPTH = 32
MAX_NUMBER_LENGTH = 100  # digits of an integer: far beyond any port, and below Python's 4300
MAX_PROBLEMS = 20

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DURATION = re.compile(r"^([0-9]+)(ms|s|m|h)$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


# --- patterns for the JSON Schema: the loader accepts exactly what they match --------------


def _one_to(n: int) -> str:
    """A regex for the decimal numbers 1 to `n`, leading zeros allowed, as int() reads them."""
    digits = str(n)
    alternatives = [f"[1-9][0-9]{{0,{len(digits) - 2}}}"] if len(digits) > 1 else []
    for i, digit in enumerate(digits):  # same length as n: n's prefix, then a smaller digit, then any
        low, rest = (1 if i == 0 else 0), len(digits) - i - 1
        if int(digit) > low:
            alternatives.append(f"{digits[:i]}[{low}-{int(digit) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    return "0*(" + "|".join([*alternatives, digits]) + ")"


def _ipv6() -> str:
    """RFC 3986's IPv6address: every text form ipaddress accepts, without a zone."""
    h16, octet = "[0-9A-Fa-f]{1,4}", "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    ls32 = rf"({h16}:{h16}|{octet}(\.{octet}){{3}})"
    forms = [f"({h16}:){{6}}{ls32}", f"::({h16}:){{5}}{ls32}", f"({h16})?::({h16}:){{4}}{ls32}"]
    forms += [f"(({h16}:){{0,{i}}}{h16})?::({h16}:){{{3 - i}}}{ls32}" for i in (1, 2)]
    forms += [f"(({h16}:){{0,3}}{h16})?::{h16}:{ls32}", f"(({h16}:){{0,4}}{h16})?::{ls32}",
              f"(({h16}:){{0,5}}{h16})?::{h16}", f"(({h16}:){{0,6}}{h16})?::"]
    return "(" + "|".join(forms) + ")"


def _whole(pattern: str) -> str:
    """Anchored at both ends: `(?!\\n)` since Python's `$` (jsonschema uses `re`) matches before a final newline."""
    return f"^({pattern})$(?!\\n)"


_IPV4 = r"((25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
IP_PATTERN = _whole(f"{_IPV4}|{_ipv6()}")
HEALTH_PATTERN = _whole(f"({_IPV4}|\\[{_ipv6()}\\]|{_ipv6()}):{_one_to(65535)}")
DURATION_PATTERN = _whole(f"{_one_to(86_400_000)}ms|{_one_to(86_400)}s|{_one_to(1440)}m|{_one_to(24)}h")
DNS_LABEL_PATTERN = _whole("[a-z0-9]([-a-z0-9]*[a-z0-9])?")
PORT_NAME_PATTERN = _whole("([0-9]+-)*[0-9]*[a-z][a-z0-9]*(-[a-z0-9]+)*")  # single dashes, a letter somewhere


# --- field types -------------------------------------------------------------------


def _to_selector(value: Any) -> Selector:
    if isinstance(value, Selector):
        return value
    if isinstance(value, str):
        return parse_selector(value)
    if isinstance(value, Mapping):
        return selector_from_mapping(value)
    raise ValueError("must be a string like 'app=x' or a mapping with matchLabels/matchExpressions")


def _wrap_selector_error(value: Any) -> Selector:
    try:
        return _to_selector(value)
    except SelectorError as exc:
        raise ValueError(str(exc)) from None


# Label keys and values as selector.py checks them (a key's prefix may be at most 253 characters: not checked
# here). YAML numbers and booleans are read as the strings they spell.
_LABEL_NAME = "[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_LABEL_KEY = _whole(f"(([a-z0-9]([-a-z0-9]*[a-z0-9])?\\.)*[a-z0-9]([-a-z0-9]*[a-z0-9])?/)?{_LABEL_NAME}")
_LABEL_VALUE = {"type": ["string", "number", "boolean"], "pattern": _whole(f"({_LABEL_NAME})?")}

SelectorField = Annotated[
    Selector,
    PlainValidator(_wrap_selector_error),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "description": "Kubernetes label selector: 'a=b,c in (x,y),!d', or matchLabels/matchExpressions. "
                           "The string's syntax is checked by proxyctl validate, not by this schema",
            "oneOf": [
                {"type": "string", "minLength": 1},
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {"type": ["object", "null"], "propertyNames": {"pattern": _LABEL_KEY},
                                        "additionalProperties": _LABEL_VALUE},
                        "matchExpressions": {
                            "type": ["array", "null"],
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["key", "operator"],
                                "properties": {
                                    "key": {"type": ["string", "number", "boolean"], "pattern": _LABEL_KEY},
                                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                    "values": {"type": ["array", "null"], "items": _LABEL_VALUE},
                                },
                                "if": {"properties": {"operator": {"enum": ["In", "NotIn"]}}},
                                "then": {"required": ["values"], "properties": {"values": {"minItems": 1}}},
                                "else": {"properties": {"values": {"maxItems": 0}}},
                            },
                        },
                    },
                    "anyOf": [  # an empty selector would match every pod
                        {"required": ["matchLabels"], "properties": {"matchLabels": {"minProperties": 1}}},
                        {"required": ["matchExpressions"], "properties": {"matchExpressions": {"minItems": 1}}},
                    ],
                },
            ],
        }
    ),
]


MAX_DURATION = 86400.0


def parse_duration(value: Any) -> float:
    """`500ms`, `10s`, `5m`, `1h` → seconds (plain numbers are seconds), from 1 ms to 24 h."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        match = _DURATION.fullmatch(str(value))
        seconds = int(match.group(1)) * _UNITS[match.group(2)] if match else float("nan")
    if not 0.001 <= seconds <= MAX_DURATION:  # also false for NaN
        raise ValueError(f"must be a duration from 1ms to 24h like '500ms', '10s', '5m' or '1h', got {value!r}")
    return seconds


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    WithJsonSchema({"oneOf": [{"type": "string", "pattern": DURATION_PATTERN, "examples": ["500ms", "10s", "5m"]},
                              {"type": "number", "minimum": 0.001, "maximum": MAX_DURATION,
                               "description": "seconds"}]}),
]

Protocol = Annotated[
    Literal["udp", "tcp"],
    BeforeValidator(lambda value: value.lower() if value in ("UDP", "TCP") else value),  # Kubernetes' spelling
    WithJsonSchema({"enum": ["udp", "tcp", "UDP", "TCP"]}),
]

DnsLabel = Annotated[str, WithJsonSchema({"type": "string", "pattern": DNS_LABEL_PATTERN, "maxLength": 63})]


def _integral(value: Any) -> Any:
    """8125.0 as 8125: JSON, and so the JSON Schema, counts a number with no fraction as an integer."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


Port = Annotated[int, Field(ge=1, le=65535, strict=True), BeforeValidator(_integral)]


def _check_target_port(value: Any) -> int | str:
    """A port number, or a container port name (IANA_SVC_NAME) resolved per pod."""
    value = _integral(value)
    if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 65535:
        return value
    if isinstance(value, str) and (
        len(value) <= 15 and _PORT_NAME.fullmatch(value) and re.search("[a-z]", value) and "--" not in value
    ):
        return value
    raise ValueError(f"must be a port number (1-65535) or a container port name, got {value!r}")


TargetPort = Annotated[
    int | str,
    PlainValidator(_check_target_port),
    WithJsonSchema({"oneOf": [{"type": "integer", "minimum": 1, "maximum": 65535},
                              {"type": "string", "pattern": PORT_NAME_PATTERN, "maxLength": 15}]}),
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True)


# --- the models ----------------------------------------------------------------------


class Route(_Model):
    """One local port forwarded to the pods a selector picks."""

    model_config = ConfigDict(json_schema_extra={"allOf": [  # what _check_protocol_options says
        {"if": {"properties": {"protocol": {"enum": ["udp", "UDP"]}}},
         "then": {"properties": {"balance": {"not": {"const": "least_conn"}}}}},
        {"if": {"properties": {"protocol": {"enum": ["tcp", "TCP"]}}},
         "then": {"properties": {"udpResponses": {"const": 0}}}},
    ]})

    name: DnsLabel | None = Field(None, description="[a-z0-9-]; default '<protocol>-<port>'; unique")
    port: Port = Field(description="local listening port in the application's pod")
    protocol: Protocol
    selector: SelectorField
    namespace: DnsLabel | None = Field(None, description="namespace of the pods; default: the sidecar's own")
    target_port: TargetPort | None = Field(None, description="number or named container port; default: port")
    when_no_local_pod: Literal["reject", "anyNode"] = "reject"
    balance: Literal["round_robin", "least_conn", "hash"] = Field(
        "round_robin", description="hash: on the client's address and port, so each client socket stays on one "
        "backend (every client of the sidecar has the address 127.0.0.1)")
    udp_responses: Annotated[int, Field(ge=0, strict=True), BeforeValidator(_integral)] = 0
    timeout: Duration | None = Field(None, description="idle timeout, e.g. '10s'")
    drain_timeout: Duration = Field(30.0, description="after a change of this route, connections its old nginx "
                                                      "worker still holds are closed within this; default 30s")

    @field_validator("name", "namespace")
    @classmethod
    def _check_dns_label(cls, value: str | None) -> str | None:
        """Names and namespaces are DNS labels, as in Kubernetes; that also keeps nginx syntax out."""
        if value is not None and (len(value) > 63 or not _DNS_LABEL.fullmatch(value)):
            raise ValueError(f"must be 1-63 characters of [a-z0-9-], not starting or ending with '-', got {value!r}")
        return value

    @model_validator(mode="after")
    def _check_protocol_options(self) -> Route:
        if self.balance == "least_conn" and self.protocol == "udp":
            raise ValueError("balance: least_conn is for tcp routes only")
        if self.udp_responses and self.protocol == "tcp":
            raise ValueError("udpResponses: is for udp routes only")
        return self

    @property
    def key(self) -> str:
        """The route's name, defaulted to `<protocol>-<port>`."""
        return self.name or f"{self.protocol}-{self.port}"


class Config(_Model):
    """The whole file: the routes and the sidecar's own settings."""

    routes: list[Route] = Field(min_length=1)
    listen_address: Annotated[str, WithJsonSchema({"type": "string", "pattern": IP_PATTERN})] = Field(
        "127.0.0.1", description="address nginx listens on; unset: 127.0.0.1 and, where the pod has it, ::1; "
        "0.0.0.0 must be asked for")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    health: Annotated[str, WithJsonSchema({"type": "string", "pattern": HEALTH_PATTERN})] = Field(
        "127.0.0.1:9901", description="IP:PORT of the health and metrics server")
    watch_timeout: Duration = Field(300.0, description="each watch is asked to end within this; default 5m")

    @field_validator("listen_address")
    @classmethod
    def _check_listen_address(cls, value: str) -> str:
        try:
            return plain_ip(value)
        except ValueError:
            raise ValueError(f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {value!r}") from None

    @field_validator("health")
    @classmethod
    def _check_health(cls, value: str) -> str:
        host, _, port = value.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            ip = plain_ip(host[1:-1] if bracketed else host)
            ok = (":" in ip or not bracketed) and port.isascii() and port.isdigit() and 1 <= int(port) <= 65535
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"must be IP:PORT such as 127.0.0.1:9901, got {value!r}")
        return value


# --- located errors ------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One error in a config, located as precisely as the source allows."""

    source: str
    line: int | None
    column: int | None
    path: str
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}:{self.column}"
        return f"{where}: {self.path + ': ' if self.path else ''}{self.message}"


class ConfigError(Exception):
    """Every problem found in a config (the first `MAX_PROBLEMS` of them); the message lists them one per line."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = first_problems(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class ConfigUnreadable(ConfigError):
    """The file could not be read for want of a resource (file descriptors, memory): not the config's fault."""


_SHORT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EAGAIN, errno.EINTR}


def first_problems(problems: Iterable[Problem]) -> list[Problem]:
    """At most `MAX_PROBLEMS` problems, then one that says how many more there are."""
    problems = list(problems)
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [*problems[:MAX_PROBLEMS], Problem(problems[0].source, None, None, "", f"and {more} more errors")]


def _show(value: Any, depth: int = 0) -> str:
    """A short `repr`: never built from the whole of a huge value (aliases can make one from a few bytes)."""
    if isinstance(value, Mapping) or isinstance(value, list):
        if depth >= 2:
            return "{...}" if isinstance(value, Mapping) else "[...]"
        items = value.items() if isinstance(value, Mapping) else ((None, v) for v in value)
        shown = [(f"{_show(k, depth + 1)}: " if k is not None else "") + _show(v, depth + 1)
                 for k, v in islice(items, 3)]
        more = ", ..." if len(value) > 3 else ""
        opening, closing = ("{", "}") if isinstance(value, Mapping) else ("[", "]")
        return f"{opening}{', '.join(shown)}{more}{closing}"
    if isinstance(value, int) and value.bit_length() > 64:  # str() of a huge one is slow, or refused
        return f"a number of about {value.bit_length() * 30103 // 100000 + 1} digits"
    return _cut(repr(value), 60)


def _cut(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def format_path(loc: Iterable[str | int]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _position(document: Any, loc: tuple[str | int, ...]) -> tuple[int, int] | None:
    """1-based line and column of `loc` in a ruamel round-trip document, or of its nearest parent."""
    node, best = document, None
    for part in loc:
        try:
            if isinstance(node, CommentedMap) and part in node:
                best, node = node.lc.value(part), node[part]
            elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
                best, node = node.lc.item(part), node[part]
            else:
                break
        except KeyError:  # a key merged in with `<<:` has no position of its own
            break
    if best is None and isinstance(document, (CommentedMap, CommentedSeq)) and document.lc.line is not None:
        best = (document.lc.line, document.lc.col)
    return (best[0] + 1, best[1] + 1) if best else None


def _key_position(node: Any, key: str) -> tuple[int, int] | None:
    try:
        line, column = node.lc.key(key)
    except (AttributeError, KeyError, TypeError):
        return None
    return line + 1, column + 1


def _message(error: Mapping[str, Any]) -> str:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required"
    if kind == "literal_error":
        return f"must be {error['ctx']['expected']}, got {_show(value)}"
    message = _cut(error["msg"].removeprefix("Value error, "))
    message = message[0].lower() + message[1:]
    if kind in ("int_type", "string_type", "list_type", "model_type", "dict_type", "greater_than_equal",
                "less_than_equal", "too_short"):
        message += f", got {_show(value)}"
    return message


def _problems_from_validation(
    error: ValidationError, document: Any, source: str, names: Mapping[str, str] | None = None
) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        position = _position(document, loc)
        if item["type"] == "extra_forbidden":
            parent = _walk(document, loc[:-1])
            position = _key_position(parent, str(loc[-1])) or position
        path = format_path(loc)
        if names is not None:
            path = names.get(str(loc[-1]) if loc else "", path)
        line, column = position if position else (None, None)
        problems.append(Problem(source, line, column, path, _message(item)))
    return problems


def _walk(document: Any, loc: tuple[str | int, ...]) -> Any:
    node = document
    for part in loc:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return None
    return node


class _TooCostly(MarkedYAMLError):
    """YAML that is valid but beyond a limit: it would cost too much to check."""


class _BoundedComposer(Composer):
    """ruamel's composer, refusing nesting beyond `MAX_DEPTH`, more than `MAX_VALUES` values
    once aliases are expanded, an alias inside the value it names, and huge integers."""

    def __init__(self, loader: Any = None) -> None:
        super().__init__(loader)
        self.values = 0
        self.sizes: dict[int, int] = {}  # id of an anchored node -> the values it expands to

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.parser.peek_event()
        if isinstance(event, AliasEvent):
            node = self.anchors.get(event.anchor)
            if node is not None and id(node) not in self.sizes:
                raise _TooCostly(None, None, f"the alias *{event.anchor} is inside the value it names",
                                 event.start_mark)
            self._count(self.sizes.get(id(node), 0), event)
            return super().compose_node(parent, index)
        if self.depth >= MAX_DEPTH:
            raise _TooCostly(None, None, f"nested more than {MAX_DEPTH} levels deep", event.start_mark)
        start = self.values
        self._count(1, event)
        node = super().compose_node(parent, index)
        if event.anchor is not None:
            self.sizes[id(node)] = self.values - start
        return node

    def compose_scalar_node(self, anchor: Any) -> Any:
        node = super().compose_scalar_node(anchor)
        if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_NUMBER_LENGTH:
            raise _TooCostly(None, None, f"a number of {len(node.value)} characters: at most "
                             f"{MAX_NUMBER_LENGTH} are read", node.start_mark)
        return node

    def _count(self, values: int, event: Any) -> None:
        self.values += values
        if self.values > MAX_VALUES:
            raise _TooCostly(None, None, f"more than {MAX_VALUES} values (counting each alias as the value "
                             "it repeats)", event.start_mark)


def _yaml() -> YAML:
    """A round-trip loader (it keeps line/column marks) whose cost is bounded."""
    yaml = YAML(typ="rt")
    yaml.Composer = _BoundedComposer
    return yaml


def parse_yaml(text: str, source: str) -> Any:
    """Round-trip load; YAML syntax errors and values beyond the limits become a located `ConfigError`."""
    with _located_yaml_errors(text, source):
        return _yaml().load(text)


def _documents(text: str, source: str) -> list[Any]:
    """Every document of a YAML stream, as `parse_yaml` reads one."""
    with _located_yaml_errors(text, source):
        return list(_yaml().load_all(text))


@contextmanager
def _located_yaml_errors(text: str, source: str) -> Iterator[None]:
    try:
        yield
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        prefix = "" if isinstance(exc, _TooCostly) else "invalid YAML: "
        raise ConfigError([Problem(source, line, column, "", prefix + _cut(str(exc.problem or exc.context)))]) from None
    except YAMLError as exc:
        raise ConfigError([Problem(source, None, None, "", f"invalid YAML: {_cut(str(exc))}")]) from None
    except TypeError:  # ruamel cannot hash a mapping or list key that holds a mapping or list
        positions = filter(None, map(_collection_key_position, _yaml().compose_all(text)))
        line, column = next(positions, None) or (None, None)
        problem = Problem(source, line, column, "", "invalid YAML: a key may not be a mapping or a list")
        raise ConfigError([problem]) from None
    except (ValueError, ArithmeticError) as exc:  # a tagged value that cannot be made, e.g. `!!timestamp 2020-13-45`
        raise ConfigError([Problem(source, None, None, "", f"invalid YAML value: {_cut(str(exc))}")]) from None


def _collection_key_position(root: Node | None) -> tuple[int, int] | None:
    """Line and column of the first mapping or list used as a mapping key (`? {a: b}`, `[a]: b`)."""
    seen: set[int] = set()
    todo = [root] if root is not None else []
    while todo:
        node = todo.pop()
        if id(node) in seen:  # aliases can make the node graph cyclic
            continue
        seen.add(id(node))
        if isinstance(node, MappingNode):
            for key, value in node.value:
                if isinstance(key, (MappingNode, SequenceNode)):
                    return key.start_mark.line + 1, key.start_mark.column + 1
                todo += [key, value]
        elif isinstance(node, SequenceNode):
            todo += node.value
    return None


def load_config(text: str, source: str = "<config>", env_route: Mapping[str, Any] | None = None) -> Config:
    """Validate a config file's text (and the env shorthand's route, if any) into a `Config`."""
    return _validate(parse_yaml(text, source) if text.strip() else None, source, env_route)


def _validate(document: Any, source: str, env_route: Mapping[str, Any] | None = None) -> Config:
    """`load_config` of a document already read (None for an empty file)."""
    if document is None:
        document = CommentedMap()
    if not isinstance(document, Mapping):
        raise ConfigError([Problem(source, 1, 1, "", "must be a mapping with a 'routes' list")])
    data = dict(document)
    problems: list[Problem] = []
    env_index = None
    if env_route is not None:
        problems += _check_env_route(env_route)
        routes = data.get("routes")
        if routes is None or isinstance(routes, list):  # else `routes` is wrong, and said so below
            data["routes"] = [*(routes or []), dict(env_route)]
            env_index = len(data["routes"]) - 1
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        problems += [p for p in _problems_from_validation(exc, document, source) if not _is_env(p, env_index)]
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    problems = list(_check_routes(config, document, source, env_route is not None))
    if problems:
        raise ConfigError(problems)
    return config


def _is_env(problem: Problem, env_index: int | None) -> bool:
    return env_index is not None and problem.path.startswith(f"routes[{env_index}]")


def _check_routes(config: Config, document: Any, source: str, last_is_env: bool) -> Iterable[Problem]:
    """Rules that span routes: a port once per protocol, names unique."""
    ports: dict[tuple[int, str], int] = {}
    names: dict[str, int] = {}
    for i, route in enumerate(config.routes):
        if (route.port, route.protocol) in ports:
            clash = ("port", f"port {route.port}/{route.protocol}", ports[(route.port, route.protocol)])
        elif route.key in names:
            clash = ("name", f"name {route.key!r}", names[route.key])
        else:
            ports[(route.port, route.protocol)] = names[route.key] = i
            continue
        field, what, first = clash
        message = f"{what} is already used by routes[{first}]"
        if last_is_env and i == len(config.routes) - 1:
            yield Problem(ENV_SOURCE, None, None, ENV_NAMES[field], message)
        else:
            line, column = _position(document, ("routes", i, field)) or (None, None)
            yield Problem(source, line, column, f"routes[{i}].{field}", message)


# --- the environment shorthand (kube-collocated-pod-proxy compatible) ------------------

ENV_SOURCE = "environment"
ENV_NAMES = {"port": "PORT/SOURCE_PORT", "targetPort": "TARGET_PORT", "selector": "SELECTOR",
             "protocol": "PROTOCOL", "namespace": "NAMESPACE", "name": "PORT"}


def route_from_env(env: Mapping[str, str]) -> dict[str, Any] | None:
    """The one route the original image's variables describe, or None when they are not set."""
    if not any(env.get(k) for k in ("PORT", "SOURCE_PORT", "SELECTOR")):
        return None
    port = env.get("PORT", "")
    route: dict[str, Any] = {
        "port": _env_int(env.get("SOURCE_PORT") or port),
        "targetPort": _env_int(env.get("TARGET_PORT") or port),
        "protocol": env.get("PROTOCOL", "udp").lower(),
        "selector": env.get("SELECTOR", ""),
    }
    if env.get("NAMESPACE"):
        route["namespace"] = env["NAMESPACE"]
    return route


def _env_int(value: str) -> int | str:
    return int(value) if re.fullmatch(r"\s*[0-9]{1,9}\s*", value) else value


def _check_env_route(route: Mapping[str, Any]) -> list[Problem]:
    try:
        Route.model_validate(route)
    except ValidationError as exc:
        return _problems_from_validation(exc, None, ENV_SOURCE, ENV_NAMES)
    return []


def log_level_from_env(value: str) -> str | None:
    """Map the original image's nginx-style LOG_LEVEL onto ours."""
    levels = {"debug": "debug", "info": "info", "notice": "info", "warn": "warning", "warning": "warning",
              "error": "error", "crit": "error", "alert": "error", "emerg": "error"}
    return levels.get(value.strip().lower())


# --- reading sources (the I/O edge) -------------------------------------------------------


@contextmanager
def _only_config_errors(source: str) -> Iterator[None]:
    """Turn a failure of the checks themselves into a `ConfigError`: no input may stop the sidecar."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - a defect in proxyctl, reported as such, not a crash
        message = f"cannot be checked, a defect in proxyctl: {type(exc).__name__}: {_cut(str(exc))}"
        raise ConfigError([Problem(source, None, None, "", message)]) from exc


def read_text(path: Path, source: str | None = None, missing_ok: bool = False) -> str:
    """A config file's text ("" for a missing one when `missing_ok`); a `ConfigError` when it cannot
    be read, is too large or is not UTF-8."""
    source = source or str(path)
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError as exc:
        if missing_ok:
            return ""
        raise ConfigError([Problem(source, None, None, "", f"cannot read: {exc.strerror}")]) from None
    except OSError as exc:
        error = ConfigUnreadable if exc.errno in _SHORT_OF_RESOURCES else ConfigError
        raise error([Problem(source, None, None, "", f"cannot read: {exc.strerror or exc}")]) from None
    if len(data) > MAX_FILE_BYTES:
        message = f"larger than {MAX_FILE_BYTES // 1024} KiB: not read (a config of 400 routes is smaller)"
        raise ConfigError([Problem(source, None, None, "", message)])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_start = data.rfind(b"\n", 0, exc.start) + 1
        line = data.count(b"\n", 0, exc.start) + 1
        column = len(data[line_start:exc.start].decode("utf-8", errors="replace")) + 1
        message = f"not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded"
        raise ConfigError([Problem(source, line, column, "", message)]) from None


def read_config(path: Path | None, env: Mapping[str, str]) -> Config:
    """The running config: the file (if it exists), plus the env shorthand's route and LOG_LEVEL.

    Raises only `ConfigError`, whatever the file or the variables hold.
    """
    where = str(path) if path is not None else ENV_SOURCE
    with _only_config_errors(where):
        text = read_text(path, missing_ok=True) if path is not None else ""  # the variables may do without
        env_route = route_from_env(env)
        if not text.strip() and env_route is None:
            raise ConfigError([Problem(where, None, None, "", "no config file and no PORT/SELECTOR variables: nothing to route")])
        config = load_config(text, where, env_route)
        level = log_level_from_env(env.get("LOG_LEVEL", ""))
        if level and "log_level" not in config.model_fields_set:  # the file's logLevel wins
            config = config.model_copy(update={"log_level": level})
        return config


def _manifests(documents: list[Any]) -> list[Any]:
    """The Kubernetes objects among `documents`: those with apiVersion and kind."""
    return [d for d in documents if isinstance(d, Mapping) and "apiVersion" in d and "kind" in d]


def _near_miss(key: Any) -> bool:
    """`proxyctl.yml`, `proxctl.yaml`, `Proxyctl.yaml`: meant as the config's key, so not to be skipped."""
    key = str(key).lower()
    return key.startswith("proxyctl") or difflib.SequenceMatcher(None, key, CONFIGMAP_KEY).ratio() >= 0.9


def _looks_like_ours(manifest: Mapping[str, Any]) -> bool:
    """A ConfigMap with the config's key or a near miss of it: a misspelt key must not be skipped silently."""
    data = manifest.get("data")
    return manifest.get("kind") == "ConfigMap" and isinstance(data, Mapping) and any(map(_near_miss, data))


def _looks_like_config_file(documents: list[Any], source: str) -> bool:
    """A file named `proxyctl*`, or one mapping with `routes` (or a near miss) or only the config's keys.

    Other YAML (a Helm values file, `--endpoints` backends) is not a config with mistakes in it.
    """
    if Path(source).name.lower().startswith("proxyctl"):
        return True
    if len(documents) != 1 or not isinstance(documents[0], Mapping) or not documents[0]:
        return False
    keys = {str(key) for key in documents[0]}
    ours = {field.alias or name for name, field in Config.model_fields.items()}
    return keys <= ours or bool(difflib.get_close_matches("routes", [k.lower() for k in keys], cutoff=0.8))


def holds_config(text: str, source: str = "") -> bool:
    """Whether `validate` has anything to check: a config file, or a manifest holding one."""
    try:
        documents = _documents(text, "")
    except ConfigError:  # reported with its location, if it seems meant for us
        return ("routes" in text or "proxyctl" in text.lower()  # not a Helm template, say
                or Path(source).name.lower().startswith("proxyctl"))
    manifests = _manifests(documents)
    if manifests:
        return any(_looks_like_ours(m) for m in manifests)
    return _looks_like_config_file(documents, source)


def check_file(text: str, source: str) -> list[Problem]:
    """Problems of a config file, or of the ConfigMaps holding `proxyctl.yaml` among manifests.

    Other manifests (Deployments, unrelated ConfigMaps) are passed over, so that CI can run
    `proxyctl validate k8s/*.yaml` on a whole directory. Raises nothing, whatever `text` holds.
    """
    try:
        with _only_config_errors(source):
            return first_problems(_check_file(text, source))
    except ConfigError as exc:
        return exc.problems


def _check_file(text: str, source: str) -> list[Problem]:
    documents = _documents(text, source)  # read once: the costly part
    manifests = _manifests(documents)
    if not manifests:  # a config file
        try:
            if len(documents) > 1:
                load_config(text, source)  # for the located error of a second document
            _validate(documents[0] if documents else None, source)
        except ConfigError as exc:
            return exc.problems
        return []
    problems: list[Problem] = []
    for manifest in filter(_looks_like_ours, manifests):
        data = manifest["data"]
        if CONFIGMAP_KEY not in data:
            key = next(k for k in data if _near_miss(k))
            line, column = _key_position(data, key) or (data.lc.line + 1, data.lc.col + 1)
            problems.append(Problem(source, line, column, f"data.{key}",
                                    f"the config must be under the key {CONFIGMAP_KEY!r}, not {key!r}"))
            continue
        value_line, value_column = data.lc.value(CONFIGMAP_KEY)
        try:
            load_config(str(data[CONFIGMAP_KEY]), source)
        except ConfigError as exc:
            if isinstance(data[CONFIGMAP_KEY], LiteralScalarString):  # `key: |` keeps lines: map each one
                problems += [_shift(p, value_line + 1, text) for p in exc.problems]
            else:  # a quoted or folded string: point at the string itself
                problems += [Problem(source, value_line + 1, value_column + 1, p.path, p.message) for p in exc.problems]
    return problems


def _shift(problem: Problem, first_line: int, text: str) -> Problem:
    """Move a problem found inside an embedded block scalar to its place in the manifest."""
    if problem.line is None:
        return problem
    block = [line for line in text.splitlines()[first_line:] if line.strip()]
    indent = len(block[0]) - len(block[0].lstrip(" ")) if block else 0
    return Problem(problem.source, first_line + problem.line, (problem.column or 1) + indent, problem.path,
                   problem.message)
