"""``chainfold bench``: the report has the required names and numbers (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from chainfold.bench import STEPS, story
from chainfold.bench_scale import SCALE_STEPS
from chainfold.examples import accounts

from .conftest import run_cli

@pytest.mark.parametrize("n,k,seed", [(0, 3, 1), (7, 10, 2), (2500, 40, 7), (3000, 3000, 4)])
def test_story_is_the_accounts_story_streamed(n: int, k: int, seed: int) -> None:
    assert list(story(n, k, seed)) == accounts.generate(n, k, seed)


@pytest.mark.broker
def test_bench_json_has_every_step(cli, tmp_path) -> None:
    r = cli("bench", "--events", "5000", "--streams", "50", "--json", "--keep", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["events"] == 5000
    names = [x["name"] for x in doc["results"]]
    assert names == list(STEPS)
    for x in doc["results"]:
        assert set(x) >= {"name", "events_per_s", "seconds", "peak_rss_mb"}
        assert x["events_per_s"] > 0 and x["seconds"] > 0 and x["peak_rss_mb"] > 0
        assert x["events"] == (500 if x["name"] == "rebuild_from_snapshot" else 5000)
    assert {t["target"] for t in doc["targets"]} >= {"rebuild >= 0.5 x read_limit", "rebuild >= 5 x eventsourcing"}
    assert (tmp_path / "w" / "eventsourcing.sqlite").exists()


@pytest.mark.broker
def test_bench_parallel_and_human_output(cli) -> None:
    r = cli("bench", "--events", "3000", "--streams", "30", "--steps", "read_limit,rebuild", "--parallel", "1,2")
    assert r.returncode == 0, r.stderr
    for word in ("read_limit", "rebuild", "events/s", "peak RSS MB", "speed-up", "rebuild >= 0.5 x read_limit"):
        assert word in r.stdout
    assert "eventsourcing" not in r.stdout.split("parallel")[0]


@pytest.mark.broker
def test_bench_scale_runs_each_command_as_a_whole_process(cli, tmp_path) -> None:
    r = cli("bench", "--scale", "2000,4000", "--streams", "20", "--json", "--keep", str(tmp_path / "w"))
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert [row["events"] for row in doc["scale"]] == [2000, 4000]
    for row in doc["scale"]:
        assert [x["name"] for x in row["results"]] == list(SCALE_STEPS)
        for x in row["results"]:
            assert x["seconds"] > 0 and x["peak_rss_mb"] > 0
            assert x["events"] == (row["events"] // 10 if x["name"] == "rebuild_from_snapshot" else row["events"])
    targets = {t["target"] for t in doc["targets"]}
    assert "rebuild_full: peak RSS at 4,000 <= 1.5 x at 2,000" in targets
    assert "N=4,000: rebuild from a 90% snapshot <= 0.15 x rebuild --full" in targets
    assert (tmp_path / "w" / "n2000" / "events.jsonl").exists()  # --keep keeps each N's files


def test_bench_refuses_unknown_steps() -> None:
    r = run_cli("bench", "--steps", "rebuild,nope")
    assert r.returncode == 2 and "nope" in (r.stderr + r.stdout)


def test_bench_refuses_a_scale_step_without_scale() -> None:
    r = run_cli("bench", "--steps", "publish")
    assert r.returncode == 2 and "--scale" in (r.stderr + r.stdout)
