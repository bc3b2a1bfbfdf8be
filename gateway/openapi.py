"""OpenAPI 3.0 from the same route table the gateway serves, so the two cannot disagree:
schemas in the proto3 JSON mapping, the error body from google.rpc.Status's descriptor,
descriptions from the protos' comments, the key each `required_scope` asks for."""

from __future__ import annotations

import re
from collections.abc import Sequence

from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.rpc import status_pb2
from starlette.requests import Request
from starlette.responses import Response

from gateway import proto_comments
from gateway.json_body import JSON_MEDIA_TYPE, JsonObject, encode
from gateway.routes import IDEMPOTENCY_HEADER, HttpRoute
from gateway.templates import PathTemplate
from gateway.transcode import WRAPPERS, is_scalar_like, map_entry
from services.common.auth.scopes import Scope, required_scope
from services.common.contract.field_behavior import behaviors

OPENAPI_VERSION = "3.0.3"
_VERSION = re.compile(r"v\d+(?:(?:alpha|beta)\d*)?")
_OPERATION_KEYS = frozenset({"get", "put", "post", "delete", "options", "head", "patch", "trace"})

_T = FieldDescriptor
# Copied on use (_Schemas._single): the types that share an entry share one dict here.
_SCALARS: dict[int, JsonObject] = {
    _T.TYPE_DOUBLE: {"type": "number", "format": "double"},
    _T.TYPE_FLOAT: {"type": "number", "format": "float"},
    **dict.fromkeys((_T.TYPE_INT32, _T.TYPE_SINT32, _T.TYPE_SFIXED32), {"type": "integer", "format": "int32"}),
    **dict.fromkeys(
        (_T.TYPE_UINT32, _T.TYPE_FIXED32), {"type": "integer", "format": "int64", "minimum": 0, "maximum": 4294967295}
    ),
    # proto3 JSON writes 64-bit integers as strings: JavaScript numbers lose precision.
    **dict.fromkeys((_T.TYPE_INT64, _T.TYPE_SINT64, _T.TYPE_SFIXED64), {"type": "string", "format": "int64"}),
    **dict.fromkeys((_T.TYPE_UINT64, _T.TYPE_FIXED64), {"type": "string", "format": "uint64"}),
    _T.TYPE_BOOL: {"type": "boolean"},
    _T.TYPE_STRING: {"type": "string"},
    _T.TYPE_BYTES: {"type": "string", "format": "byte"},
}

_WELL_KNOWN: dict[str, JsonObject] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    # Proto3 JSON durations are seconds with an "s" ("1.5s"), not the ISO 8601 that
    # OpenAPI's "duration" format means, so the pattern says what is accepted.
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$", "example": "1.5s"},
    "google.protobuf.FieldMask": {"type": "string", "description": "Comma-separated field paths.", "example": "name,domain"},
    "google.protobuf.Empty": {"type": "object"},
    "google.protobuf.Struct": {"type": "object", "additionalProperties": True},
    "google.protobuf.Value": {},
    "google.protobuf.ListValue": {"type": "array", "items": {}},
    "google.protobuf.Any": {
        "type": "object",
        "properties": {"@type": {"type": "string"}},
        "required": ["@type"],
        "additionalProperties": True,
    },
}


# How every answer is written (gateway/transcode.py's renderer), once for the whole API.
JSON_MAPPING = (
    "Bodies are the proto3 JSON mapping: lowerCamelCase names, enums by name, 64-bit integers as strings. "
    "Answers write zero values rather than leaving them out: a count of 0 is `0`, a false `false`, "
    'an empty list `[]`, an empty map `{}`, an unset string `""`; only message fields (a timestamp never set) '
    "are absent until set."
)

# Where the gateway reads a key (services/common/auth): either header.
SECURITY_SCHEMES: JsonObject = {
    "ApiKeyHeader": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    "BearerKey": {"type": "http", "scheme": "bearer", "description": "The same API key, as `Authorization: Bearer <key>`."},
}
_WITH_KEY: list[JsonObject] = [{name: []} for name in SECURITY_SCHEMES]


