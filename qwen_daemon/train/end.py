"""The end of a run that trained all its steps: the final adapter, an inference check (the saved
adapter loaded afresh answers a few held-out questions) and, with eval.at_end, the evaluation."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import torch

from qwen_daemon.train.evaluate import evaluate_run, generate, load_adapted
from qwen_daemon.train.run import Run
from qwen_daemon.train.saving import lora_state
from shared import runs
from shared.config import Config


def finish(r: Run) -> None:
    """Every rank calls this; rank 0 alone goes on after the final adapter is gathered."""
    adapter = lora_state(r) if r.sharded else None  # (a collective under FSDP)
    if not r.is_main:
        return
    final = r.run_dir / "final"
    r.model.save_pretrained(final, state_dict=adapter)
    r.tokenizer.save_pretrained(final)
    r.sinks.event("final_saved", step=r.state.step, path=str(final))
    questions = [row for row in r.splits["test"].select(range(min(3, len(r.splits["test"]))))]
    # Free the trained model before loading base + adapter afresh (the seeds' evaluation ran out
    # of memory by keeping both).
    r.model = r.optimizer = None
    gc.collect()
    if r.device.type == "cuda":
        torch.cuda.empty_cache()
    if r.cfg.train.inference_check_tokens:
        answers = inference_check(r.cfg, final, questions, r.device, r.cfg.train.inference_check_tokens)
        with open(r.run_dir / runs.INFERENCE, "w", encoding="utf-8") as f:
            for a in answers:
                f.write(json.dumps(a, ensure_ascii=False) + "\n")
        r.sinks.event("inference_check", step=r.state.step, answers=answers)
    if r.cfg.eval.at_end:
        r.sinks.event("evaluating", step=r.state.step, what="eval")
        summary = evaluate_run(r.run_dir, "final", device=r.device, cfg=r.cfg)
        r.sinks.event("eval_done", step=r.state.step, split=summary["split"], records=summary["records"],
                      file=summary["file"], loss=summary["loss"], overall=summary.get("overall"))


def inference_check(cfg: Config, adapter_dir: Path, questions: list[dict], device: torch.device,
                    max_new_tokens: int = 256) -> list[dict[str, str]]:
    """Load the base model and the saved adapter afresh and answer held-out questions with the
    thinking template (the generation prompt opens <think>)."""
    from transformers import AutoTokenizer

    model = load_adapted(cfg, adapter_dir, device)
    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    texts = generate(model, tokenizer, [q["prompt"] for q in questions], cfg, device, max_new_tokens=max_new_tokens)
    del model
    return [{"question": q["prompt"][-1]["content"], "reference": q["answer"], "generated": text}
            for q, text in zip(questions, texts)]
