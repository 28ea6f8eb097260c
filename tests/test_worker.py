"""The trainer process's own rules, with `train()` replaced (the loop is tested elsewhere)."""

import logging
import signal

import pytest

from qwen_daemon import wire, worker
from qwen_daemon.train import loop
from qwen_daemon.train.checkpoint import TrainState


@pytest.mark.parametrize("finished, code", [(True, wire.EXIT_FINISHED), (False, wire.EXIT_STOPPED)])
def test_the_exit_code_is_what_train_did_not_what_files_exist(run_dir, monkeypatch, tmp_path, finished, code):
    """A rank that finished while rank 0 still writes final/ must say finished (torchrun tears the
    group down on a non-zero exit, and the daemon would restart a finished run)."""
    monkeypatch.setenv(wire.TELEMETRY_ENV, f"ipc://{tmp_path}/telemetry")
    monkeypatch.setenv(wire.CONTROL_ENV, f"ipc://{tmp_path}/control")
    monkeypatch.setattr(loop, "train", lambda *a, **k: TrainState(step=40, finished=finished))
    assert not (run_dir / "final").exists()
    handlers = logging.getLogger().handlers[:]
    signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        assert worker.main([str(run_dir)]) == code
    finally:  # main() sets up the process as a worker: give the test process its own back
        logging.getLogger().handlers[:] = handlers
        for sig, handler in signals.items():
            signal.signal(sig, handler)
