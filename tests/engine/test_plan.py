"""``ldpipe cache plan``: the plan counts what the dump stores, estimates its bytes from a small
real dump, writes nothing where the cache will go, and refuses bad input in one line."""
from __future__ import annotations

import json
import os
import tempfile

import pytest

from helpers import DEMO_PIPELINE, cli_args, error_line, invoke

# two scales x flip: four variants, so samples != images and units split variants apart
SCALES = ("data.train_scales=[[160,160],[128,128]]",)
# how far the extrapolated bytes (pilot of 4 of 12 images) may be from the real dump's: the
# docs/benchmarks.md goal on real data is 10 %
BYTES_TOLERANCE = 0.10


@pytest.fixture(scope="module")
def planned(make_tiny_pipe, tiny_teacher_ckpt, tmp_path_factory):
    """A plan (4 pilot images) and the real dump of the same pipeline, and the cache's info."""
    from ldpipe.cache.info import info
    from ldpipe.engine.dump import dump_teacher
    from ldpipe.engine.plan import plan_cache
    pipe = make_tiny_pipe(*SCALES)
    plan = plan_cache(pipe, "teacher", tiny_teacher_ckpt, pilot_images=4, device="cpu")
    out = str(tmp_path_factory.mktemp("plan") / "cache")
    summary = dump_teacher(pipe, "teacher", tiny_teacher_ckpt, out, device="cpu", progress=False)
    return plan, summary, info(out) | {"rows": stored_rows(out)}


def stored_rows(url: str) -> int:
    from ldpipe.cache.manifest import F
    from ldpipe.cache.store import load_index, open_root
    return int(load_index(open_root(url))[0][:, F["row_count"]].sum())


def test_plan_counts_the_dumps_samples_units_and_rows(planned):
    plan, summary, real = planned
    assert plan.samples == summary["samples"] == real["samples_committed"] == 12 * 4
    assert plan.units == summary["units"] == real["units_committed"]
    assert plan.variants == ["s0n", "s0f", "s1n", "s1f"]
    # every sample's rows counted by the dump's own collate: the exact stored row count
    assert plan.rows_exact and plan.rows == real["rows"]


def test_plan_bytes_within_tolerance_of_the_real_dump(planned):
    plan, _, real = planned
    assert 4 <= plan.pilot_images < 12 and plan.pilot_samples == 4 * plan.pilot_images  # extrapolated
    rel = abs(plan.bytes - real["stored_bytes"]) / real["stored_bytes"]
    assert rel <= BYTES_TOLERANCE, (plan.bytes, real["stored_bytes"], plan.bytes_by_part,
                                    real["stored_bytes_by_part"])
    assert set(plan.bytes_by_part) == set(real["stored_bytes_by_part"])
    assert plan.seconds > 0 and plan.pilot.samples == plan.pilot_samples
    assert plan.pilot.batches >= 8 and plan.loader_seconds_per_sample > 0
    # the pilot's batches are as full as the dump's (whole batches of the real dump's images)
    assert plan.pilot.samples / plan.pilot.batches == plan.dump_batch == 2


def test_plan_of_the_whole_split_is_the_dumps_bytes(make_tiny_pipe, tiny_teacher_ckpt, tmp_path):
    """With every image in the pilot nothing is extrapolated: the estimate is the real dump's
    bytes up to the manifest's command line and time stamp."""
    from ldpipe.cache.info import info
    from ldpipe.engine.dump import dump_teacher
    from ldpipe.engine.plan import plan_cache
    pipe = make_tiny_pipe()
    plan = plan_cache(pipe, "teacher", tiny_teacher_ckpt, pilot_images=100, device="cpu")
    dump_teacher(pipe, "teacher", tiny_teacher_ckpt, str(tmp_path / "c"), device="cpu", progress=False)
    real = info(str(tmp_path / "c"))
    assert plan.pilot_images == 12
    for part, size in real["stored_bytes_by_part"].items():
        slack = 400 if part == "metadata" else 0  # the root manifest's command and time stamp
        assert abs(plan.bytes_by_part[part] - size) <= slack, (part, plan.bytes_by_part[part], size)


