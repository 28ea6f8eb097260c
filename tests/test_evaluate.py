"""The evaluation of a run on CPU with the tiny Qwen3 in real 4-bit: scores during training and at
the end of a run through the daemon (then its report), and the CLI on a checkpoint."""

import json
from pathlib import Path

import pytest

from conftest import make_run_dir
from qwen_daemon import cli
from qwen_daemon.train.evaluate import EvaluationError, adapter_dir, evaluate_run, format_table

from tests.test_daemon import TIMEOUT_MS, running

FAST_EVAL = ("eval.limit=2", "eval.max_new_tokens=8", "eval.batch_size=2", "train.inference_check_tokens=0")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """A run through the daemon: 4 steps, a sample scored every 2, the test split at the end."""
    run = make_run_dir(tmp_path_factory.mktemp("eval"), "train.max_steps=4", "checkpoint.every_steps=2",
                       "eval.at_end=true", "eval.generate_every_steps=2", "eval.sample_size=2", *FAST_EVAL)
    states = []
    with running(run) as (proc, client):
        done = client.wait_for(lambda m: states.append(m["body"]) if m["topic"] == "state" else
                               m["topic"] == "event" and m["body"]["kind"] == "report")
        assert proc.wait(TIMEOUT_MS / 1000) == 0
    return run, states, done["body"]


def test_a_run_evaluates_itself_at_the_end(evaluated):
    run, states, _ = evaluated
    summary = json.loads((run / "eval" / "summary.json").read_text(encoding="utf-8"))
    assert (summary["checkpoint"], summary["split"], summary["records"]) == ("final", "test", 2)
    for side in ("base", "tuned"):
        overall = summary["overall"][side]
        assert 0 <= overall["rouge_l_chars"] <= 1 and 0 <= overall["rouge_l_weighted"] <= 1
        assert summary["loss"][side] > 0 and summary["perplexity"][side] > 1
    # The adapter changes what the model computes: not the same loss as the base model's.
    assert summary["loss"]["base"] != summary["loss"]["tuned"]
    records = read_jsonl(run / "eval" / "final-test.jsonl")
    assert len(records) == 2
    for r in records:
        assert r["question"] and r["reference"] and set(r["generated"]) == {"base", "tuned"}
        assert {"rouge_l_chars", "rouge_l_words", "term_recall", "well_formed", "answer_chars"} <= set(r["tuned"])
    # The daemon said so: evaluating after the last step, then finished.
    assert ("training", "evaluating") in [(s["previous"], s["state"]) for s in states]
    assert json.loads((run / "daemon.json").read_text())["state"] == "finished"


def test_scores_during_training_go_out_as_eval_metrics(evaluated):
    run = evaluated[0]
    scored = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "eval" and "rouge_l_chars" in m]
    assert [m["step"] for m in scored] == [2, 4]
    assert all(0 <= m["rouge_l_chars"] <= 1 and m["answer_chars"] >= 0 for m in scored)


def test_the_run_ends_with_its_report(evaluated):
    run, _, report = evaluated
    assert Path(report["path"]) == run / "report.html"
    page = (run / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "rouge_l_chars" in page
    kinds = [e["kind"] for e in read_jsonl(run / "events.jsonl")]
    assert kinds[-3:] == ["evaluating", "eval_done", "report"]


def test_the_cli_evaluates_a_checkpoint(evaluated, capsys):
    run = evaluated[0]
    assert cli.main(["eval", str(run), "--checkpoint", "2", "--limit", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["checkpoint"], summary["records"]) == ("checkpoint-2", 1)
    assert (run / "eval" / "checkpoint-2-test.jsonl").exists()
    table = format_table(summary)
    assert "rouge_l_chars" in table and "loss" in table and "checkpoint-2" in table
    assert cli.main(["eval", str(run), "--checkpoint", "99"]) == 1
    assert "checkpoint-99: no adapter there" in capsys.readouterr().err


def test_a_missing_checkpoint_names_the_ones_there(evaluated):
    run = evaluated[0]
    with pytest.raises(EvaluationError, match=r"checkpoint-99.*checkpoints: checkpoint-2, checkpoint-4"):
        adapter_dir(run, 99)
    with pytest.raises(EvaluationError, match="not a run directory"):
        evaluate_run(run / "nowhere")
