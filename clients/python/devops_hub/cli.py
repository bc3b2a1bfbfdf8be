"""`devops-hub`: DevOps Hub from the shell, for people (tables) and scripts (--json,
exit codes).

Agents and workflows are served by different parts of the system, each at its own
address: --agents-addr, --workflows-addr and --cache-addr default to AGENTS_ADDR,
WORKFLOWS_ADDR and CACHE_ADDR, the variables the stack itself reads; --api-key to
DEVOPS_HUB_API_KEY. Filters are the request's own fields, read from the descriptors.
The exit codes (EXIT_CODES) are the contract scripts rely on; docs/client.md lists them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TextIO

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from devops_hub import errors
from devops_hub.channels import DEFAULT_TIMEOUT, addresses_from_env
from devops_hub.client import Client
from devops_hub.v1 import agents_pb2, auth_pb2, events_pb2, options_pb2, workflows_pb2

OK, FAILED, USAGE, NOT_FOUND, PERMISSION, UNAVAILABLE, CONFLICT, RATE_LIMITED, INTERRUPTED, PIPE_CLOSED = 0, 1, 2, 3, 4, 5, 6, 7, 130, 141
# The exit code of each failure; any other error is FAILED.
EXIT_CODES: dict[type[errors.ApiError], int] = {
    errors.InvalidArgument: USAGE,
    errors.NotFound: NOT_FOUND,
    errors.Unauthenticated: PERMISSION,
    errors.PermissionDenied: PERMISSION,
    errors.Unavailable: UNAVAILABLE,
    errors.DeadlineExceeded: UNAVAILABLE,
    errors.AlreadyExists: CONFLICT,
    errors.Aborted: CONFLICT,
    errors.FailedPrecondition: CONFLICT,
    errors.RateLimited: RATE_LIMITED,
}
CELL_WIDTH = 40
Command = Callable[[Client, argparse.Namespace, "Output"], Awaitable[int]]


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    output = Output(args.json)
    addresses = {backend: getattr(args, f"{backend}_addr") for backend in addresses_from_env()}
    try:
        return asyncio.run(_run(args.command, addresses, args, output))
    except errors.ApiError as error:
        output.error(error)
        return EXIT_CODES.get(type(error), FAILED)
    except BrokenPipeError:
        # Whoever read the output stopped (`| head`): end as a program killed by
        # SIGPIPE would, silently, and without Python's complaint when it flushes at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return PIPE_CLOSED
    except (ValueError, OSError, json_format.ParseError) as error:
        # A file that is missing or not the JSON of the message, a part with no address.
        print(f"devops-hub: {error}", file=sys.stderr)
        return USAGE
    except KeyboardInterrupt:
        return INTERRUPTED


async def _run(command: Command, addresses: dict[str, str], args: argparse.Namespace, output: Output) -> int:
    # The channels belong to the loop asyncio.run() makes: opened inside it.
    async with Client.connect(addresses, args.api_key, timeout=args.timeout) as hub:
        return await command(hub, args, output)


class Output:
    """Messages as tables and key: value lines, or as JSON (protobuf's JSON mapping, as
    the HTTP API writes it) with one object a line for streams."""

    def __init__(self, as_json: bool, out: TextIO = sys.stdout) -> None:
        self.as_json = as_json
        self._out = out

    def one(self, message: Message) -> None:
        values = _values(message)
        if self.as_json:
            self._print(json.dumps(values, indent=2))
        for name, value in () if self.as_json else values.items():
            self._print(f"{name}: {_cell(value, width=0)}")

    def many(self, messages: list[Message]) -> None:
        rows = [_values(m) for m in messages]
        if self.as_json:
            self._print(json.dumps(rows, indent=2))
            return
        # The columns: the message's fields, in order, that some row sets to a plain value.
        fields = messages[0].DESCRIPTOR.fields if messages else []
        columns = [f.json_name for f in fields if any(_plain(row.get(f.json_name)) for row in rows)]
        table = [columns, *([_cell(row.get(c, "")) for c in columns] for row in rows)]
        widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
        for line in table:
            self._print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())

    def event(self, event: events_pb2.Event) -> None:
        if self.as_json:
            self._print(json.dumps(json_format.MessageToDict(event)))
            return
        # What the line says already (the subject, the execution's id) is not repeated.
        said = {event.subject, event.correlation_id}
        data = " ".join(f"{k}={_cell(v, width=0)}" for k, v in json_format.MessageToDict(event.data).items() if v not in said)
        self._print(f"{event.time.ToJsonString()}  {event.type:<20} {event.subject}  {data}".rstrip())

    def error(self, error: errors.ApiError) -> None:
        if self.as_json:
            body: dict[str, Any] = {"code": error.code.name, "message": error.message, "reason": error.reason, "metadata": error.metadata}
            body |= {"violations": [{"field": f, "description": d} for f, d in error.violations], "retryAfter": error.retry_after}
            print(json.dumps(body), file=sys.stderr)
            return
        print(f"devops-hub: {error.code.name}: {error.message}" + (f" ({error.reason})" if error.reason else ""), file=sys.stderr)
        for field, description in error.violations:
            print(f"  {field}: {description}", file=sys.stderr)
        if error.retry_after is not None:
            print(f"  retry after {error.retry_after:g}s", file=sys.stderr)

    def _print(self, text: str) -> None:
        print(text, file=self._out, flush=True)


def _values(message: Message) -> dict[str, Any]:
    """The message as JSON, zeros included (a count of 0 is an answer too), in the
    proto's field order."""
    values = json_format.MessageToDict(message, always_print_fields_with_no_presence=True)
    return {f.json_name: values[f.json_name] for f in message.DESCRIPTOR.fields if f.json_name in values}


