"""The interleaved throughput comparison, briefly: two real services, two rounds."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from loadtest.throughput import main


@pytest.mark.slow
@pytest.mark.alone  # texts a second, compared
def test_policies_are_measured_in_alternating_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "throughput.json"
    args = ["--policies", "off,smart", "--rounds", "2", "--texts", "64", "--clients", "2", "--out", str(out)]
    started = time.perf_counter()
    result = main(args)
    elapsed = time.perf_counter() - started

    assert json.loads(out.read_text()) == result
    off, smart = result["policies"]["off"], result["policies"]["smart"]
    assert smart["ratio"] == pytest.approx(smart["median_texts_per_s"] / off["median_texts_per_s"], abs=0.01)
    for policy, numbers in (("off", off), ("smart", smart)):
        assert len(numbers["texts_per_s"]) == 2
        assert min(numbers["rss_mb_after_round"]) > 100  # a loaded model, read from the service's /metrics
        # Every request of every round was answered by that policy's service: 2 requests of 32 texts a round,
        # after 2 warm-up requests (its own log's request lines, status 200).
        lines = [json.loads(line) for line in (tmp_path / f"throughput-{policy}.log").read_text().splitlines()]
        answered = [e for e in lines if e.get("event") == "request.completed" and e.get("route") == "/v1/embeddings"]
        assert [e["status"] for e in answered] == [200] * 8
    # The rates are what the rounds took: the time they claim (texts over rate) fits in the time they had.
    claimed_s = sum(64 / rate for numbers in (off, smart) for rate in numbers["texts_per_s"])
    assert 0 < claimed_s < elapsed
    rounds = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert rounds == [["round", "1", "off"], ["round", "1", "smart"], ["round", "2", "smart"], ["round", "2", "off"]]
