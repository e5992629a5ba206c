"""Pipeline files for long runs: ``extends`` (deep merge, cycles, missing bases), ``-o`` over a
model's own ``train`` table, the resolved pipeline (``ldpipe config show``) and the COCO
pipelines built on ``coco_base.toml``."""
from __future__ import annotations

import os
import textwrap
import tomllib

import pytest
from click.testing import CliRunner

from ldpipe.cli import main as cli
from ldpipe.config import ConfigError, load_pipeline
from ldpipe.config.resolve import override_paths, resolved_dict, to_toml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")


def write(path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


BASE = """
    [data]
    root = "base-root"
    train_scales = [[640, 480], [320, 240]]

    [train]
    epochs = 3
    steps = [1, 2]

    [models.teacher]
    depth = 34
    channels = 64
    train = { epochs = 5, lr = 0.05 }

    [models.teacher.assigner]
    topk = 7
"""


def test_extends_deep_merges_tables_and_replaces_other_values(tmp_path):
    write(tmp_path / "base" / "base.toml", BASE)
    child = write(tmp_path / "child.toml", """
        extends = "base/base.toml"
        [data]
        train_scales = [[800, 600]]
        [train]
        steps = [2]
        [models.teacher]
        channels = 32
        train = { lr = 0.1 }
        [models.teacher.assigner]
        ignore_iof_thr = 0.5
    """)
    pipe = load_pipeline(child)
    assert pipe.data.root == "base-root"  # kept from the base
    assert pipe.data.train_scales == [[800, 600]]  # a list replaces, it is not appended to
    assert pipe.train.epochs == 3 and pipe.train.steps == [2]
    t = pipe.model("teacher")
    assert (t.depth, t.channels) == (34, 32)
    assert (t.assigner.topk, t.assigner.ignore_iof_thr) == (7, 0.5)  # nested tables merge
    assert t.train == {"epochs": 5, "lr": 0.1}  # an inline table is a table too
    assert pipe.name == "child" and pipe.bases == [str(tmp_path / "base" / "base.toml")]
    assert "extends" not in pipe.raw


def test_extends_a_list_applies_in_order_and_bases_may_extend(tmp_path):
    write(tmp_path / "a.toml", '[train]\nepochs = 1\nseed = 1\n')
    write(tmp_path / "b.toml", 'extends = "a.toml"\n[train]\nepochs = 2\n')
    write(tmp_path / "c.toml", '[train]\nepochs = 3\nworkers = 3\n')
    pipe = load_pipeline(write(tmp_path / "p.toml", 'extends = ["b.toml", "c.toml"]\n'))
    assert (pipe.train.epochs, pipe.train.seed, pipe.train.workers) == (3, 1, 3)
    pipe = load_pipeline(write(tmp_path / "q.toml", 'extends = ["c.toml", "b.toml"]\n'))
    assert (pipe.train.epochs, pipe.train.workers) == (2, 3)
    assert [os.path.basename(b) for b in pipe.bases] == ["c.toml", "a.toml", "b.toml"]


def test_extends_errors_name_the_files(tmp_path):
    missing = write(tmp_path / "m.toml", 'extends = "nowhere/base.toml"\n')
    with pytest.raises(ConfigError, match=r"m\.toml: extends .*nowhere/base\.toml.*not found"):
        load_pipeline(missing)
    write(tmp_path / "x.toml", 'extends = "y.toml"\n')
    write(tmp_path / "y.toml", 'extends = "x.toml"\n')
    with pytest.raises(ConfigError, match=r"cycle: .*x\.toml -> .*y\.toml -> .*x\.toml"):
        load_pipeline(str(tmp_path / "x.toml"))
    with pytest.raises(ConfigError, match="cycle"):
        load_pipeline(write(tmp_path / "self.toml", 'extends = "self.toml"\n'))
    with pytest.raises(ConfigError, match="extends must be a file name"):
        load_pipeline(write(tmp_path / "bad.toml", "extends = 3\n"))
    write(tmp_path / "broken.toml", "[train\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_pipeline(write(tmp_path / "uses_broken.toml", 'extends = "broken.toml"\n'))
    write(tmp_path / "typo.toml", "[train]\nepoch = 1\n")
    with pytest.raises(ConfigError, match="unknown key 'train.epoch'"):
        load_pipeline(write(tmp_path / "uses_typo.toml", 'extends = "typo.toml"\n'))


def test_command_line_wins_over_a_models_own_train_table(tmp_path):
    """Before: ``-o train.epochs=1 --model teacher`` silently ran the teacher's own epochs."""
    path = write(tmp_path / "p.toml", BASE)
    plain = load_pipeline(path)
    assert plain.train_for("teacher").epochs == 5 and plain.train_for("teacher").lr == 0.05
    pipe = load_pipeline(path, ["train.epochs=1"])
    assert pipe.train_for("teacher").epochs == 1
    assert pipe.train_for("teacher").lr == 0.05  # keys not given on the command line stay
    # a table override names its keys as well
    assert load_pipeline(path, ["train={epochs = 2}"]).train_for("teacher").epochs == 2
    # the model's own key on the command line is the most specific: it wins, in any order
    for order in (["train.epochs=1", "models.teacher.train.epochs=9"],
                  ["models.teacher.train.epochs=9", "train.epochs=1"],
                  ["models.teacher.train={epochs = 9}", "train.epochs=1"]):
        assert load_pipeline(path, order).train_for("teacher").epochs == 9, order
    assert override_paths(["train={epochs = 2, steps = [1]}", "models.t.train={}", "a.b=1"]) == [
        "train.epochs", "train.steps", "models.t.train", "a.b"]


def test_train_cli_runs_the_epochs_given_on_the_command_line(make_tiny_pipe, tiny_overrides, tmp_path):
    """End to end: the demo teacher's own ``train = {epochs = 12}`` yields to ``-o``."""
    over = [a for kv in (*tiny_overrides, "train.epochs=1", "train.max_iters_per_epoch=1",
                         "train.batch_size=2") for a in ("-o", kv)]
    wd = tmp_path / "w"
    res = CliRunner().invoke(cli, ["train", DEMO, "--model", "teacher", "--work-dir", str(wd),
                                   "--device", "cpu", *over])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in wd.glob("epoch_*.pth")) == ["epoch_1.pth"]


def test_resolved_pipeline_round_trips_and_config_show_prints_it(tmp_path):
    pipe = load_pipeline(DEMO, ["train.epochs=1", "models.student.base_channels=8",
                                'data.classes=["a b", "c\\"d"]'])
    resolved = resolved_dict(pipe)
    text = to_toml(resolved)
    assert tomllib.loads(text) == resolved
    again = load_pipeline(write(tmp_path / "resolved.toml", text))
    assert resolved_dict(again) == resolved
    for name in pipe.models:
        assert again.train_for(name) == pipe.train_for(name)
    assert again.train_for("teacher").epochs == 1 and again.model("student").base_channels == 8

    res = CliRunner().invoke(cli, ["config", "show", DEMO, "-o", "train.epochs=1",
                                   "-o", "models.student.base_channels=8",
                                   "-o", 'data.classes=["a b", "c\\"d"]'])
    assert res.exit_code == 0, res.output
    assert "# overridden: train.epochs, models.student.base_channels, data.classes" in res.output
    assert tomllib.loads(res.output) == resolved
    res = CliRunner().invoke(cli, ["config", "show", DEMO, "-o", "train.epoch=1"])
    assert res.exit_code == 1 and "Error: " in res.output and "train.epoch" in res.output


# the COCO files by the file they extend: coco_base.toml itself (1x), or coco_ms2x_base.toml /
# coco_gflv2_imv2_base.toml / coco_gflv2_r2101dcn_base.toml, which extend it (2x multi-scale)
COCO_GROUPS = {
    "coco_base.toml": ["coco_ld_r101_r18", "coco_ld_r101_r34", "coco_ld_r101_r50", "coco_selfld_r18",
                       "coco_selfld_r50", "coco_ta_r101_r50_r18", "coco_gflv2_ld_r101_r50",
                       "coco_gflv2_selfld_x101dcn"],
    "coco_ms2x_base.toml": ["coco_ld_r101dcn_r101"],
    "coco_gflv2_imv2_base.toml": ["coco_gflv2_ld_r101dcn_r101"],
    "coco_gflv2_r2101dcn_base.toml": ["coco_gflv2_ld_r2101dcn_x101dcn", "coco_gflv2_selfld_r2101dcn"],
}
COCO = [name for names in COCO_GROUPS.values() for name in names]


def test_coco_pipelines_extend_one_base():
    """Every COCO file builds on coco_base.toml (directly or through one of the 2x bases);
    files of one group differ only in their models and chain."""
    resolved, group_of = {}, {}
    for base, names in COCO_GROUPS.items():
        for name in names:
            path = os.path.join(ROOT, "pipelines", f"{name}.toml")
            assert tomllib.load(open(path, "rb"))["extends"] == base
            pipe = load_pipeline(path)
            assert pipe.name == name and os.path.basename(pipe.bases[0]) == "coco_base.toml"
            assert os.path.basename(pipe.bases[-1]) == base
            resolved[name], group_of[name] = resolved_dict(pipe), base
    ref = resolved["coco_ld_r101_r18"]
    assert ref["train"]["lr"] == 0.00375 and ref["train"]["batch_size"] == 3
    assert ref["data"]["train_scales"] == [[1333, 800]] and ref["cache"]["batch_size"] == 8
    for base, names in COCO_GROUPS.items():
        first = resolved[names[0]]
        for name in names:
            for section in ("data", "train", "distill"):
                assert resolved[name][section] == first[section], (name, section)
            # only the multi-scale schedule and (R2 group) batch, lr and KD weight differ from 1x
            assert resolved[name]["data"]["test_scale"] == ref["data"]["test_scale"]
            # the 2x groups replay range-mode views: their [cache.views] (tests/config/test_ms2x_views.py)
            cache = {k: v for k, v in resolved[name]["cache"].items() if k != "views"}
            assert cache == {k: v for k, v in ref["cache"].items() if k != "views"} or name == "coco_ta_r101_r50_r18"
    ms = resolved["coco_ld_r101dcn_r101"]
    assert ms["data"]["train_scales"] == [[1333, 480], [1333, 640], [1333, 800]]
    assert (ms["train"]["epochs"], ms["train"]["steps"]) == (24, [16, 22])
    assert {k: v for k, v in ms["train"].items() if k not in ("epochs", "steps")} == \
        {k: v for k, v in ref["train"].items() if k not in ("epochs", "steps")}
    r2 = resolved["coco_gflv2_ld_r2101dcn_x101dcn"]
    assert r2["data"]["train_scales"] == [[1333, 480], [1333, 720], [1333, 960]]
    assert (r2["train"]["batch_size"], r2["train"]["lr"], r2["distill"]["kd_weight"]) == (2, 0.01, 5.0)
    assert resolved["coco_ld_r101_r34"]["models"]["student"]["depth"] == 34
    assert resolved["coco_selfld_r50"]["chain"]["baseline"] is False
    assert resolved["coco_selfld_r18"]["models"]["teacher"]["checkpoint"] == ""
    assert resolved["coco_ta_r101_r50_r18"]["cache"]["readers"] == ["ta", "student"]
    assert resolved["coco_ta_r101_r50_r18"]["chain"]["tas"] == ["ta"]
