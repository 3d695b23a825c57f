"""8 concurrent publisher PROCESSES against one file:// registry: nothing lost, nothing corrupt."""

from __future__ import annotations

import json
import multiprocessing as mp
import traceback
from pathlib import Path

from registry_server import PASSING, make_spec

from cellm.registry import open_registry, verify_dir

N = 8


def _publish_worker(url: str, src: str, name: str, version: str, seed: int, barrier, queue) -> None:
    try:
        from cellm.errors import VersionExistsError

        spec = make_spec(Path(src), name=name, version=version, seed=seed)
        reg = open_registry(url)
        barrier.wait(timeout=60)  # start all publishes at the same moment
        try:
            m = reg.publish(spec, PASSING, channels=("latest", "stable"))
            queue.put(("ok", seed, m.version))
        except VersionExistsError as exc:
            queue.put(("exists", seed, str(exc)))
    except BaseException:  # noqa: BLE001 - report anything to the parent
        queue.put(("error", seed, traceback.format_exc()))


def _run(url: str, tmp: Path, name: str, versions: list[str]) -> list[tuple]:
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(len(versions)), ctx.Queue()
    procs = [
        ctx.Process(target=_publish_worker, args=(url, str(tmp / f"src{i}"), name, v, i, barrier, queue))
        for i, v in enumerate(versions)
    ]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    errors = [r for r in results if r[0] == "error"]
    assert not errors, errors[0][2]
    return results


def test_eight_concurrent_publishers_distinct_versions(tmp_path):
    url = f"file://{tmp_path / 'reg'}"
    versions = [f"1.0.{i}" for i in range(N)]
    results = _run(url, tmp_path, "conc", versions)
    assert sorted(r[2] for r in results) == sorted(versions) and all(r[0] == "ok" for r in results)

    reg = open_registry(url)
    assert reg.list_versions("conc") == versions  # all present
    for i, v in enumerate(versions):  # none corrupt: pull verifies every sha256; bytes match sources
        out = tmp_path / f"pulled-{v}"
        reg.pull(f"conc:{v}", out)
        assert verify_dir(out).version == v
        assert (out / "model.cellm").read_bytes() == (tmp_path / f"src{i}/model.cellm").read_bytes()
    channels = reg.list_channels("conc")  # consistent: each channel names an existing version
    assert set(channels) == {"latest", "stable"} and set(channels.values()) <= set(versions)
    for ch in ("latest", "stable"):
        log = [json.loads(line) for line in (tmp_path / f"reg/names/conc/channels/{ch}.log").read_text().splitlines()]
        assert sorted(r["version"] for r in log) == versions  # every move recorded, none torn
        assert log[-1]["version"] == channels[ch]  # the file agrees with the last logged move
    assert not list((tmp_path / "reg/tmp").iterdir())


def test_eight_concurrent_publishers_same_version_exactly_one_wins(tmp_path):
    url = f"file://{tmp_path / 'reg'}"
    results = _run(url, tmp_path, "race", ["2.0.0"] * N)
    winners = [r for r in results if r[0] == "ok"]
    assert len(winners) == 1, results
    assert sum(r[0] == "exists" for r in results) == N - 1
    reg = open_registry(url)
    assert reg.list_versions("race") == ["2.0.0"]
    assert reg.list_channels("race") == {"latest": "2.0.0", "stable": "2.0.0"}
    reg.pull("race:2.0.0", tmp_path / "out")
    seed = winners[0][1]
    assert (tmp_path / "out/model.cellm").read_bytes() == (tmp_path / f"src{seed}/model.cellm").read_bytes()
