"""`python -m services.cache_sidecar`: serves CacheService on CACHE_ADDR."""

from __future__ import annotations

from services.cache_sidecar.server import main
from services.common import event_loop
from services.common.settings import Settings
from services.common.telemetry import Telemetry

if __name__ == "__main__":
    settings = Settings.from_env()
    telemetry = Telemetry.start(settings, "cache")
    try:
        event_loop.run(main(settings, telemetry))
    finally:
        telemetry.shutdown()