class _Schemas:
    """components/schemas, filled on demand as routes reference messages and enums."""

    def __init__(self, comments: dict[str, str]) -> None:
        self.components: dict[str, JsonObject] = {}
        self.comments = comments

    def described(self, schema: JsonObject, name: str) -> JsonObject:
        """`schema` with the comment on `name`; a reference is wrapped, since OpenAPI 3.0
        ignores what stands beside a $ref."""
        text = self.comments.get(name)
        if text is None:
            return schema
        return {"allOf": [schema], "description": text} if "$ref" in schema else {**schema, "description": text}

    def field(self, field: FieldDescriptor) -> JsonObject:
        entry = map_entry(field)
        schema: JsonObject
        if entry is not None:
            schema = {"type": "object", "additionalProperties": self.field(entry.fields_by_name["value"])}
        elif field.is_repeated:
            schema = {"type": "array", "items": self._single(field)}
        else:
            schema = self._single(field)
        if field_behavior_pb2.OUTPUT_ONLY in behaviors(field) and "$ref" not in schema:
            schema = {**schema, "readOnly": True}
        return self.described(schema, field.full_name)

    def message(self, descriptor: Descriptor) -> JsonObject:
        name = descriptor.full_name
        if name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[name])
        if name in WRAPPERS:
            return {**self._single(descriptor.fields_by_name["value"]), "nullable": True}
        if name not in self.components:
            self.components[name] = {}  # claimed first: recursive messages refer to themselves
            self.components[name] = self.described(
                {"type": "object", "properties": {field.json_name: self.field(field) for field in descriptor.fields}}, name
            )
        return _ref(name)

    def enum(self, descriptor: EnumDescriptor) -> JsonObject:
        name = descriptor.full_name
        if name not in self.components:
            values = [(value.name, self.comments.get(f"{name}.{value.name}")) for value in descriptor.values]
            listed = "\n".join(f"- `{value}`: {text}" for value, text in values if text)
            text = _paragraphs(self.comments.get(name), listed)
            self.components[name] = {"type": "string", "enum": [value for value, _ in values], **({"description": text} if text else {})}
        return _ref(name)

    def _single(self, field: FieldDescriptor) -> JsonObject:
        if field.enum_type is not None:
            return self.enum(field.enum_type)
        if field.message_type is not None:
            return self.message(field.message_type)
        return dict(_SCALARS[field.type])


def build_openapi(routes: Sequence[HttpRoute], *, auth_enabled: bool, anonymous_reads: bool) -> JsonObject:
    schemas = _Schemas(proto_comments.load())
    error_response = {
        "description": "An error: the JSON of google.rpc.Status (AIP-193).",
        "content": {JSON_MEDIA_TYPE: {"schema": schemas.message(status_pb2.Status.DESCRIPTOR)}},
    }
    paths: dict[str, JsonObject] = {}
    # OpenAPI forbids two paths differing only in parameter names (/agents/{id}, /agents/{agent.id}):
    # templates that match the same URLs share one path and the first one's parameter names.
    spelling: dict[tuple[tuple[str, ...], str, tuple[tuple[int, int | None], ...]], PathTemplate] = {}
    for route in routes:
        template = route.template
        key = (template.segments, template.verb, tuple((v.start, v.stop) for v in template.variables))
        first = spelling.setdefault(key, template)
        method = route.http_method.lower()
        operation_key = method if method in _OPERATION_KEYS else f"x-{method}"
        operation = _operation(route, schemas, error_response, [v.name for v in first.variables])
        if auth_enabled:
            _secure(operation, route, schemas, anonymous_reads)
        paths.setdefault(first.openapi_path, {})[operation_key] = operation
    # API versions are package suffixes (devops_hub.v1): AIP-185.
    packages = {route.method.containing_service.file.package.rsplit(".", 1)[-1] for route in routes}
    versions = sorted(p for p in packages if _VERSION.fullmatch(p))
    services = {route.method.containing_service.name: route.method.containing_service.full_name for route in routes}
    components: JsonObject = {"schemas": dict(sorted(schemas.components.items()))}
    if auth_enabled:
        components["securitySchemes"] = SECURITY_SCHEMES
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "DevOps Hub API", "version": ", ".join(versions) or "v1", "description": JSON_MAPPING},
        "tags": [schemas.described({"name": name}, full_name) for name, full_name in services.items()],
        "paths": paths,
        "components": components,
    }


def _secure(operation: JsonObject, route: HttpRoute, schemas: _Schemas, anonymous_reads: bool) -> None:
    scope = Scope.Name(required_scope(route.method))
    operation["x-required-scope"] = scope
    anonymous = anonymous_reads and scope == Scope.Name(Scope.SCOPE_READ)
    operation["security"] = [{}, *_WITH_KEY] if anonymous else _WITH_KEY
    meaning = schemas.comments.get(f"{Scope.DESCRIPTOR.full_name}.{scope}")
    note = f"Scope `{scope}`" + (f": {meaning}" if meaning else ".")
    operation["description"] = _paragraphs(operation.get("description"), note)


