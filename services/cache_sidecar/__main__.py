"""`python -m services.cache_sidecar`: serves CacheService on CACHE_ADDR."""

from services.cache_sidecar.server import main

main()
