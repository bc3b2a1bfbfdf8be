"""`python -m services.cache_sidecar`: serves CacheService on CACHE_ADDR."""

from __future__ import annotations

import asyncio
import logging

from services.cache_sidecar.server import main
from services.common.settings import Settings

if __name__ == "__main__":
    settings = Settings.from_env()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(settings))