def _nested(value: Any) -> bool:
    """A message or a list of them (as JSON: a dict, or a list holding dicts)."""
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, dict) for v in value))


def _plain(value: Any) -> bool:
    """A value worth a column: set, and not nested."""
    return value not in (None, "", []) and not _nested(value)


def _cell(value: Any, width: int = CELL_WIDTH) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a Struct's numbers are doubles: attempts=1, not 1.0
    text = json.dumps(value) if _nested(value) else ",".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if not width or len(text) <= width else text[: width - 1] + "…"


# ------------------------------------------------------------------ the commands


async def agents_list(hub: Client, args: argparse.Namespace, output: Output) -> int:
    output.many(await _take(hub.list_agents(**_fields(args)), args.limit))
    return OK


async def agents_get(hub: Client, args: argparse.Namespace, output: Output) -> int:
    output.one(await hub.get_agent(args.id))
    return OK


async def agents_create(hub: Client, args: argparse.Namespace, output: Output) -> int:
    agent = json_format.ParseDict(_read_json(args.file), agents_pb2.Agent())
    output.one(await hub.create_agent(agent))
    return OK


async def agents_delete(hub: Client, args: argparse.Namespace, output: Output) -> int:
    await hub.delete_agent(args.id, args.etag)
    return OK


async def workflows_list(hub: Client, args: argparse.Namespace, output: Output) -> int:
    output.many(await _take(hub.list_workflows(), args.limit))
    return OK


async def workflows_run(hub: Client, args: argparse.Namespace, output: Output) -> int:
    """Runs the workflow NAME (its id, or else its name); with --watch, prints each
    transition as it happens and exits FAILED unless the execution succeeded."""
    workflow = await _workflow(hub, args.name)
    execution = await hub.execute_workflow(workflow.id, _read_json(args.input, text=True), args.idempotency_key)
    if not args.watch:
        output.one(execution)
        return OK
    async for event in hub.watch_execution(execution.id):
        output.event(event)
    execution = await hub.get_execution(execution.id)
    if not output.as_json:
        print(f"execution {execution.id}: {workflows_pb2.Execution.Status.Name(execution.status)}", file=sys.stderr)
    return OK if execution.status == workflows_pb2.Execution.SUCCEEDED else FAILED


async def events_tail(hub: Client, args: argparse.Namespace, output: Output) -> int:
    """Follows the events as they are stored until interrupted, or until --count of them."""
    events = hub.stream_events(**_fields(args))
    count = 0
    async for event in events:
        output.event(event)
        count += 1
        if count == args.count:
            break
    await events.aclose()  # ends the call
    return OK


async def keys_create(hub: Client, args: argparse.Namespace, output: Output) -> int:
    scopes = [_SCOPES[s] for s in args.scope]
    created = await hub.create_api_key(auth_pb2.ApiKey(name=args.name, scopes=scopes))
    if output.as_json:
        output.one(created)
    else:
        print(created.key, flush=True)
        print(f"id {created.api_key.id}: shown this once, store it now", file=sys.stderr)
    return OK


async def cache_stats(hub: Client, args: argparse.Namespace, output: Output) -> int:
    output.one(await hub.cache_stats())
    return OK


async def _workflow(hub: Client, name: str) -> workflows_pb2.Workflow:
    try:
        return await hub.get_workflow(name)
    except errors.NotFound:
        named = [w async for w in hub.list_workflows() if w.name == name]
        if len(named) != 1:
            raise
        return named[0]


async def _take(items: AsyncIterator[Message], limit: int) -> list[Message]:
    taken: list[Message] = []
    async for item in items:
        taken.append(item)
        if len(taken) == limit:
            break
    return taken


