"""The protos' own comments, by the full name of what they describe, for the OpenAPI
document. Generated modules drop them (source_code_info) from their descriptors, so
clients/python/gen_protos.py writes a descriptor set that keeps them beside the stubs.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator

from google.protobuf import descriptor_pb2

DESCRIPTOR_SET = "descriptor_set.pb"

# FileDescriptorProto / DescriptorProto / ... field numbers, as source_code_info paths use them.
_MESSAGE, _ENUM, _SERVICE = 4, 5, 6
_FIELD, _NESTED, _NESTED_ENUM = 2, 3, 4
_ENUM_VALUE, _METHOD = 2, 2

Path = tuple[int, ...]


def load() -> dict[str, str]:
    """Comment by full name (`devops_hub.v1.Agent.domain`, `devops_hub.v1.AgentsService.GetAgent`;
    an enum value under its enum: `devops_hub.v1.Agent.Type.TASK`). Empty when the
    stubs were generated without the descriptor set."""
    resource = importlib.resources.files("devops_hub") / DESCRIPTOR_SET
    if not resource.is_file():
        return {}
    files = descriptor_pb2.FileDescriptorSet.FromString(resource.read_bytes())
    comments: dict[str, str] = {}
    for file in files.file:
        names = dict(_names(file))
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = location.leading_comments or location.trailing_comments
            if name is not None and text.strip():
                comments[name] = "\n".join(line.removeprefix(" ") for line in text.strip("\n").splitlines()).strip()
    return comments


def _names(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[Path, str]]:
    scope = file.package
    for i, message in enumerate(file.message_type):
        yield from _message((_MESSAGE, i), f"{scope}.{message.name}", message)
    for i, enum in enumerate(file.enum_type):
        yield from _enum((_ENUM, i), f"{scope}.{enum.name}", enum)
    for i, service in enumerate(file.service):
        yield (_SERVICE, i), f"{scope}.{service.name}"
        for j, method in enumerate(service.method):
            yield (_SERVICE, i, _METHOD, j), f"{scope}.{service.name}.{method.name}"


def _message(path: Path, name: str, message: descriptor_pb2.DescriptorProto) -> Iterator[tuple[Path, str]]:
    yield path, name
    for i, field in enumerate(message.field):
        yield (*path, _FIELD, i), f"{name}.{field.name}"
    for i, nested in enumerate(message.nested_type):
        yield from _message((*path, _NESTED, i), f"{name}.{nested.name}", nested)
    for i, enum in enumerate(message.enum_type):
        yield from _enum((*path, _NESTED_ENUM, i), f"{name}.{enum.name}", enum)


def _enum(path: Path, name: str, enum: descriptor_pb2.EnumDescriptorProto) -> Iterator[tuple[Path, str]]:
    yield path, name
    for i, value in enumerate(enum.value):
        yield (*path, _ENUM_VALUE, i), f"{name}.{value.name}"
