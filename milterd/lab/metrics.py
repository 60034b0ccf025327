"""Read a milterd ``/metrics`` page the way Prometheus does, for tests and benchmarks."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def sample_key(name: str, labels: dict[str, str]) -> str:
    """A sample as the exposition text writes it: ``name{label="value",...}`` (labels in the
    page's order), or the bare name without labels."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def parse(text: str) -> dict[str, float]:
    """Every sample of an exposition text: :func:`sample_key` -> value."""
    return {sample_key(s.name, s.labels): float(s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int, host: str = "127.0.0.1", timeout: float = 10) -> dict[str, float]:
    """GET ``http://host:port/metrics`` and parse it (see :func:`parse`); connection errors
    propagate (``urllib.error.URLError``)."""
    netloc = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{netloc}:{port}/metrics", timeout=timeout) as r:
        return parse(r.read().decode())
