"""Reading Prometheus metrics back: a text exposition parsed into samples, or scraped."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def parse_samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(port: int | str, path: str = "/metrics") -> dict[tuple[str, frozenset], float]:
    # A new connection each time: with several workers, any of them may answer.
    response = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=10, headers={"connection": "close"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse_samples(response.text)
