"""Kubernetes label selectors: parsed and checked here so a typo fails in CI, not at run time.

Both forms of DESIGN.md §1 become one `Selector`: a tuple of `Requirement`s whose
canonical string is what the API server receives and what identifies a watch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping

Operator = Literal["=", "!=", "in", "notin", "exists", "!"]

_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_TOKEN = re.compile(r"\s*(==|!=|=|!|\(|\)|,|[^\s=!(),]+)")


class SelectorError(ValueError):
    """A selector that the Kubernetes API would reject."""


def check_label_key(key: str) -> str:
    """Validate a label key: optional DNS-subdomain prefix, '/', then a name of ≤ 63 chars."""
    prefix, slash, name = key.rpartition("/")
    if slash:
        if not prefix or len(prefix) > 253 or not all(_DNS_LABEL.fullmatch(p) for p in prefix.split(".")):
            raise SelectorError(f"label key {key!r}: prefix must be a DNS subdomain")
    if not name or len(name) > 63 or not _NAME.fullmatch(name):
        raise SelectorError(
            f"label key {key!r}: name must be 1-63 characters of [A-Za-z0-9-_.], "
            "starting and ending with a letter or digit"
        )
    return key


def check_label_value(value: str) -> str:
    """Validate a label value: empty, or ≤ 63 chars of [A-Za-z0-9-_.] with alphanumeric ends."""
    if value and (len(value) > 63 or not _NAME.fullmatch(value)):
        raise SelectorError(
            f"label value {value!r}: must be at most 63 characters of [A-Za-z0-9-_.], "
            "starting and ending with a letter or digit"
        )
    return value


@dataclass(frozen=True, order=True)
class Requirement:
    """One clause of a selector, e.g. `tier in (a,b)`."""

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def __str__(self) -> str:
        if self.operator == "exists":
            return self.key
        if self.operator == "!":
            return f"!{self.key}"
        if self.operator in ("in", "notin"):
            return f"{self.key} {self.operator} ({','.join(self.values)})"
        return f"{self.key}{self.operator}{self.values[0]}"

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Kubernetes semantics: `!=` and `notin` also match pods without the key."""
        present = self.key in labels
        value = labels.get(self.key)
        match self.operator:
            case "exists":
                return present
            case "!":
                return not present
            case "=" | "in":
                return present and value in self.values
            case _:
                return not present or value not in self.values


@dataclass(frozen=True)
class Selector:
    """A conjunction of requirements in canonical (sorted, deduplicated) order."""

    requirements: tuple[Requirement, ...]

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.requirements)

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)


def _make(requirements: list[Requirement]) -> Selector:
    if not requirements:
        raise SelectorError("selector is empty: it would match every pod in the namespace")
    return Selector(tuple(sorted(set(requirements))))


def parse_selector(text: str) -> Selector:
    """Parse the string form: `a=b,c!=d,e in (x,y),f notin (z),g,!h`."""
    tokens = _tokenize(text)
    requirements: list[Requirement] = []
    pos = 0

    def take() -> str:
        nonlocal pos
        if pos >= len(tokens):
            raise SelectorError(f"selector {text!r}: unexpected end")
        pos += 1
        return tokens[pos - 1]

    while pos < len(tokens):
        token = take()
        if token == "!":
            requirements.append(Requirement(check_label_key(take()), "!"))
        else:
            key = check_label_key(token)
            op = tokens[pos] if pos < len(tokens) else ","
            if op == ",":
                requirements.append(Requirement(key, "exists"))
            elif op in ("=", "==", "!="):
                pos += 1
                value = tokens[pos] if pos < len(tokens) and tokens[pos] != "," else ""
                pos += bool(value)
                requirements.append(Requirement(key, "!=" if op == "!=" else "=", (check_label_value(value),)))
            elif op in ("in", "notin"):
                pos += 1
                if take() != "(":
                    raise SelectorError(f"selector {text!r}: expected '(' after {op!r}")
                values = _take_values(take, text)
                requirements.append(Requirement(key, op, values))
            else:
                raise SelectorError(f"selector {text!r}: unexpected {op!r} after {key!r}")
        if pos < len(tokens) and take() != ",":
            raise SelectorError(f"selector {text!r}: expected ',' between requirements")
        elif pos == len(tokens) and tokens and tokens[-1] == ",":
            raise SelectorError(f"selector {text!r}: trailing ','")
    return _make(requirements)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if not match:
            break
        tokens.append(match.group(1))
        pos = match.end()
    if text[pos:].strip():
        raise SelectorError(f"selector {text!r}: cannot parse {text[pos:]!r}")
    return tokens


def _take_values(take: Any, text: str) -> tuple[str, ...]:
    values: list[str] = []
    while True:
        token = take()
        if token == ")" and not values:
            raise SelectorError(f"selector {text!r}: a set needs at least one value")
        values.append(check_label_value(token))
        separator = take()
        if separator == ")":
            return tuple(sorted(set(values)))
        if separator != ",":
            raise SelectorError(f"selector {text!r}: expected ',' or ')' in a set, got {separator!r}")


_OPERATORS: dict[str, Operator] = {"In": "in", "NotIn": "notin", "Exists": "exists", "DoesNotExist": "!"}


def selector_from_mapping(data: Mapping[str, Any]) -> Selector:
    """Parse the mapping form `{matchLabels: {...}, matchExpressions: [...]}`."""
    unknown = set(map(str, data)) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SelectorError(f"unknown selector key(s): {', '.join(sorted(unknown))}")
    labels, expressions = data.get("matchLabels") or {}, data.get("matchExpressions") or []
    if not isinstance(labels, Mapping):
        raise SelectorError("matchLabels: must be a mapping of label keys to values")
    if not isinstance(expressions, list):
        raise SelectorError("matchExpressions: must be a list")
    requirements = [
        Requirement(check_label_key(str(k)), "=", (_label_value(f"matchLabels.{k}", v),)) for k, v in labels.items()
    ]
    for i, expr in enumerate(expressions):
        where = f"matchExpressions[{i}]"
        if not isinstance(expr, Mapping) or set(expr) - {"key", "operator", "values"}:
            raise SelectorError(f"{where}: must be a mapping of key, operator and values")
        operator = _OPERATORS.get(str(expr.get("operator")))
        if operator is None:
            raise SelectorError(f"{where}.operator: must be one of In, NotIn, Exists, DoesNotExist")
        raw_values = expr.get("values") or []
        if not isinstance(raw_values, list):
            raise SelectorError(f"{where}.values: must be a list")
        values = tuple(sorted({_label_value(f"{where}.values", v) for v in raw_values}))
        if (operator in ("in", "notin")) != bool(values):
            raise SelectorError(f"{where}.values: required for In/NotIn, forbidden for Exists/DoesNotExist")
        requirements.append(Requirement(check_label_key(str(expr.get("key", ""))), operator, values))
    return _make(requirements)


def _label_value(where: str, value: Any) -> str:
    """Only a string: Kubernetes rejects YAML's `true`, `1.10` or `010`, which would never match as text."""
    if isinstance(value, str):
        return check_label_value(value)
    if not isinstance(value, (bool, int, float, type(None))):
        raise SelectorError(f"{where}: must be a string, got a list or mapping")
    kind = "a boolean" if isinstance(value, bool) else "null" if value is None else "a number"
    raise SelectorError(f"{where}: must be a string: YAML reads this unquoted value as {kind}, quote it")
