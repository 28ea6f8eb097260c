"""The typed config: files, overrides, and errors that name the file, the line and the key."""

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from shared.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "qwen3-4b-thinking.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(REPO / "configs" / name)
    assert cfg.data.split.train + cfg.data.split.validation + cfg.data.split.test == pytest.approx(1)


def test_demo_config_is_the_offline_tiny_model():
    cfg = load_config(REPO / "configs" / "demo.yaml")
    assert cfg.model.name_or_path == "builtin:tiny-qwen3"
    assert cfg.model.load_in_4bit


def test_overrides_are_typed_like_yaml():
    cfg = load_config(None, ["train.learning_rate=1e-4", "data.paths=[a, b]", "train.max_steps=null",
                             "data.packing=false", "lora.target_modules=all-linear"])
    assert cfg.train.learning_rate == 1e-4
    assert cfg.data.paths == [str(Path.cwd() / "a"), str(Path.cwd() / "b")]  # (relative to where it was typed)
    assert cfg.train.max_steps is None
    assert cfg.data.packing is False
    assert cfg.lora.target_modules == "all-linear"


def test_override_beats_file(tmp_path):
    path = write(tmp_path, "train:\n  micro_batch_size: 4\n")
    assert load_config(path, ["train.micro_batch_size=8"]).train.micro_batch_size == 8


def test_every_problem_is_reported_with_file_line_and_key(tmp_path):
    path = write(tmp_path, "run:\n  name: x\ntrain:\n  learning_rate: -2.0e-4\n  micro_batch: 3\n"
                           "data:\n  split: {train: 0.8, validation: 0.1, test: 0.2}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    lines = str(e.value).splitlines()
    assert len(lines) == 3
    assert any(re.match(rf"{re.escape(str(path))}:4: train.learning_rate: .*greater than 0", s) for s in lines)
    assert any(f"{path}:5: train.micro_batch: unknown key; did you mean train.micro_batch_size?" in s for s in lines)
    assert any(f"{path}:7: data.split: train + validation + test must sum to 1 (got 1.1)" in s for s in lines)


def test_wrong_types(tmp_path):
    path = write(tmp_path, "data:\n  paths: 5\n  packing: maybe\ntrain:\n  micro_batch_size: two\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    text = str(e.value)
    assert f"{path}:2: data.paths" in text
    assert f"{path}:3: data.packing" in text
    assert f"{path}:5: train.micro_batch_size" in text


def test_unknown_section_and_bad_override_name_the_source(tmp_path):
    path = write(tmp_path, "trian:\n  epochs: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["lora.r=0", "nonsense"])
    text = str(e.value)
    assert f"{path}:1: trian: unknown key; did you mean train?" in text
    assert "--set lora.r=0: lora.r: Input should be greater than 0" in text
    assert "--set nonsense: expected section.key=value" in text


@pytest.mark.parametrize("text, key", [
    ("lora:\n  dropout: 1.5\n", "lora.dropout"),
    ("train:\n  warmup_ratio: -0.1\n", "train.warmup_ratio"),
    ("data:\n  max_seq_len: 0\n", "data.max_seq_len"),
    ("data:\n  paths: []\n", "data.paths"),
    ("launch:\n  num_processes: 0\n", "launch.num_processes"),
    ("run:\n  name: a/b\n", "run.name"),
    ("data:\n  overlong: ignore\n", "data.overlong"),
])
def test_impossible_values(tmp_path, text, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(write(tmp_path, text))


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"job.yaml:\d+: not valid YAML"):
        load_config(write(tmp_path, "train:\n  epochs: [1\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_frozen_yaml_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "demo.yaml", ["run.name=r1"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_docs_list_every_key():
    """docs/configuration.md documents every key of the schema."""
    doc = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                yield from keys(sub, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    missing = [k for k in keys(Config) if f"`{k}`" not in doc]
    assert not missing, f"docs/configuration.md does not document: {missing}"


def test_a_section_error_caused_by_an_override_names_the_override():
    with pytest.raises(ConfigError, match=r"^--set data.split.train=0.5: data.split: .*sum to 1"):
        load_config(None, ["data.split.train=0.5"])


def test_data_paths_resolve_against_the_config_file_and_overrides_against_the_current_directory(tmp_path,
                                                                                                  monkeypatch):
    job = tmp_path / "elsewhere" / "job.yaml"
    job.parent.mkdir()
    job.write_text("data:\n  paths: [my_data, /abs/other, ~/home_data]\n  terms: ../terms.tsv\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(job)
    assert cfg.data.paths == [str(job.parent / "my_data"), "/abs/other", str(Path.home() / "home_data")]
    assert cfg.data.terms == str(tmp_path / "terms.tsv")
    assert load_config(job, ["data.paths=[mine]"]).data.paths == [str(tmp_path / "mine")]
    # The run's frozen copy says the same wherever it is read.
    frozen = tmp_path / "run" / "config.yaml"
    frozen.parent.mkdir()
    frozen.write_text(cfg.to_yaml(), encoding="utf-8")
    assert load_config(frozen).data == cfg.data
    bundled = load_config(None).data
    assert Path(bundled.paths[0]).is_dir() and Path(bundled.terms).is_file()  # the defaults: the bundled set


def test_a_job_in_another_directory_prepares_its_data_from_anywhere(tmp_path, monkeypatch):
    from qwen_daemon import cli

    job = tmp_path / "job" / "job.yaml"
    job.parent.mkdir()
    (job.parent / "qa.jsonl").write_text('{"instruction": "什么是 SM4？", "output": "SM4 是分组密码。"}\n',
                                         encoding="utf-8")
    (tmp_path / "terms.tsv").write_text((REPO / "data" / "crypto_terms.tsv").read_text(encoding="utf-8"),
                                        encoding="utf-8")
    job.write_text("model:\n  name_or_path: builtin:tiny-qwen3\ndata:\n  paths: [qa.jsonl]\n  terms: ../terms.tsv\n"
                   "  split: {train: 1.0, validation: 0.0, test: 0.0}\n", encoding="utf-8")
    monkeypatch.chdir("/")  # as `qwen-daemon start --config /elsewhere/job.yaml` from anywhere
    report = cli._prepare(load_config(job)).report
    assert report.kept == 1 and not report.problems
