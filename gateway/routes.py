"""The route table: every google.api.http rule of every generated service, read from the
descriptors alone and resolved once. A rule the gateway could not serve is refused at
start-up, not on the first request, so a broken proto never becomes a half-working route."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from devops_hub.v1 import options_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor, ServiceDescriptor
from google.protobuf.message import Message

from gateway.templates import PathTemplate, TemplateError
from services.common.contract.api import backend_of
from services.common.runtime.idempotency import KEY_FIELD

# The header clients send a retry's key in (the IETF httpapi draft's name, Stripe's).
IDEMPOTENCY_HEADER = b"idempotency-key"


class RouteError(ValueError):
    """An http rule the gateway cannot serve; raised while the app is being built."""


@dataclasses.dataclass(frozen=True, slots=True)
class HttpRoute:
    http_method: str
    template: PathTemplate
    method: MethodDescriptor
    backend: str
    # "" (no body), "*" (the whole request) or the name of one request field.
    body: str
    body_field: FieldDescriptor | None
    # The field chain each template variable sets, in template order.
    path_fields: tuple[tuple[FieldDescriptor, ...], ...]
    # The one response field rendered instead of the whole response, if any.
    response_field: FieldDescriptor | None
    request_class: type[Message]
    response_class: type[Message]
    # 0 for the rule itself, n for its n-th additional binding.
    binding: int
    # A server stream's resume position, (request field, streamed message's field), from
    # the `resumes_after` option: the SSE Last-Event-ID and each event's id.
    resume: tuple[FieldDescriptor, FieldDescriptor] | None = None
    # Request fields a header sets (lower-case name, field) when the query or body has
    # not: Last-Event-ID the resume field, Idempotency-Key an AIP-155 request_id.
    headers: tuple[tuple[bytes, FieldDescriptor], ...] = ()

    @property
    def service(self) -> str:
        return self.method.containing_service.full_name

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def operation_id(self) -> str:
        base = f"{self.method.containing_service.name}_{self.method.name}"
        return f"{base}_{self.binding}" if self.binding else base

    @property
    def bound_paths(self) -> frozenset[tuple[str, ...]]:
        """Field paths (proto names) the path and body already set: the query may not touch them."""
        paths = {tuple(f.name for f in chain) for chain in self.path_fields}
        if self.body_field is not None:
            paths.add((self.body_field.name,))
        return frozenset(paths)


def build_routes(services: Iterable[ServiceDescriptor], backend_of_service: Mapping[str, str] | None = None) -> list[HttpRoute]:
    """Every http rule of `services`, each calling the backend its service declares
    (`option (backend)`) unless `backend_of_service` says otherwise (tests' own services)."""
    routes: list[HttpRoute] = []
    for service in services:
        for method in service.methods:
            options = method.GetOptions()
            if not options.HasExtension(annotations_pb2.http):
                continue
            rule = options.Extensions[annotations_pb2.http]
            backend = backend_of(service) if backend_of_service is None else backend_of_service.get(service.full_name)
            if not backend:
                raise RouteError(
                    f"{service.full_name} has http rules but no backend: declare the part that serves it in its"
                    f' service block, option (backend) = "<name>"; (protos/devops_hub/v1/options.proto), and give'
                    " Settings a <name>_addr"
                )
            if method.client_streaming:
                raise RouteError(f"{service.full_name}.{method.name}: client streaming cannot be mapped to HTTP")
            bindings = [rule, *rule.additional_bindings]
            routes.extend(_route(method, binding, index, backend) for index, binding in enumerate(bindings))
    return routes


def _route(method: MethodDescriptor, rule: http_pb2.HttpRule, index: int, backend: str) -> HttpRoute:
    where = f"{method.full_name} (binding {index})"
    kind = rule.WhichOneof("pattern")
    if kind is None:
        raise RouteError(f"{where}: http rule has no pattern")
    if kind == "custom":
        http_method, path = rule.custom.kind.upper(), rule.custom.path
    else:
        http_method, path = kind.upper(), getattr(rule, kind)
    try:
        template = PathTemplate.parse(path)
    except TemplateError as exc:
        raise RouteError(f"{where}: {exc}") from None

    request_type, response_type = method.input_type, method.output_type
    path_fields = tuple(_path_field(request_type, v.field_path, where) for v in template.variables)

    body_field = None
    if rule.body and rule.body != "*":
        body_field = request_type.fields_by_name.get(rule.body)
        if body_field is None:
            raise RouteError(f"{where}: body {rule.body!r} is not a field of {request_type.full_name}")

    response_field = None
    if rule.response_body:
        response_field = response_type.fields_by_name.get(rule.response_body)
        if response_field is None:
            raise RouteError(f"{where}: response_body {rule.response_body!r} is not a field of {response_type.full_name}")

    resume = _resume_fields(method, where) if method.server_streaming else None
    headers = [(b"last-event-id", resume[0])] if resume is not None else []
    request_id = request_type.fields_by_name.get(KEY_FIELD)
    if request_id is not None and request_id.type == FieldDescriptor.TYPE_STRING:
        headers.append((IDEMPOTENCY_HEADER, request_id))

    return HttpRoute(
        http_method=http_method,
        template=template,
        method=method,
        backend=backend,
        body=rule.body,
        body_field=body_field,
        path_fields=path_fields,
        response_field=response_field,
        request_class=message_factory.GetMessageClass(request_type),
        response_class=message_factory.GetMessageClass(response_type),
        binding=index,
        resume=resume,
        headers=tuple(headers),
    )


def _resume_fields(method: MethodDescriptor, where: str) -> tuple[FieldDescriptor, FieldDescriptor] | None:
    for field in method.input_type.fields:
        # protoc's .pyi types extensions as plain FieldDescriptors.
        position: str = field.GetOptions().Extensions[options_pb2.resumes_after]  # type: ignore[index]
        if not position:
            continue
        event_field = method.output_type.fields_by_name.get(position)
        if event_field is None or field.type != FieldDescriptor.TYPE_STRING or event_field.type != FieldDescriptor.TYPE_STRING:
            raise RouteError(f"{where}: {field.name} resumes after {position!r}, which must name a string field of both messages")
        return field, event_field
    return None


def _path_field(message: Descriptor, field_path: tuple[str, ...], where: str) -> tuple[FieldDescriptor, ...]:
    """Resolves `agent.id` to its field chain; the leaf must be a single scalar or enum."""
    chain: list[FieldDescriptor] = []
    current: Descriptor | None = message
    for name in field_path:
        field = current.fields_by_name.get(name) if current is not None else None
        if field is None:
            raise RouteError(f"{where}: path variable {'.'.join(field_path)!r} is not a field of {message.full_name}")
        chain.append(field)
        current = field.message_type
    leaf = chain[-1]
    if leaf.is_repeated or leaf.type == FieldDescriptor.TYPE_MESSAGE:
        raise RouteError(f"{where}: path variable {'.'.join(field_path)!r} must be a single scalar or enum field")
    if any(f.is_repeated for f in chain[:-1]):
        raise RouteError(f"{where}: path variable {'.'.join(field_path)!r} goes through a repeated field")
    return tuple(chain)
