"""HTTP ↔ message for one route: path variables, JSON body and query string in; JSON out.

What depends only on the route is worked out at start; a request pays for a dict walk
per query parameter and at most two json_format calls. The mapping is protobuf's own
(json_format), strict about unknown fields: a typo in a field name is a 400, not a
silently ignored value."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from urllib.parse import parse_qsl

from google.protobuf import json_format, wrappers_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from gateway.errors import bad_request
from gateway.json_body import JsonObject, encode
from gateway.routes import HttpRoute

# google.protobuf's wrappers (Int32Value, BoolValue, ...), as their own file declares them.
WRAPPERS = frozenset(message.full_name for message in wrappers_pb2.DESCRIPTOR.message_types_by_name.values())
# Well-known types whose proto3 JSON form is a single string or number, so one query
# parameter can carry them (?update_mask=name,domain, ?after=2024-01-01T00:00:00Z).
SCALAR_WELL_KNOWN_TYPES = WRAPPERS | {f"google.protobuf.{name}" for name in ("Timestamp", "Duration", "FieldMask")}

_RESOLVED_LIMIT = 256

_BOOLS = {"true": True, "false": False, "1": True, "0": False}

_PARSE_PREFIX = re.compile(r"Failed to parse (\S+) field: ")
_UNKNOWN_FIELD = re.compile(r'has no field named "([^"]+)"')
_AT_LOCATION = re.compile(r"\s+at\s+\"?[\w.\[\]]*\"?\s*$")

PathSetter = Callable[[Message, str], None]
Renderer = Callable[[Message], bytes]


def map_entry(field: FieldDescriptor) -> Descriptor | None:
    entry = field.message_type
    return entry if entry is not None and entry.GetOptions().map_entry else None


def is_scalar_like(field: FieldDescriptor) -> bool:
    """Whether one JSON string or number is the whole value (what a query parameter holds):
    never for a map, whose entry type is a message."""
    return field.message_type is None or field.message_type.full_name in SCALAR_WELL_KNOWN_TYPES


def _reachable(roots: Iterable[Descriptor]) -> Iterator[Descriptor]:
    seen: set[str] = set()
    pending = list(roots)
    while pending:
        descriptor = pending.pop()
        if descriptor.full_name not in seen:
            seen.add(descriptor.full_name)
            yield descriptor
            pending.extend(f.message_type for f in descriptor.fields if f.message_type is not None)


def _field_named(descriptor: Descriptor, name: str) -> FieldDescriptor | None:
    """A field by its proto name or its JSON name: a query parameter may spell it either way."""
    field = descriptor.fields_by_name.get(name)
    return field if field is not None else next((f for f in descriptor.fields if f.json_name == name), None)


DEFAULT_MAX_DEPTH = 32


def _depth_exceeds(value: object, limit: int) -> bool:
    """Whether objects and arrays nest more than `limit` deep (iterative: no recursion)."""
    pending: list[tuple[object, int]] = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        children: Iterable[object]
        if isinstance(current, dict):
            children = current.values()
        elif isinstance(current, list):
            children = current
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


class RequestBuilder:
    def __init__(self, route: HttpRoute, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
        self._route = route
        self._max_depth = max_depth
        self._bound = route.bound_paths
        self.reads_body = bool(route.body)
        body_field = route.body_field
        self._body_key = body_field.json_name if body_field is not None else None
        self._body_needs_object = route.body == "*" or (
            body_field is not None and not body_field.is_repeated and not is_scalar_like(body_field)
        )
        # Query names seen before → their resolution; bounded, since recursive messages
        # make the set of valid names (a.parent.parent...) unbounded.
        self._resolved: dict[str, tuple[tuple[str, ...], FieldDescriptor]] = {}
        self._setters = tuple(
            _path_setter(chain, variable.name) for chain, variable in zip(route.path_fields, route.template.variables)
        )

    def build(self, values: tuple[str, ...], query: bytes, body: bytes) -> Message:
        message = self._route.request_class()
        document: JsonObject = {}
        origins: dict[str, str] = {}
        if self.reads_body and body:
            document = self._body_document(body)
        if query:
            self._add_query(document, origins, query)
        if document:
            _parse_into(document, message, origins)
        for setter, value in zip(self._setters, values):
            setter(message, value)
        return message

    def _body_document(self, body: bytes) -> JsonObject:
        try:
            value = json.loads(body)
            too_deep = _depth_exceeds(value, self._max_depth)
        except ValueError as exc:
            raise bad_request(f"request body is not valid JSON: {exc}", reason="MALFORMED_JSON") from None
        except RecursionError:
            too_deep = True
        if too_deep:
            raise bad_request(f"request body nests deeper than {self._max_depth} levels", reason="JSON_TOO_DEEP")
        if self._body_needs_object and not isinstance(value, dict):
            where = "request body" if self._body_key is None else f"request body (field {self._route.body})"
            raise bad_request(
                f"{where} must be a JSON object, not {type(value).__name__}",
                field=self._route.body if self._body_key else "",
                reason="MALFORMED_JSON",
            )
        return value if self._body_key is None else {self._body_key: value}

    def _add_query(self, document: JsonObject, origins: dict[str, str], query: bytes) -> None:
        grouped: dict[str, list[str]] = {}
        for name, raw in parse_qsl(query.decode("utf-8", "replace"), keep_blank_values=True):
            grouped.setdefault(name, []).append(raw)
        if grouped and self._route.body == "*":
            name = next(iter(grouped))
            description = "not accepted: the request body carries every field"
            raise _unknown(name, f"query parameter {name!r} is {description}", description)
        for name, raw_values in grouped.items():
            resolved = self._resolved.get(name)
            if resolved is None:
                resolved = self._resolve(name)
                if len(self._resolved) < _RESOLVED_LIMIT:
                    self._resolved[name] = resolved
            json_path, field = resolved
            if field.is_repeated:
                value: object = [_scalar_json(field, raw, name) for raw in raw_values]
            elif len(raw_values) > 1:
                given = f"is given {len(raw_values)} times but is not repeated"
                raise _refused(name, given, "given more than once but not repeated")
            else:
                value = _scalar_json(field, raw_values[0], name)
            node = document
            for key in json_path[:-1]:
                node = node.setdefault(key, {})
            if json_path[-1] in node:
                raise _refused(name, "sets a field that is already set", "set more than once")
            node[json_path[-1]] = value
            origins[".".join(json_path)] = name

    def _resolve(self, name: str) -> tuple[tuple[str, ...], FieldDescriptor]:
        """`agent.create_time` or `agent.createTime` → JSON path and leaf field, or a 400."""
        descriptor = self._route.method.input_type
        json_path: list[str] = []
        proto_path: list[str] = []
        parts = name.split(".")
        for position, part in enumerate(parts, start=1):
            field = _field_named(descriptor, part)
            if field is None:
                raise _unknown(name, f"unknown query parameter {name!r}: {descriptor.full_name} has no field {part!r}")
            json_path.append(field.json_name)
            proto_path.append(field.name)
            if tuple(proto_path) in self._bound:
                where = self._route.template.text
                raise _refused(name, f"sets a field that the path or body of {where} sets", "set by the path or the body")
            last = position == len(parts)
            if is_scalar_like(field):
                if not last:
                    raise _unknown(name, f"unknown query parameter {name!r}: {part!r} has no fields")
                return tuple(json_path), field
            if last or field.is_repeated:
                problem = "cannot be set from the query string; send it in a request body"
                raise _refused(name, problem, "not settable from the query string")
            # A message field: is_scalar_like() holds for every field without a message type.
            assert field.message_type is not None
            descriptor = field.message_type
        raise AssertionError("unreachable: the loop returns or raises on the last part")


def _unknown(name: str, message: str, description: str = "unknown field") -> Exception:
    return bad_request(message, field=name, description=description, reason="UNKNOWN_FIELD")


def _refused(name: str, problem: str, description: str) -> Exception:
    return bad_request(f"query parameter {name!r} {problem}", field=name, description=description)


def _scalar_json(field: FieldDescriptor, raw: str, name: str) -> object:
    """A query or path string as the JSON value json_format expects: only bools need help,
    json_format already reads numbers, enums (name or number) and well-known types from strings."""
    if field.type == FieldDescriptor.TYPE_BOOL or (
        field.message_type is not None and field.message_type.full_name == "google.protobuf.BoolValue"
    ):
        parsed = _BOOLS.get(raw.lower())
        if parsed is None:
            raise bad_request(
                f"invalid value for {name!r}: expected true or false, got {raw!r}",
                field=name,
                description=f"expected true or false, got {raw!r}",
            )
        return parsed
    return raw


def _path_setter(chain: tuple[FieldDescriptor, ...], name: str) -> PathSetter:
    parents = tuple(field.name for field in chain[:-1])
    leaf = chain[-1]

    def set_value(message: Message, value: str) -> None:
        for parent in parents:
            message = getattr(message, parent)
        if leaf.type == FieldDescriptor.TYPE_STRING:
            # The common case (ids) skips json_format entirely.
            setattr(message, leaf.name, value)
            return
        try:
            json_format.ParseDict({leaf.json_name: _scalar_json(leaf, value, name)}, message)
        except (json_format.ParseError, ValueError, TypeError, OverflowError) as exc:
            _, reason = explain(exc)
            raise bad_request(f"invalid path parameter {name!r}: {reason}", field=name, description=reason) from None

    return set_value


def _parse_into(document: JsonObject, message: Message, origins: dict[str, str]) -> None:
    try:
        json_format.ParseDict(document, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, OverflowError) as exc:
        path, reason = explain(exc)
        query_name = origins.get(path)
        if query_name is not None:
            raise bad_request(f"invalid query parameter {query_name!r}: {reason}", field=query_name, description=reason) from None
        text = f"invalid field {path!r} in request body: {reason}" if path else f"invalid request body: {reason}"
        raise bad_request(text, field=path, description=reason) from None


def explain(exc: Exception) -> tuple[str, str]:
    """json_format's `Failed to parse agent field: Failed to parse name field: ...` →
    (`agent.name`, the innermost reason), as a BadRequest FieldViolation needs them."""
    text = str(exc).split("\n", 1)[0]
    path: list[str] = []
    while (match := _PARSE_PREFIX.match(text)) is not None:
        path.append(match.group(1))
        text = text[match.end() :]
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is not None:
        path.append(unknown.group(1))
        return ".".join(path), "unknown field"
    reason = _AT_LOCATION.sub("", text.rstrip(".")).rstrip(".")
    return ".".join(path), reason or str(exc)


def renderer(route: HttpRoute) -> Renderer:
    """Proto3 JSON of the response, or of its response_body field: the one place the
    gateway writes a message as JSON. Zero values are written; fields with presence
    (messages, `optional` ones) appear only when set."""
    field = route.response_field
    to_json: Callable[[Message], object]
    if field is None:
        to_json = _to_json
    elif field.message_type is not None and not field.is_repeated:
        to_json = lambda reply: _to_json(getattr(reply, field.name))  # noqa: E731
    else:
        key = field.json_name
        to_json = lambda reply: _to_json(reply)[key]  # noqa: E731
    reaches = field.message_type if field is not None else route.method.output_type
    if reaches is None or not any(d.full_name in STRUCT_TYPES for d in _reachable([reaches])):
        return lambda reply: encode(to_json(reply))
    return lambda reply: encode(_integral_numbers(to_json(reply)))


def _to_json(message: Message) -> JsonObject:
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


# Struct and Value hold every JSON number as a double, so json_format prints 1 as 1.0.
STRUCT_TYPES = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"})
# Integers a double holds exactly: larger ones stay as json_format prints them.
_EXACT_INTEGERS = 2**53


def _integral_numbers(value: object) -> object:
    """The JSON value with every integral number as an integer, so a client's
    `"attempts": 1` comes back as it was sent, not as 1.0."""
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) <= _EXACT_INTEGERS else value
    if isinstance(value, dict):
        return {key: _integral_numbers(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_numbers(item) for item in value]
    return value
