"""Every input the schema admits is answered without a server error.

For every unary RPC of the API, hypothesis generates request messages from the
descriptors: every string field (map keys included) gets text with NUL, control and
astral characters, every number field values across its whole range, floats
infinities and NaN, every google.protobuf.Struct arbitrary JSON. Each message is sent
over gRPC and, through the gateway, over HTTP (where numbers beyond what the field
holds, and 1e400, are tried as well). No answer may be a 5xx / a server-fault code.
Run on both engines: PostgreSQL refuses more than SQLite does.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import grpc
import httpx
import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from gateway.routes import build_routes
from services.common.contract.api import discover_services
from tests.support.api import BACKEND_OF_SERVICE
from tests.support.databases import fresh_schema
from tests.support.stack import gateway_client, make_settings, running_stack

# One worker runs the module (its stacks are module-scoped, one per engine), early:
# together its tests take as long as the slowest test.
pytestmark = [pytest.mark.xdist_group("input_properties"), pytest.mark.slow]

# Codes that blame the server (HTTP 5xx). DEADLINE_EXCEEDED is the caller's own deadline.
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS,
                 grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE}
EXAMPLES = 12
MAX_DEPTH = 3

F = FieldDescriptor
TEXT = st.one_of(
    st.text(st.characters(codec="utf-8"), max_size=12),
    st.sampled_from(["\x00", "a\x00b", "%00", "\u202e", "\U0001f4a5", "../..", "x" * 300, "*", "agents:*", " "]),
)
INTEGERS = {
    F.TYPE_INT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SINT32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_SFIXED32: st.integers(-(2**31), 2**31 - 1),
    F.TYPE_INT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SINT64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_SFIXED64: st.integers(-(2**63), 2**63 - 1),
    F.TYPE_UINT32: st.integers(0, 2**32 - 1),
    F.TYPE_FIXED32: st.integers(0, 2**32 - 1),
    F.TYPE_UINT64: st.integers(0, 2**64 - 1),
    F.TYPE_FIXED64: st.integers(0, 2**64 - 1),
}
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-(2**60), 2**60) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)


def scalar(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind == F.TYPE_STRING:
        return TEXT
    if kind == F.TYPE_BYTES:
        return st.binary(max_size=16)
    if kind == F.TYPE_BOOL:
        return st.booleans()
    if kind in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return st.floats(width=64 if kind == F.TYPE_DOUBLE else 32)
    if kind == F.TYPE_ENUM:
        # Open enums: values the enum does not name arrive too.
        return st.sampled_from([v.number for v in field.enum_type.values]) | st.integers(-3, 1000)
    return INTEGERS[kind]


def message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    name = descriptor.full_name
    if name == "google.protobuf.Struct":
        return st.dictionaries(TEXT, JSON_VALUES, max_size=4).map(lambda d: _struct(cls, d))
    if name == "google.protobuf.Value":
        return JSON_VALUES.map(lambda v: _value(cls, v))
    if name == "google.protobuf.Timestamp":
        return st.integers(-62135596800, 253402300799).map(lambda s: cls(seconds=s))
    if name == "google.protobuf.Duration":
        return st.tuples(st.integers(-10**6, 10**6), st.integers(0, 999_999_999)).map(lambda p: cls(seconds=p[0], nanos=p[1] if p[0] >= 0 else -p[1]))
    if depth >= MAX_DEPTH:
        return st.just(cls())
    fields = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            strategy = st.dictionaries(scalar(key), _one(value, depth), max_size=3)
        elif field.is_repeated:
            strategy = st.lists(_one(field, depth), max_size=3)
        else:
            strategy = _one(field, depth)
        fields[field.name] = strategy
    return st.fixed_dictionaries({}, optional=fields).map(lambda values: _build(cls, values))


def _one(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    return message(field.message_type, depth + 1) if field.type == F.TYPE_MESSAGE else scalar(field)


def _build(cls: type[Message], values: dict[str, Any]) -> Message:
    built = cls()
    for name, value in values.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if field.containing_oneof is not None and built.WhichOneof(field.containing_oneof.name):
            continue
        target = getattr(built, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            for key, item in value.items():
                if isinstance(item, Message):
                    target[key].CopyFrom(item)
                else:
                    target[key] = item
        elif field.is_repeated:
            if field.type == F.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif field.type == F.TYPE_MESSAGE:
            target.CopyFrom(value)
        else:
            setattr(built, name, value)
    return built


def _struct(cls, document: dict) -> Message:
    struct = cls()
    for key, value in document.items():
        _set_value(struct.fields[key], value)
    return struct


def _value(cls, value: Any) -> Message:
    built = cls()
    _set_value(built, value)
    return built


def _set_value(target, value: Any) -> None:
    if value is None:
        target.null_value = 0
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, (int, float)):
        target.number_value = float(value)
    elif isinstance(value, str):
        target.string_value = value
    elif isinstance(value, list):
        target.list_value.SetInParent()
        for item in value:
            _set_value(target.list_value.values.add(), item)
    else:
        target.struct_value.SetInParent()
        for key, item in value.items():
            _set_value(target.struct_value.fields[key], item)


SERVED = [
    method
    for service in discover_services()
    if service.full_name in BACKEND_OF_SERVICE
    for method in service.methods
    if not method.server_streaming and not method.client_streaming
]
ROUTES = [route for route in build_routes(discover_services(), BACKEND_OF_SERVICE) if not route.method.server_streaming]


class Running:
    """The stack and gateway on an event loop of their own, in a thread, so that
    hypothesis (which drives plain functions) can send it calls."""

    def __init__(self, database_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self._stop = asyncio.Event()
        self._ready: asyncio.Future | None = None
        self.channel: grpc.aio.Channel
        self.http: httpx.AsyncClient
        started = threading.Event()
        self._task = asyncio.run_coroutine_threadsafe(self._serve(database_url, started), self.loop)
        if not started.wait(120):
            raise RuntimeError("the stack did not start")
        if self._task.done():
            self._task.result()

    async def _serve(self, database_url: str, started: threading.Event) -> None:
        settings = make_settings(database_url)
        async with running_stack(settings, with_workflows=True) as stack, gateway_client(stack.settings, timeout=30) as http:
            self.channel, self.http = stack.channel, http
            self.workflows_channel = grpc.aio.insecure_channel(stack.settings.workflows_addr)
            self.cache_channel = grpc.aio.insecure_channel(stack.settings.cache_addr)
            started.set()
            await self._stop.wait()
            await self.workflows_channel.close()
            await self.cache_channel.close()

    def run(self, make: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        return asyncio.run_coroutine_threadsafe(make(), self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._task.result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('props')}/hub.db"
    else:
        url = request.getfixturevalue("pg_server_url")
        asyncio.run(fresh_schema(url))
    running = Running(url)
    yield running
    running.close()


def channel_for(running: Running, method) -> grpc.aio.Channel:
    backend = BACKEND_OF_SERVICE[method.containing_service.full_name]
    return {"agents": running.channel, "workflows": running.workflows_channel, "cache": running.cache_channel}[backend]


PROPERTY = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("method", SERVED, ids=lambda m: m.full_name)
def test_every_message_over_grpc_gets_an_answer_that_is_not_a_server_fault(stack, method):
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    call = None

    @PROPERTY
    @given(message(method.input_type))
    def check(request: Message) -> None:
        async def send() -> grpc.StatusCode:
            nonlocal call
            if call is None:
                call = channel_for(stack, method).unary_unary(
                    f"/{method.containing_service.full_name}/{method.name}",
                    request_serializer=request_class.SerializeToString,
                    response_deserializer=response_class.FromString,
                )
            try:
                await call(request, timeout=20)
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        code = stack.run(send)
        assert code not in SERVER_FAULTS, (code, request)

    check()


# What HTTP can say that a message cannot: numbers beyond any field, and 1e400.
HUGE = "__huge__"
OVERSIZED = st.sampled_from([None, 2**70, -(2**70), HUGE])


def _numbers_replaced(document: Any, replacement: Any) -> Any:
    """The JSON document with every number replaced, to try out-of-range values."""
    if isinstance(document, dict):
        return {key: _numbers_replaced(value, replacement) for key, value in document.items()}
    if isinstance(document, list):
        return [_numbers_replaced(value, replacement) for value in document]
    if isinstance(document, (int, float)) and not isinstance(document, bool):
        return replacement
    return document


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.http_method} {r.template.text}")
def test_every_message_over_http_gets_an_answer_below_500(stack, route):
    @PROPERTY
    @given(message(route.method.input_type), OVERSIZED)
    def check(request: Message, oversized: Any) -> None:
        try:
            document = json_format.MessageToDict(request, preserving_proto_field_name=True)
        except json_format.SerializeToJsonError:
            assume(False)  # a FieldMask path JSON cannot spell (gRPC tries those)
        path = route.template.openapi_path
        for variable in route.template.variables:
            value = document
            for part in variable.field_path:
                value = value.get(part, "") if isinstance(value, dict) else ""
            path = path.replace("{" + variable.name + "}", quote(str(value) or "x", safe=""))
            _drop(document, variable.field_path)
        body = None
        params: list[tuple[str, str]] = []
        if route.body == "*":
            body = document
        elif route.body:
            body = document.get(route.body, {})
        else:
            params = _query(document)
        if body is not None and oversized is not None:
            body = _numbers_replaced(body, oversized)
        content = None if body is None else json.dumps(body).replace(f'"{HUGE}"', "1e400").encode()
        headers = {"content-type": "application/json"} if content is not None else {}

        async def send() -> httpx.Response:
            return await stack.http.request(route.http_method, path, params=params, content=content, headers=headers)

        response = stack.run(send)
        assert response.status_code < 500, (response.status_code, response.text, path, params, content)

    check()


def _drop(document: dict, field_path: tuple[str, ...]) -> None:
    for part in field_path[:-1]:
        document = document.get(part, {})
    if isinstance(document, dict):
        document.pop(field_path[-1], None)


def _query(document: dict) -> list[tuple[str, str]]:
    """The scalar fields (and lists of them) as query parameters."""
    params = []
    for name, value in document.items():
        values = value if isinstance(value, list) else [value]
        if all(isinstance(v, (str, int, float, bool)) for v in values):
            params += [(name, json.dumps(v) if isinstance(v, bool) else str(v)) for v in values]
    return params