def _read_json(source: str | None, text: bool = False) -> Any:
    """JSON from a file, '-' (stdin), or with `text` the argument itself; {} for none."""
    if source is None:
        return {}
    if source == "-":
        return json.load(sys.stdin)
    if text and source.lstrip().startswith("{"):
        return json.loads(source)
    with open(source) as file:
        return json.load(file)


# ------------------------------------------------------------------ the parser


def _scope_name(value: str) -> str:
    return value.removeprefix("SCOPE_").lower()


_SCOPES = {_scope_name(v.name): v.name for v in options_pb2.Scope.DESCRIPTOR.values if v.number}


def _filter_flags(parser: argparse.ArgumentParser, request: type[Message], skip: Iterable[str] = ("page_size", "page_token")) -> None:
    """A flag for each plain field of `request` (its filters), as the proto declares them."""
    flags = [f for f in request.DESCRIPTOR.fields if f.name not in skip and f.message_type is None and not f.is_repeated]
    for field in flags:
        choices = [v.name for v in field.enum_type.values if v.number] if field.enum_type else None
        kind = int if field.cpp_type in (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64) else str
        flag = f"--{field.name.replace('_', '-')}"
        parser.add_argument(flag, dest=f"field_{field.name}", type=kind, choices=choices, metavar=None if choices else field.name.upper())


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The request fields that _filter_flags' flags set."""
    return {k.removeprefix("field_"): v for k, v in vars(args).items() if k.startswith("field_") and v is not None}


def _common(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The connection and output flags, before or after the command: the command's own
    copies (defaults=False) leave the values given before it in place."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    env = os.environ
    for backend, address in addresses_from_env(env).items():
        parser.add_argument(f"--{backend}-addr", default=default(address), metavar="HOST:PORT", help=f"{backend} (env {backend.upper()}_ADDR)")
    parser.add_argument("--api-key", default=default(env.get("DEVOPS_HUB_API_KEY", "")), help="API key (env DEVOPS_HUB_API_KEY)")
    parser.add_argument("--timeout", type=float, default=default(DEFAULT_TIMEOUT), help="seconds each call may take")
    parser.add_argument("--json", action="store_true", default=default(False), help="JSON output, for scripts")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="devops-hub", description="DevOps Hub from the shell.", epilog="exit codes: docs/client.md")
    _common(top, defaults=True)
    groups = top.add_subparsers(dest="group", required=True, metavar="{agents,workflows,events,keys,cache}")

    def command(group: Any, name: str, run: Command, help: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
        _common(sub, defaults=False)
        sub.set_defaults(command=run)
        return sub

    def group(name: str, help: str) -> Any:
        return groups.add_parser(name, help=help).add_subparsers(dest="verb", required=True)

    agents = group("agents", "the agent registry")
    listing = command(agents, "list", agents_list, "list agents, filtered by the request's fields")
    _filter_flags(listing, agents_pb2.ListAgentsRequest)
    listing.add_argument("--limit", type=int, default=0, help="at most this many (0: all)")
    command(agents, "get", agents_get, "one agent").add_argument("id")
    command(agents, "create", agents_create, "create an agent from its JSON").add_argument(
        "file", help="a JSON Agent (the HTTP API's body), '-' for stdin"
    )
    delete = command(agents, "delete", agents_delete, "delete an agent")
    delete.add_argument("id")
    delete.add_argument("--etag", default="", help="only if the agent is still at this etag")

    workflows = group("workflows", "workflows and their executions")
    command(workflows, "list", workflows_list, "list workflows").add_argument("--limit", type=int, default=0)
    run = command(workflows, "run", workflows_run, "run a workflow")
    run.add_argument("name", help="the workflow's id, or else its name")
    run.add_argument("--input", help="the execution's input: JSON, a JSON file, or '-' for stdin")
    run.add_argument("--idempotency-key", default="", help="a retried run with the same key is the same execution")
    run.add_argument("--watch", action="store_true", help="print each step's progress until the execution ends")

    events = group("events", "the event log")
    tail = command(events, "tail", events_tail, "follow events as they happen")
    _filter_flags(tail, events_pb2.StreamEventsRequest)
    tail.add_argument("--count", type=int, default=0, help="stop after this many events (0: never)")

    keys = group("keys", "API keys (admin)")
    create = command(keys, "create", keys_create, "create an API key and print it")
    create.add_argument("name")
    create.add_argument("--scope", action="append", choices=list(_SCOPES), required=True, help="repeat for several")

    cache = group("cache", "the cache sidecar (admin)")
    command(cache, "stats", cache_stats, "hits, misses, entries")
    return top


if __name__ == "__main__":
    sys.exit(main())
