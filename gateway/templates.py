"""google.api.http path templates (grammar: google/api/http.proto), parsed at start-up.

Matching compares segments, no regex: templates are bucketed by (verb, segment count),
so a request looks only at the few that could match it. A `:verb` suffix some template
declares is split off the last segment, so `{id}` never swallows it:
`GET /api/agents/x:execute` is a 405, not a GetAgent for "x:execute"."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable
from typing import Generic, NamedTuple, TypeVar
from urllib.parse import unquote

T = TypeVar("T")

SINGLE = "*"
MULTI = "**"

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Characters a literal segment may not contain: they belong to the template syntax.
_RESERVED = frozenset("{}=*:/")


class TemplateError(ValueError):
    """A google.api.http path that does not follow the template grammar."""


@dataclasses.dataclass(frozen=True, slots=True)
class Variable:
    """A `{field.path}` capture covering segments[start:stop] (stop None: to the end)."""

    field_path: tuple[str, ...]
    start: int
    stop: int | None

    @property
    def name(self) -> str:
        return ".".join(self.field_path)


@dataclasses.dataclass(frozen=True, slots=True)
class PathTemplate:
    text: str
    # Literal text, SINGLE or MULTI per path segment; variables are flattened into these.
    segments: tuple[str, ...]
    verb: str
    variables: tuple[Variable, ...]

    @classmethod
    def parse(cls, text: str) -> PathTemplate:
        if not text.startswith("/"):
            raise TemplateError(f"path template {text!r} must start with '/'")
        tail = max(text.rfind("/"), text.rfind("}"))
        colon = text.find(":", tail + 1)
        path, verb = (text[:colon], text[colon + 1 :]) if colon != -1 else (text, "")
        if colon != -1 and not _is_literal(verb):
            raise TemplateError(f"path template {text!r} has an invalid verb {verb!r}")
        segments: list[str] = []
        variables: list[Variable] = []
        pos = 1
        while pos < len(path):
            if path[pos] == "{":
                end = path.find("}", pos)
                if end == -1:
                    raise TemplateError(f"path template {text!r} has an unclosed '{{'")
                name, _, pattern = path[pos + 1 : end].partition("=")
                field_path = tuple(name.split("."))
                if not all(_IDENT.fullmatch(part) for part in field_path):
                    raise TemplateError(f"path template {text!r} has an invalid variable {name!r}")
                start = len(segments)
                segments.extend(_parse_segments(pattern or SINGLE, text))
                stop = None if segments[-1] == MULTI else len(segments)
                variables.append(Variable(field_path, start, stop))
                pos = end + 1
            else:
                end = path.find("/", pos)
                end = len(path) if end == -1 else end
                segments.extend(_parse_segments(path[pos:end], text))
                pos = end
            if pos < len(path):
                if path[pos] != "/":
                    raise TemplateError(f"path template {text!r}: expected '/' at offset {pos}")
                pos += 1
                if pos == len(path):
                    raise TemplateError(f"path template {text!r} ends with '/'")
        if MULTI in segments[:-1]:
            raise TemplateError(f"path template {text!r}: '**' is only allowed as the last segment")
        names = [variable.name for variable in variables]
        if len(set(names)) != len(names):
            raise TemplateError(f"path template {text!r} binds a field twice")
        return cls(text, tuple(segments), verb, tuple(variables))

    @property
    def openapi_path(self) -> str:
        """The OpenAPI spelling: each variable becomes `{field.path}`, whatever it spans."""
        parts: list[str] = []
        index = 0
        for variable in self.variables:
            parts.extend(self.segments[index : variable.start])
            parts.append("{" + variable.name + "}")
            index = len(self.segments) if variable.stop is None else variable.stop
        parts.extend(self.segments[index:])
        return "/" + "/".join(parts) + (f":{self.verb}" if self.verb else "")

    def values(self, segments: list[str]) -> tuple[str, ...]:
        """The percent-decoded value of each variable, in template order."""
        values = []
        for v in self.variables:
            raw = segments[v.start] if v.stop == v.start + 1 else "/".join(segments[v.start : v.stop])
            values.append(unquote(raw) if "%" in raw else raw)
        return tuple(values)


def _is_literal(text: str) -> bool:
    return bool(text) and not (_RESERVED & set(text))


def _parse_segments(pattern: str, template: str) -> list[str]:
    parts = pattern.split("/")
    for part in parts:
        if part not in (SINGLE, MULTI) and not _is_literal(part):
            raise TemplateError(f"path template {template!r} has an invalid segment {part!r}")
    return parts


class RouteMatch(NamedTuple, Generic[T]):
    target: T
    values: tuple[str, ...]


class NotAllowed(NamedTuple):
    """The path is known, but not for this HTTP method."""

    allowed: tuple[str, ...]


class _Shape(Generic[T]):
    """Every binding that shares one shape, keyed by HTTP method."""

    __slots__ = ("literals", "singles", "prefix_len", "multi", "targets", "order")

    def __init__(self, segments: tuple[str, ...]) -> None:
        self.multi = bool(segments) and segments[-1] == MULTI
        self.prefix_len = len(segments) - 1 if self.multi else len(segments)
        fixed = segments[: self.prefix_len]
        self.literals = tuple((i, s) for i, s in enumerate(fixed) if s != SINGLE)
        self.singles = tuple(i for i, s in enumerate(fixed) if s == SINGLE)
        self.targets: dict[str, tuple[PathTemplate, T]] = {}
        # Leftmost literal wins: /api/agents/stats is tried before /api/agents/{id}.
        self.order = tuple(0 if s not in (SINGLE, MULTI) else 1 if s == SINGLE else 2 for s in segments)

    def matches(self, segments: list[str]) -> bool:
        if self.multi and len(segments) < self.prefix_len:
            return False
        for i, literal in self.literals:
            if segments[i] != literal:
                return False
        for i in self.singles:
            if not segments[i]:
                return False
        return True


class Router(Generic[T]):
    """(HTTP method, path) → target, built once from (method, template, target) bindings."""

    def __init__(self, bindings: Iterable[tuple[str, PathTemplate, T]]) -> None:
        shapes: dict[tuple[tuple[str, ...], str], _Shape[T]] = {}
        for http_method, template, target in bindings:
            # Templates of one shape match exactly the same paths, whatever their variables.
            shape = shapes.setdefault((template.segments, template.verb), _Shape(template.segments))
            if http_method in shape.targets:
                other = shape.targets[http_method][0].text
                raise TemplateError(f"{http_method} {template.text} is ambiguous with {http_method} {other}")
            shape.targets[http_method] = (template, target)
        self._fixed: dict[tuple[str, int], list[_Shape[T]]] = {}
        self._multi: dict[str, list[_Shape[T]]] = {}
        for (segments, verb), shape in shapes.items():
            if shape.multi:
                self._multi.setdefault(verb, []).append(shape)
            else:
                self._fixed.setdefault((verb, len(segments)), []).append(shape)
        for bucket in [*self._fixed.values(), *self._multi.values()]:
            bucket.sort(key=lambda s: s.order)
        self._verbs = frozenset(verb for _, verb in shapes if verb)

    def match(self, http_method: str, path: str) -> RouteMatch[T] | NotAllowed | None:
        """`path` is the raw (still percent-encoded) path: an encoded '/' or ':' stays data."""
        segments = path[1:].split("/") if len(path) > 1 else []
        if segments:
            last = segments[-1]
            colon = last.rfind(":")
            if colon != -1 and last[colon + 1 :] in self._verbs:
                result = self._lookup(http_method, [*segments[:-1], last[:colon]], last[colon + 1 :])
                # A bare ":verb" segment is a verb call with an empty variable, never an id.
                if result is not None or colon == 0:
                    return result
        return self._lookup(http_method, segments, "")

    def _lookup(self, http_method: str, segments: list[str], verb: str) -> RouteMatch[T] | NotAllowed | None:
        allowed: set[str] = set()
        for shape in itertools.chain(self._fixed.get((verb, len(segments)), ()), self._multi.get(verb, ())):
            if shape.matches(segments):
                hit = shape.targets.get(http_method)
                if hit is not None:
                    return RouteMatch(hit[1], hit[0].values(segments))
                allowed.update(shape.targets)
        return NotAllowed(tuple(sorted(allowed))) if allowed else None
