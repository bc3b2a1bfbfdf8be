"""`python -m services.cache.sidecar`: serves CacheService on CACHE_ADDR."""

from services.cache.sidecar.server import main

main()