def _operation(route: HttpRoute, schemas: _Schemas, error_response: JsonObject, path_names: list[str]) -> JsonObject:
    operation: JsonObject = {
        "operationId": route.operation_id,
        **schemas.described({}, route.method.full_name),
        "tags": [route.method.containing_service.name],
        "parameters": _path_parameters(route, schemas, path_names) + _query_parameters(route, schemas),
    }
    # A body or reply that is one field: its comment describes the body, not its schema.
    body: JsonObject | None = None
    if route.body == "*":
        body = {"schema": schemas.message(route.method.input_type)}
    elif route.body_field is not None:
        body = _described_by(schemas, route.body_field)
    if body is not None:
        schema = body.pop("schema")
        operation["requestBody"] = {"required": True, **body, "content": {JSON_MEDIA_TYPE: {"schema": schema}}}
    reply = route.response_field
    reply_schema = schemas.message(route.method.output_type) if reply is None else _described_by(schemas, reply)["schema"]
    if route.server_streaming:
        description = (
            "Server-sent events: one `data:` line per message, JSON as below; "
            "a failure mid-stream arrives as an `error` event holding the error body."
        )
        if route.resume is not None:
            request_field, event_field = route.resume
            description += f" Each event's `id:` is the message's `{event_field.json_name}`."
            resumes = f"Resumes after that event: sets `{request_field.json_name}` unless the query does."
            operation["parameters"].append(_header("Last-Event-ID", {"type": "string"}, resumes))
        ok = {"description": description, "content": {"text/event-stream": {"schema": reply_schema}}}
    else:
        ok = {"description": "OK", "content": {JSON_MEDIA_TYPE: {"schema": reply_schema}}}
    for header, field in route.headers:
        if header == IDEMPOTENCY_HEADER:
            safe = f"Makes a retry safe (AIP-155): sets `{field.json_name}` unless the body or query does."
            operation["parameters"].append(_header("Idempotency-Key", {"type": "string", "format": "uuid"}, safe))
    operation["responses"] = {"200": ok, "default": error_response}
    return operation


def _path_parameters(route: HttpRoute, schemas: _Schemas, names: list[str]) -> list[JsonObject]:
    parameters = []
    for name, variable, chain in zip(names, route.template.variables, route.path_fields):
        parameter = {"name": name, "in": "path", "required": True, **_described_by(schemas, chain[-1])}
        if name != variable.name:
            parameter["description"] = _paragraphs(parameter.get("description"), f"Sets the request field `{variable.name}`.")
        parameters.append(parameter)
    return parameters


def _query_parameters(route: HttpRoute, schemas: _Schemas) -> list[JsonObject]:
    """Every field the query string can set: what path and body leave, scalars only
    (the gateway refuses the rest), nested messages flattened with dots."""
    if route.body == "*":
        return []
    bound = route.bound_paths
    parameters: list[JsonObject] = []

    def walk(descriptor: Descriptor, proto_prefix: tuple[str, ...], json_prefix: str, seen: frozenset[str]) -> None:
        for field in descriptor.fields:
            proto_path = (*proto_prefix, field.name)
            if proto_path in bound:
                continue
            name = f"{json_prefix}{field.json_name}"
            if is_scalar_like(field):
                parameter = {"name": name, "in": "query", "required": False, **_described_by(schemas, field)}
                if field.is_repeated:
                    parameter.update(style="form", explode=True)
                parameters.append(parameter)
            elif not field.is_repeated and field.message_type is not None and field.message_type.full_name not in seen:
                walk(field.message_type, proto_path, f"{name}.", seen | {field.message_type.full_name})

    walk(route.method.input_type, (), "", frozenset({route.method.input_type.full_name}))
    return parameters


def _described_by(schemas: _Schemas, field: FieldDescriptor) -> JsonObject:
    """A parameter's schema, its description beside it (where parameters keep theirs)."""
    schema = schemas.field(field)
    text = schema.pop("description", None)
    if "allOf" in schema:
        schema = schema["allOf"][0]
    return {"schema": schema, **({"description": text} if text else {})}


def _paragraphs(*texts: str | None) -> str:
    return "\n\n".join(text for text in texts if text)


def _header(name: str, schema: JsonObject, description: str) -> JsonObject:
    return {"name": name, "in": "header", "required": False, "schema": schema, "description": description}


def _ref(name: str) -> JsonObject:
    return {"$ref": f"#/components/schemas/{name}"}


class OpenApiDocument:
    """The document, encoded once: it only changes when the protos do."""

    def __init__(self, routes: Sequence[HttpRoute], *, auth_enabled: bool, anonymous_reads: bool) -> None:
        self._body = encode(build_openapi(routes, auth_enabled=auth_enabled, anonymous_reads=anonymous_reads))

    async def endpoint(self, request: Request) -> Response:
        return Response(self._body, media_type=JSON_MEDIA_TYPE)
