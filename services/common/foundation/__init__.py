"""What every layer may use: settings, the clock, background tasks, the event loop, unusable dependencies said plainly."""
