"""The performance guide's cache API works as the guide writes it (only the import
path differs): @cached with and without key_prefix on plain JSON values,
@invalidate_cache(key_pattern="agents"), `cache = await get_cache_manager()`,
`cache.stats`; and missing or refused credentials fail at start, loudly."""

from __future__ import annotations

import pytest

from services.cache.client.client import CacheClient
from services.cache.client.decorators import cached, invalidate_cache
from services.cache.client.manager import (
    CacheCredentialsError,
    CacheManager,
    configure,
    get_cache_manager,
    set_cache_manager,
)
from services.cache.client.near_cache import NearCache
from services.cache.sidecar.server import CacheSidecar
from services.common.foundation.settings import Settings
from tests.support.auth import READ, WRITE, new_key
from tests.support.cache import StartSidecar


@pytest.fixture
async def guide_cache(start_sidecar: StartSidecar):
    """The process default, as the guide's code finds it: get_cache_manager()."""
    sidecar: CacheSidecar = await start_sidecar()
    manager = CacheManager(CacheClient(sidecar.host.bound_address, timeout=2.0, near_cache=NearCache()), default_ttl=300)
    previous = set_cache_manager(manager)
    yield manager
    set_cache_manager(previous)
    await manager.close()


async def test_the_guides_decorators_as_written(guide_cache: CacheManager) -> None:
    database = {"agents": [{"id": "a1", "attempts": 1, "score": 0.5}]}
    loads = {"list": 0, "one": 0}

    @cached(ttl=300)
    async def get_agents():
        loads["list"] += 1
        return list(database["agents"])

    @cached(ttl=60, key_prefix="agent")
    async def get_agent(agent_id):
        loads["one"] += 1
        return next((a for a in database["agents"] if a["id"] == agent_id), None)

    @invalidate_cache(key_pattern="agents")
    async def create_agent(agent_data):
        database["agents"].append(agent_data)
        return agent_data

    @invalidate_cache(key_pattern="agent")
    async def retire_agent(agent_id):
        database["agents"] = [a for a in database["agents"] if a["id"] != agent_id]

    assert await get_agents() == await get_agents() == [{"id": "a1", "attempts": 1, "score": 0.5}]
    assert loads["list"] == 1, "the second call is served from the cache"
    attempts = (await get_agents())[0]["attempts"]
    assert attempts == 1 and isinstance(attempts, int), "integral numbers come back as integers"

    await create_agent({"id": "a2", "attempts": 0, "score": 1.0})
    assert [a["id"] for a in await get_agents()] == ["a1", "a2"], "invalidate_cache('agents') reached get_agents"
    assert loads["list"] == 2

    assert (await get_agent("a1"))["id"] == "a1" and (await get_agent("a1"))["id"] == "a1"
    assert loads["one"] == 1
    await retire_agent("a1")
    assert await get_agent("a1") is None and loads["one"] == 2


async def test_the_guides_manager_as_written(guide_cache: CacheManager) -> None:
    cache = await get_cache_manager()
    assert cache is guide_cache
    await cache.set("report", {"ok": 3}, ttl=60)
    assert await cache.get("report") == {"ok": 3}
    assert await cache.delete("report") is True
    assert await cache.get("report") is None
    await cache.set("report", {"ok": 4})
    await cache.clear()
    assert await cache.get("report") is None

    @cached(ttl=60)
    async def get_numbers():
        return [1, 2, 3]

    for _ in range(4):
        await get_numbers()
    stats = cache.stats
    assert (stats["hits"], stats["misses"], stats["hit_rate"]) == (3, 1, "75.0%")
    assert {"type", "size", "max_size"} <= set(stats)
    sidecar = await cache.sidecar_stats()
    assert sidecar is not None and sidecar.sets >= 1


@pytest.mark.fast
def test_missing_credentials_fail_at_start() -> None:
    settings = Settings(cache_addr="127.0.0.1:1", auth_enabled=True, service_api_key="")
    with pytest.raises(CacheCredentialsError, match="SERVICE_API_KEY"):
        CacheManager.from_settings(settings)
    previous = set_cache_manager(None)
    try:
        with pytest.raises(CacheCredentialsError):
            configure(settings)
    finally:
        set_cache_manager(previous)


async def test_a_key_the_sidecar_refuses_fails_at_start(secured) -> None:
    stack, keys_stub = secured
    not_admin = await new_key(keys_stub, READ, WRITE)
    refused = CacheManager.from_settings(stack.settings.replace(service_api_key=not_admin))
    try:
        with pytest.raises(CacheCredentialsError, match="PERMISSION_DENIED"):
            await refused
    finally:
        await refused.close()
    accepted = CacheManager.from_settings(stack.settings)
    try:
        assert await accepted is accepted
    finally:
        await accepted.close()
