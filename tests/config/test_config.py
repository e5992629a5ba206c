"""Pipeline files: parsing, overrides, per-model schedules, and errors that name key and file."""
from __future__ import annotations

import os
import textwrap

import pytest

from ldpipe.config import ConfigError, load_pipeline, parse_value

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "pipelines", "demo.toml")
BCCD = os.path.join(ROOT, "pipelines", "bccd.toml")


def write(tmp_path, text: str, name: str = "p.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


MINIMAL = """
    [data]
    root = "data"

    [train]
    epochs = 3

    [models.teacher]
    depth = 34
    train = { epochs = 5, lr = 0.05 }

    [models.student]
    depth = 18
"""


def test_demo_parses():
    import tomllib
    raw = tomllib.load(open(DEMO, "rb"))
    pipe = load_pipeline(DEMO)
    assert pipe.name == "demo" and pipe.source == DEMO
    assert set(pipe.models) == {"teacher", "student"}  # no TA in the demo (docs/results.md)
    for name in pipe.models:
        assert pipe.model(name).depth == raw["models"][name]["depth"]
        assert pipe.model(name).channels == raw["models"][name]["channels"]
    assert pipe.train.epochs == raw["train"]["epochs"] and pipe.train.steps == raw["train"]["steps"]
    assert pipe.data.train_scales == raw["data"]["train_scales"]
    # a model's own schedule overrides the train section's keys it names; the rest inherit it
    for name in ("teacher", "student"):
        own = raw["models"][name]["train"]
        assert pipe.train_for(name).epochs == own["epochs"] != pipe.train.epochs
        assert pipe.train_for(name).steps == own["steps"] != pipe.train.steps
        assert "batch_size" not in own
        assert pipe.train_for(name).batch_size == pipe.train.batch_size == raw["train"]["batch_size"]
        assert pipe.train_for(name).lr == pipe.train.lr == raw["train"]["lr"]
    assert pipe.resolve("annotations/train.json") == os.path.join("data/synth", "annotations/train.json")
    with pytest.raises(ConfigError, match="no model 'nobody'"):
        pipe.model("nobody")


def test_demo_overrides():
    pipe = load_pipeline(DEMO, ["train.epochs=1", "data.root=/x", "train.lr=0.5", "train.amp=false",
                                "data.train_scales=[[640, 480], [320, 240]]",
                                "models.student.base_channels=8", "cache.codec=fp16"])
    assert pipe.train.epochs == 1 and isinstance(pipe.train.epochs, int)
    assert pipe.data.root == "/x"
    assert pipe.train.lr == 0.5 and pipe.train.amp is False
    assert pipe.data.train_scales == [[640, 480], [320, 240]]
    assert pipe.model("student").base_channels == 8
    assert pipe.cache.codec == "fp16"
    # -o on the command line wins over a model's own train table (config/test_run_pipelines.py)
    assert load_pipeline(DEMO).train_for("teacher").epochs != 1
    assert pipe.train_for("teacher").epochs == 1
    assert pipe.train_for("student").epochs == 1
    # an int where a float is declared is accepted as a float
    assert load_pipeline(DEMO, ["train.lr=1"]).train.lr == 1.0
    # overrides reach into a model's train table, creating it where absent
    pipe = load_pipeline(DEMO, ["models.student.train.epochs=7", "models.teacher.train.epochs=9"])
    assert pipe.train_for("student").epochs == 7 and pipe.train_for("teacher").epochs == 9


def test_parse_value_types():
    assert parse_value("1") == 1 and isinstance(parse_value("1"), int)
    assert parse_value("0.5") == 0.5 and isinstance(parse_value("0.5"), float)
    assert parse_value("true") is True and parse_value("false") is False
    assert parse_value("[640, 480]") == [640, 480]
    assert parse_value("[[1, 2], [3, 4]]") == [[1, 2], [3, 4]]
    assert parse_value('"quoted"') == "quoted"
    assert parse_value("/x") == "/x"
    assert parse_value("data/synth") == "data/synth"
    assert parse_value("zstd") == "zstd"


def test_per_model_train_override(tmp_path):
    pipe = load_pipeline(write(tmp_path, MINIMAL))
    t = pipe.train_for("teacher")
    assert t.epochs == 5 and t.lr == 0.05
    s = pipe.train_for("student")
    assert s.epochs == 3 and s.lr == 0.0
    assert pipe.train.epochs == 3  # the section itself is unchanged


def test_unknown_key_in_file(tmp_path):
    path = write(tmp_path, MINIMAL + "\n    [cache]\n    regoin = \"ld\"\n")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert "cache.regoin" in str(err.value) and path in str(err.value)

    path = write(tmp_path, MINIMAL.replace("depth = 18", "depth = 18\n    widht = 3"), "m.toml")
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert "models.student.widht" in str(err.value) and path in str(err.value)

    path = write(tmp_path, "colour = 1\n", "top.toml")
    with pytest.raises(ConfigError, match="colour") as err:
        load_pipeline(path)
    assert path in str(err.value)


def test_unknown_key_via_override():
    with pytest.raises(ConfigError) as err:
        load_pipeline(DEMO, ["train.epoch=1"])
    assert "train.epoch" in str(err.value) and DEMO in str(err.value)
    with pytest.raises(ConfigError, match="source"):
        load_pipeline(DEMO, ["source=elsewhere"])  # loader-owned fields are not keys
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_pipeline(DEMO, ["train.epochs"])
    with pytest.raises(ConfigError):
        load_pipeline(DEMO, ["train..epochs=1"])
    with pytest.raises(ConfigError, match="not a section"):
        load_pipeline(DEMO, ["name.x=1"])


def test_unknown_key_in_model_train_table(tmp_path):
    path = write(tmp_path, MINIMAL.replace("epochs = 5, lr", "epochz = 5, lr"))
    with pytest.raises(ConfigError) as err:
        load_pipeline(path)
    assert "models.teacher.train.epochz" in str(err.value) and path in str(err.value)
    with pytest.raises(ConfigError, match=r"models\.student\.train\.bogus"):
        load_pipeline(DEMO, ["models.student.train.bogus=1"])


@pytest.mark.parametrize("override, key", [
    ('train.epochs="x"', "train.epochs"),
    ("train.epochs=x", "train.epochs"),
    ("train.epochs=1.5", "train.epochs"),
    ("train.epochs=true", "train.epochs"),
    ("train.lr=fast", "train.lr"),
    ("train.amp=1", "train.amp"),
    ("data.root=3", "data.root"),
    ("data.train_scales=5", "data.train_scales"),
    ("data.classes=[1, 2]", "data.classes[0]"),
    ("models.teacher.train.epochs=x", "models.teacher.train.epochs"),
    ("models.teacher.train=5", "models.teacher.train"),
    ("chain=5", "chain"),
    ("models=3", "models"),
])
def test_bad_types_name_the_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_pipeline(DEMO, [override])
    assert key in str(err.value) and DEMO in str(err.value)


def test_validation_errors(tmp_path):
    for over, word in [("data.format=yolo", "data.format"), ("models.student.depth=20", "depth"),
                       ("models.student.reg_max=0", "reg_max"), ("cache.region=all", "cache.region"),
                       ("cache.codec=int4", "cache.codec"), ("data.test_scale=[1]", "test_scale"),
                       ("data.format=voc", "data.classes"),
                       ("train.keep_checkpoints=-1", "keep_checkpoints")]:
        with pytest.raises(ConfigError, match=word):
            load_pipeline(DEMO, [over])
    with pytest.raises(ConfigError, match="not found"):
        load_pipeline(str(tmp_path / "missing.toml"))
    bad = write(tmp_path, "[train\nepochs = 1\n", "bad.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_pipeline(bad)


def test_bccd_parses():
    if not os.path.exists(BCCD):
        pytest.skip("no pipelines/bccd.toml")
    pipe = load_pipeline(BCCD)
    assert pipe.data.format == "voc"
    assert pipe.classes == ["RBC", "WBC", "Platelets"]
    teacher = pipe.model("teacher")
    assert (teacher.depth, teacher.channels, teacher.stacked_convs, teacher.reg_max) == (50, 256, 4, 16)
    assert pipe.model("student").depth == 18
    assert pipe.train_for("teacher").epochs == 12


def test_train_threads_pins_torch_threads_and_is_process_wide(tmp_path):
    import torch

    from ldpipe.cli import _pipe
    before = torch.get_num_threads()
    try:
        pipe = _pipe(DEMO, ("train.threads=1",))
        assert pipe.train.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="train.threads must be >= 0"):
        load_pipeline(DEMO, ["train.threads=-1"])
    with pytest.raises(ConfigError, match="models.student.train.threads: the thread count is process-wide"):
        load_pipeline(DEMO, ["models.student.train={threads = 1}"])
