"""`make test`'s scheduling (pytest-xdist, --dist loadgroup): the tests of one
`xdist_group` run on one worker, one after another; every other test is handed out
alone, in the order tests/conftest.py sorts them.

pytest-xdist 3.8 groups tests by a suffix it appends to their node ids, which pytest 9
no longer lets a plugin change: its own loadgroup then groups nothing. So the workers
write the groups they collected to a file the controller named, and the controller's
scheduler (LoadScopeScheduling, whose unit of work is a "scope") reads it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling

GROUPS_FILE = "DEVOPS_HUB_XDIST_GROUPS"


def name_the_file(config: pytest.Config) -> None:
    """In the controller, before the workers start: where they write the groups."""
    if config.getoption("dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        handle, path = tempfile.mkstemp(prefix="dh-xdist-groups-", suffix=".json")
        os.close(handle)
        os.environ[GROUPS_FILE] = path


def remove_the_file(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput") and GROUPS_FILE in os.environ:
        Path(os.environ.pop(GROUPS_FILE)).unlink(missing_ok=True)


def write_groups(items: list[pytest.Item]) -> None:
    """In a worker, once collected: {node id: group} for the tests with an xdist_group.
    Every worker collects the same tests, so whichever writes last writes the same."""
    path = os.environ.get(GROUPS_FILE)
    if path is None or "PYTEST_XDIST_WORKER" not in os.environ:
        return
    groups = {item.nodeid: marker.args[0] for item in items if (marker := item.get_closest_marker("xdist_group"))}
    written = f"{path}.{os.environ['PYTEST_XDIST_WORKER']}"
    Path(written).write_text(json.dumps(groups))
    os.replace(written, path)


class MarkedGroups(LoadScopeScheduling):
    """One scope per xdist_group, one per test otherwise; scopes in collection order
    (as tests/conftest.py sorts it), not largest first."""

    def __init__(self, config: pytest.Config, log: Any = None) -> None:
        super().__init__(config, log)
        self._groups: dict[str, str] | None = None

    def _split_scope(self, nodeid: str) -> str:
        if self._groups is None:
            # Read once every worker has collected, which is when scopes are first asked for.
            self._groups = json.loads(Path(os.environ[GROUPS_FILE]).read_text() or "{}")
        return self._groups.get(nodeid, nodeid)


def make_scheduler(config: pytest.Config, log: Any) -> MarkedGroups | None:
    if config.getoption("dist", "no") != "loadgroup":
        return None
    config.option.loadscopereorder = False
    return MarkedGroups(config, log)