def test_plan_json_fields_and_nothing_written(synth_root, tiny_overrides, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # the pilots' folder
    os.makedirs(tmp_path / "tmp")
    out = tmp_path / "work" / "cache"
    res = invoke("cache", "plan", DEMO_PIPELINE, "--json", "--pilot-images", "2", "--device", "cpu",
                 "--out", str(out), *cli_args(*tiny_overrides))
    assert res.exit_code == 0, res.output
    d = json.loads(res.output[res.output.index("{"):])
    for key in ("samples", "images", "variants", "units", "rows", "bytes", "bytes_by_part",
                "bytes_per_sample", "seconds", "seconds_per_sample", "device", "device_name",
                "pilot", "dump_batch", "teacher", "random_init", "notes", "schedule", "out"):
        assert key in d, key
    assert d["samples"] == 24 and d["images"] == 12 and d["variants"] == ["s0n", "s0f"]
    assert d["random_init"] and any("rougher" in n for n in d["notes"])
    assert d["out"]["path"] == str(out) and not d["out"]["holds_cache"] and d["out"]["free_bytes"] > 0
    assert not (tmp_path / "work").exists()  # nothing under (or at) the cache's place
    # the pilot dumps are removed (torch may keep its own caches in the temporary folder)
    assert [n for n in os.listdir(tmp_path / "tmp") if n.startswith("ldpipe-plan-")] == []


def test_plan_table_names_the_checkpoint_and_an_existing_cache(make_tiny_pipe, tiny_teacher_ckpt,
                                                               tiny_overrides, tmp_path):
    from ldpipe.engine.dump import dump_teacher
    out = str(tmp_path / "c")
    dump_teacher(make_tiny_pipe(), "teacher", tiny_teacher_ckpt, out, device="cpu", progress=False)
    before = sorted(p for p, _, _ in os.walk(out))
    res = invoke("cache", "plan", DEMO_PIPELINE, "--checkpoint", tiny_teacher_ckpt, "--pilot-images",
                 "2", "--device", "cpu", "--out", out, *cli_args(*tiny_overrides))
    assert res.exit_code == 0, res.output
    assert f"teacher       {tiny_teacher_ckpt}" in res.output
    assert "holds a cache already" in res.output and "rougher" not in res.output
    assert "samples       24 = 12 images x 2 variants" in res.output
    assert sorted(p for p, _, _ in os.walk(out)) == before


def test_plan_out_relative_to_the_working_folder_without_checkpoint(tiny_overrides, tmp_path,
                                                                    monkeypatch):
    """No checkpoint: nothing stands for it among the places --out must keep apart from (an
    empty path would be the working folder, and refuse every relative --out)."""
    monkeypatch.chdir(tmp_path)
    res = invoke("cache", "plan", DEMO_PIPELINE, "--pilot-images", "1", "--device", "cpu",
                 "--out", "w/teacher.zarr", *cli_args(*tiny_overrides))
    assert res.exit_code == 0, res.output
    assert "w/teacher.zarr: no cache there yet" in res.output and not (tmp_path / "w").exists()


def test_rate_separates_the_fixed_start_up():
    from ldpipe.engine.plan import PilotRun, _rate
    # 4 batches of 8: the first took 1.0 s more than the others (start-up), writing 0.5 s after
    run = PilotRun(images=16, samples=32, batches=4, seconds=1.0 + 32 * 0.25 + 0.5,
                   steady_samples=24, steady_seconds=24 * 0.25)
    rate, fixed = _rate(run)
    assert rate == pytest.approx(0.25) and fixed == pytest.approx(1.5)
    # one batch: its mean, nothing fixed
    assert _rate(PilotRun(2, 8, 1, 2.0, 0, 0.0)) == (pytest.approx(0.25), 0.0)


def test_pilot_images_are_whole_batches_of_the_dump():
    import numpy as np

    from ldpipe.engine.plan import pilot_images_of
    batches = [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1), (3, 0), (3, 1)],
               [(4, 0), (4, 1), (5, 0), (5, 1)]]
    picks = pilot_images_of(batches, 3, np.random.default_rng(0), min_batches=1)
    assert len(picks) == 4 and all(sorted({i for i, _ in b}) in (picks[:2], picks[2:])
                                   for b in batches if b[0][0] in picks)
    assert pilot_images_of(batches, 100, np.random.default_rng(0)) == list(range(6))
    # at least min_batches whole batches, even when fewer images would do
    assert pilot_images_of(batches, 1, np.random.default_rng(0), min_batches=3) == list(range(6))


def test_plan_bad_input_is_one_error_line(tiny_overrides, tiny_teacher_ckpt, tmp_path):
    args = ("--pilot-images", "1", "--device", "cpu")
    error_line(invoke("cache", "plan", str(tmp_path / "nope.toml"), *args), "nope.toml")
    error_line(invoke("cache", "plan", DEMO_PIPELINE, "--checkpoint", tiny_teacher_ckpt, *args,
                      *cli_args(*tiny_overrides, "models.teacher.channels=24")),
               tiny_teacher_ckpt, "does not match")
    error_line(invoke("cache", "plan", DEMO_PIPELINE, *args,
                      *cli_args(*tiny_overrides, f"data.root={tmp_path / 'no-data'}")), "no-data")
    error_line(invoke("cache", "plan", DEMO_PIPELINE, "--model", "nobody", *args,
                      *cli_args(*tiny_overrides)), "nobody")
