"""Run under torchrun by tests/test_distributed.py (gloo on CPU), or alone as the single-process
reference: train() with a sink on rank 0 that steers the run at fixed steps, and every rank's
final LoRA weights and training state written to the run directory.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_train.py RUN_DIR
"""

import json
import logging
import os
import sys
from pathlib import Path

import torch

import qwen_daemon.train.loop as loop
from qwen_daemon.train import saving
from qwen_daemon.train.controls import Controls
from shared.config import load_config

STEER_AFTER_STEP = 3  # after this step: set the micro-batch back to 2, and pause + resume


def main() -> None:
    run, rank = Path(sys.argv[1]), int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO, filename=run / f"rank{rank}.log", force=True,
                        format="%(levelname)s %(name)s: %(message)s")
    controls = Controls()

    class Steer:  # called in the training thread right after the step: applied at the next boundary
        def metrics(self, record):
            if record.get("kind") == "train" and record["step"] == STEER_AFTER_STEP:
                controls.set_micro_batch_size(int(sys.argv[2]))
                controls.pause()
                controls.resume()

        def event(self, kind, **data):
            pass

        def close(self):
            pass

    finish = loop.finish

    def record_and_finish(r):
        torch.save(saving.lora_state(r), run / f"lora-rank{r.rank}.pt")
        state = {k: getattr(r.state, k) for k in ("step", "micro_batch_size", "grad_accum", "samples_seen")}
        (run / f"state-rank{r.rank}.json").write_text(json.dumps(state))
        finish(r)

    loop.finish = record_and_finish
    loop.train(load_config(run / "config.yaml"), run, controls, resume="--resume" in sys.argv, sinks=(Steer(),))


if __name__ == "__main__":
    main()
