"""shared/runs.py and shared/checkpoints.py: the run directory, read and written without torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared import checkpoints, runs


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def make_dir(path: Path, text: str) -> Path:
    path.mkdir(parents=True)
    (path / "file").write_text(text)
    return path


# --------------------------------------------------------------------------- atomic_directory


def test_a_directory_appears_whole(tmp_path):
    target = tmp_path / "cache" / "thing"
    with runs.atomic_directory(target) as tmp:
        assert tmp.parent == target.parent and not target.exists()
        (tmp / "sub").mkdir()
        (tmp / "sub" / "file").write_text("new")
    assert (target / "sub" / "file").read_text() == "new"
    assert entries(target.parent) == ["thing"]


def test_a_half_written_directory_never_replaces_a_good_one(tmp_path):
    target = make_dir(tmp_path / "thing", "good")
    with pytest.raises(OSError, match="No space"):
        with runs.atomic_directory(target) as tmp:
            (tmp / "file").write_text("half")
            raise OSError(28, "No space left on device")
    assert (target / "file").read_text() == "good"
    assert entries(tmp_path) == ["thing"]  # the failed build removed itself


def test_a_failed_first_build_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with runs.atomic_directory(tmp_path / "thing"):
            raise KeyboardInterrupt
    assert entries(tmp_path) == []


def test_an_existing_directory_is_kept_until_the_new_one_is_complete(tmp_path):
    target = make_dir(tmp_path / "thing", "old")
    with runs.atomic_directory(target) as tmp:
        (tmp / "file").write_text("new")
        assert (target / "file").read_text() == "old"
    assert (target / "file").read_text() == "new"
    assert entries(tmp_path) == ["thing"]


def test_the_old_directory_is_put_back_when_the_new_one_cannot_be_renamed_in(tmp_path, monkeypatch):
    target = make_dir(tmp_path / "thing", "old")
    rename = os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError(5, "Input/output error")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="Input/output"):
        with runs.atomic_directory(target) as tmp:
            (tmp / "file").write_text("new")
    assert (target / "file").read_text() == "old"
    assert entries(tmp_path) == ["thing"]


def test_a_finished_concurrent_build_is_kept_and_a_stale_one_replaced(tmp_path):
    def finished(directory):
        return (directory / "file").read_text() != "stale"

    target = make_dir(tmp_path / "thing", "theirs")
    with runs.atomic_directory(target, keep_existing=finished) as tmp:
        (tmp / "file").write_text("ours")
    assert (target / "file").read_text() == "theirs"

    (target / "file").write_text("stale")
    with runs.atomic_directory(target, keep_existing=finished) as tmp:
        (tmp / "file").write_text("ours")
    assert (target / "file").read_text() == "ours"
    assert entries(tmp_path) == ["thing"]


def test_a_dead_builders_leftovers_are_recovered_before_the_next_build(tmp_path):
    dead, alive = 2**31 - 2, os.getppid()
    target = tmp_path / "thing"
    make_dir(tmp_path / f".old-thing-{dead}", "set aside")  # died between its two renames
    make_dir(tmp_path / f".tmp-thing-{dead}", "half")
    make_dir(tmp_path / f".tmp-thing-{alive}", "building")  # another live process: left alone
    make_dir(tmp_path / f".tmp-thing2-{dead}", "another target's")
    runs.recover_leftovers(target)
    assert (target / "file").read_text() == "set aside"
    assert entries(tmp_path) == [f".tmp-thing-{alive}", f".tmp-thing2-{dead}", "thing"]
    make_dir(tmp_path / f".old-thing-{dead}", "older")  # the target exists now: removed
    with runs.atomic_directory(target) as tmp:
        (tmp / "file").write_text("new")
    assert (target / "file").read_text() == "new"
    assert entries(tmp_path) == [f".tmp-thing-{alive}", f".tmp-thing2-{dead}", "thing"]


def test_a_text_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    path = tmp_path / "daemon.json"
    runs.write_text_atomic(path, "old")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        runs.write_text_atomic(path, "new")
    assert path.read_text() == "old" and entries(tmp_path) == ["daemon.json"]


def test_a_restart_batch_is_written_whole(tmp_path):
    runs.write_restart_batch(tmp_path, 4, 2, 1, reason="oom")
    assert json.loads((tmp_path / runs.RESTART_BATCH).read_text()) == {
        "micro_batch_size": 4, "grad_accum": 2, "processes": 1, "reason": "oom"}
    assert entries(tmp_path) == [runs.RESTART_BATCH]


# --------------------------------------------------------------------------- finding and reading runs


@pytest.fixture
def runs_root(tmp_path):
    for name in ("demo-2", "demo-1"):
        (tmp_path / name).mkdir()
        (tmp_path / name / runs.CONFIG).write_text("{}")
    (tmp_path / "not-a-run").mkdir()
    return tmp_path


def test_runs_are_found_by_name_or_path(runs_root):
    assert runs.list_runs(runs_root) == [runs_root / "demo-1", runs_root / "demo-2"]
    assert runs.find_run("demo-1", runs_root) == runs_root / "demo-1"
    assert runs.find_run(str(runs_root / "demo-2")) == runs_root / "demo-2"
    assert runs.find_run("not-a-run", runs_root) is None
    assert runs.find_run(None, runs_root) is None  # no daemon is alive


def test_list_says_dead_for_a_run_whose_daemon_was_killed_mid_run(runs_root, capsys):
    from qwen_daemon import cli

    dead_pid = 2**31 - 2  # no such process
    (runs_root / "demo-1" / runs.DAEMON_JSON).write_text(json.dumps({"pid": dead_pid, "state": "training"}))
    (runs_root / "demo-2" / runs.DAEMON_JSON).write_text(json.dumps({"pid": dead_pid, "state": "finished"}))
    (runs_root / "demo-2" / runs.METRICS).write_text(json.dumps({"kind": "train", "step": 7}) + "\n")
    assert cli.main(["list", "--runs-root", str(runs_root)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows == [["demo-1", "dead", "step", "0", "pid", "-"], ["demo-2", "finished", "step", "7", "pid", "-"]]


def test_json_files_read_offline(tmp_path):
    (tmp_path / "ok.json").write_text('{"state": "finished"}')
    (tmp_path / "cut.json").write_text('{"state": "fin')
    (tmp_path / "list.json").write_text("[1, 2]")
    assert runs.read_json(tmp_path / "ok.json") == {"state": "finished"}
    assert runs.read_json(tmp_path / "cut.json") is None
    assert runs.read_json(tmp_path / "list.json") is None
    assert runs.read_json(tmp_path / "missing.json") is None


def test_the_last_step_survives_a_line_cut_by_a_crash(tmp_path):
    assert runs.last_step(tmp_path) == 0
    records = [{"kind": "train", "step": step, "loss": 1.0, "padding": "x" * 40} for step in range(1, 301)]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "step": 301, "lo'
    (tmp_path / runs.METRICS).write_text(text)
    assert len(text) > 8192  # read from the end only
    assert runs.last_step(tmp_path) == 300


def test_tail_lines_leaves_out_the_line_it_cuts(tmp_path):
    path = tmp_path / "daemon.log"
    path.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert runs.tail_lines(path, 3) == ["line 997", "line 998", "line 999"]
    tail = runs.tail_lines(path, 1000, max_bytes=100)
    assert tail[-1] == "line 999" and all(line.startswith("line ") and len(line) == 8 for line in tail)
    assert runs.tail_lines(tmp_path / "missing.log", 3) == []


# --------------------------------------------------------------------------- checkpoints without torch


def fake_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint directory with the required files (bytes, not tensors) and its manifest."""
    path = checkpoints.checkpoints_dir(run_dir) / f"checkpoint-{step}"
    path.mkdir(parents=True)
    for name in checkpoints.REQUIRED_FILES:
        (path / name).write_text(f"{name} of step {step}")
    checkpoints.write_manifest(path, step)
    return path


def test_the_newest_valid_checkpoint_is_found_without_torch(tmp_path):
    older, newer = fake_checkpoint(tmp_path, 1), fake_checkpoint(tmp_path, 2)
    checkpoints.verify_checkpoint(newer)
    assert checkpoints.latest_valid_checkpoint(tmp_path) == newer
    (newer / checkpoints.OPTIMIZER_FILE).write_text("changed")
    with pytest.raises(checkpoints.CheckpointError, match="bytes, the manifest says"):
        checkpoints.verify_checkpoint(newer)
    assert checkpoints.latest_valid_checkpoint(tmp_path) == older


def test_shared_imports_no_torch():
    code = ("import sys, shared.runs, shared.checkpoints, qwen_daemon.supervisor; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
