"""The interleaved throughput comparison, briefly: two real services, two rounds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadtest.throughput import main


@pytest.mark.slow
def test_policies_are_measured_in_alternating_rounds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "throughput.json"
    args = ["--policies", "off,smart", "--rounds", "2", "--texts", "64", "--clients", "2", "--out", str(out)]
    result = main(args)

    assert json.loads(out.read_text()) == result
    off, smart = result["policies"]["off"], result["policies"]["smart"]
    assert off["ratio"] == 1.0
    assert smart["ratio"] == pytest.approx(smart["median_texts_per_s"] / off["median_texts_per_s"], abs=0.01)
    for numbers in (off, smart):
        assert len(numbers["texts_per_s"]) == 2
        assert min(numbers["texts_per_s"]) > 0
        assert min(numbers["rss_mb_after_round"]) > 100  # a loaded model, read from the service's /metrics
    rounds = [line.split()[:3] for line in capsys.readouterr().out.splitlines() if line.startswith("round")]
    assert rounds == [["round", "1", "off"], ["round", "1", "smart"], ["round", "2", "smart"], ["round", "2", "off"]]
