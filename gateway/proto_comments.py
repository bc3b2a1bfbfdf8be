"""The protos' own comments, by the full name of what they describe, for the OpenAPI
document. Generated modules drop them (source_code_info) from their descriptors, so
clients/python/gen_protos.py writes a descriptor set that keeps them beside the stubs."""

from __future__ import annotations

import importlib.resources
from collections.abc import Iterator

from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

DESCRIPTOR_SET = "descriptor_set.pb"

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
        names = dict(_names((), file.package, file))
        for location in file.source_code_info.location:
            name = names.get(tuple(location.path))
            text = location.leading_comments or location.trailing_comments
            if name is not None and text.strip():
                comments[name] = "\n".join(line.removeprefix(" ") for line in text.strip("\n").splitlines()).strip()
    return comments


def _names(path: Path, scope: str, proto: Message) -> Iterator[tuple[Path, str]]:
    """Everything named inside `proto`, at its source_code_info path: the numbers are
    descriptor.proto's own field numbers, read from its descriptors, not written out here."""
    for field, value in proto.ListFields():
        if not field.is_repeated or field.message_type is None or "name" not in field.message_type.fields_by_name:
            continue
        for i, element in enumerate(value):
            name = f"{scope}.{element.name}"
            yield (*path, field.number, i), name
            yield from _names((*path, field.number, i), name, element)
