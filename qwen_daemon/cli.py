"""`qwen-daemon`: start a run, check data.

    qwen-daemon start --config configs/demo.yaml [--set section.key=value ...]
    qwen-daemon data check PATH... [--config FILE] [--set ...] [--json] [--strict]

Also runs as `python -m qwen_daemon ...` (the GPU machine has no uv).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

from shared import runs
from shared.config import Config, ConfigError, load_config

log = logging.getLogger("qwen_daemon")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"config error:\n{e}", file=sys.stderr)
        return 2
    except (ModelError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


class ModelError(RuntimeError):
    pass


class DataError(RuntimeError):
    pass


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-daemon", description="QLoRA fine-tuning of Qwen3 reasoning models.")
    sub = p.add_subparsers(dest="command", required=True)

    start = sub.add_parser("start", help="start a run (in the foreground in this build)")
    start.add_argument("--config", help="YAML config, e.g. configs/demo.yaml")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    start.add_argument("--foreground", action="store_true", help="run in this terminal (the only mode so far)")
    start.add_argument("--resume", metavar="RUN_DIR", help="continue runs/<name> from its newest valid checkpoint")
    start.set_defaults(func=cmd_start)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="check data files and report every problem")
    check.add_argument("paths", nargs="+", help="files or directories")
    check.add_argument("--config", help="take max_seq_len, split, tokenizer ... from this config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--strict", action="store_true", help="exit 1 if there is any problem")
    check.set_defaults(func=cmd_data_check)
    return p


def cmd_data_check(args: argparse.Namespace) -> int:
    _setup_logging(quiet=True)
    overrides = [*args.set, f"data.paths={json.dumps(args.paths)}"]
    cfg = load_config(args.config, overrides)
    if args.config is None:
        # Without a config: the Qwen3 vocabulary and a Qwen3-Thinking template, offline.
        cfg.model.tokenizer = "builtin:qwen3-tokenizer"
    prepared = _prepare(cfg)
    report = prepared.report
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if args.json else report.format_text())
    if report.kept == 0:
        print("error: no usable record in the given paths", file=sys.stderr)
        return 1
    return 1 if args.strict and report.problems else 0


def cmd_start(args: argparse.Namespace) -> int:
    from qwen_daemon.train.controls import Controls
    from qwen_daemon.train.loop import TrainingError, train
    from qwen_daemon.train.model import ModelLoadError
    from qwen_daemon.train.text_zh import TermDictionaryError

    if args.resume:
        run = Path(args.resume)
        if not (run / runs.CONFIG).exists():
            raise DataError(f"{run} is not a run directory (no {runs.CONFIG}); give the path of runs/<name>")
        cfg = load_config(run / runs.CONFIG, args.set)
    else:
        if not args.config:
            raise ConfigError("start needs --config FILE (or --resume RUN_DIR)")
        cfg = load_config(args.config, args.set)
        if cfg.run.name is None:
            cfg.run.name = runs.default_run_name(args.config)
        run = runs.run_dir(cfg)
        if run.exists():
            raise DataError(f"run directory {run} already exists; choose another run.name (--set run.name=...) "
                            f"or continue it with --resume {run}")
        run.mkdir(parents=True)
        (run / runs.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    _setup_logging(log_file=run / runs.DAEMON_LOG)
    print(f"run:      {cfg.run.name}\nrun dir:  {run}\n(in the foreground: Ctrl-C stops at the next step "
          "with a checkpoint; --resume continues it)", flush=True)

    controls = Controls()
    # Ctrl-C / SIGTERM: checkpoint at the next step boundary, then exit (a second Ctrl-C kills).
    def stop(signum, frame):
        log.warning("signal %d: stopping at the next step boundary with a checkpoint", signum)
        controls.stop()
        signal.signal(signum, signal.SIG_DFL)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    try:
        state = train(cfg, run, controls, resume=bool(args.resume))
    except (TrainingError, ModelLoadError, TermDictionaryError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        return 1
    if (run / "final").exists():
        print(f"finished at step {state.step}: adapter in {run / 'final'}, answers in {run / 'inference.jsonl'}")
    else:
        print(f"stopped at step {state.step}; continue with: qwen-daemon start --resume {run}")
    return 0


def _prepare(cfg: Config):
    from qwen_daemon.train.data import prepare_data
    from qwen_daemon.train.model import ModelLoadError, load_tokenizer
    from qwen_daemon.train.text_zh import TermDictionaryError

    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    except ModelLoadError as e:
        raise ModelError(str(e)) from None
    try:
        return prepare_data(cfg, tokenizer)
    except TermDictionaryError as e:
        raise DataError(str(e)) from None


def _setup_logging(log_file: Path | None = None, quiet: bool = False) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    handlers[0].setLevel(logging.WARNING if quiet else logging.INFO)
    if log_file is not None:
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=handlers, force=True)
    # Problems are in the report; in quiet mode do not print them twice.
    if quiet:
        logging.getLogger("qwen_daemon.train.data").setLevel(logging.ERROR)
