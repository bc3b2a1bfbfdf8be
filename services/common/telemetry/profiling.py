"""PROFILING_ENABLED=true: each request slower than PROFILING_THRESHOLD has its profile logged.

cProfile profiles a thread, not a task, and only one profiler runs at a time, so a
request is profiled when no other is at its start, and its profile holds everything
the event loop ran meanwhile (docs/observability.md, "Profiles of slow requests").
"""

from __future__ import annotations

import cProfile
import io
import logging
import pstats

from services.common.foundation.settings import Settings

log = logging.getLogger("devops_hub.profiling")

TOP_FUNCTIONS = 30


class SlowRequestProfiler:
    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._active: cProfile.Profile | None = None

    def begin(self) -> cProfile.Profile | None:
        """Starts profiling unless a profile is already running; hand the result to end()."""
        if self._active is not None:
            return None
        profile = cProfile.Profile()
        try:
            profile.enable()
        except ValueError:
            # Another profiler (a debugger, a coverage tool) owns the thread.
            return None
        self._active = profile
        return profile

    def end(self, profile: cProfile.Profile | None, what: str, seconds: float) -> None:
        if profile is None:
            return
        profile.disable()
        self._active = None
        if seconds < self.threshold:
            return
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats(pstats.SortKey.CUMULATIVE).print_stats(TOP_FUNCTIONS)
        log.warning(
            "slow request %s took %.1f ms (threshold %.1f ms); profile:\n%s",
            what,
            seconds * 1000,
            self.threshold * 1000,
            text.getvalue().strip(),
            extra={"request": what, "duration_ms": round(seconds * 1000, 3)},
        )


def configure(settings: Settings) -> SlowRequestProfiler | None:
    return SlowRequestProfiler(settings.profiling_threshold) if settings.profiling_enabled else None
