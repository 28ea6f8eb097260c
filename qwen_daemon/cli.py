"""`qwen-daemon`: start and steer runs, check data.

    qwen-daemon start --config configs/demo.yaml [--set section.key=value ...] [--foreground]
    qwen-daemon start --resume RUN
    qwen-daemon ctl status|pause|resume|checkpoint|set-batch-size N|stop [--run RUN] [--json]
    qwen-daemon list | stop [RUN] | logs [RUN] [-f]
    qwen-daemon data check PATH... [--config FILE] [--set ...] [--json] [--strict]
    qwen-daemon eval RUN [--checkpoint N|final] [--split test] [--limit K] [--json]
    qwen-daemon report RUN [--json]
    qwen-daemon export RUN --format merged|gguf [--checkpoint N|final] [--quant f16|q8_0|q4_k_m] [--out DIR] [--force]

Also runs as `python -m qwen_daemon ...` (the GPU machine has no uv).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
from pathlib import Path

from qwen_daemon import launch
from shared import protocol, runs
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

    start = sub.add_parser("start", help="start a run in a background daemon")
    start.add_argument("--config", help="YAML config, e.g. configs/demo.yaml")
    start.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    start.add_argument("--foreground", action="store_true", help="stay in this terminal (systemd, debugging)")
    start.add_argument("--resume", metavar="RUN", help="continue runs/<name> from its newest valid checkpoint")
    start.set_defaults(func=cmd_start)

    ctl = sub.add_parser("ctl", help="send a command to a run's daemon")
    ctl.add_argument("command_name", choices=[name.replace("_", "-") for name in protocol.COMMANDS])
    ctl.add_argument("value", nargs="?", type=int, help="set-batch-size: the new micro-batch size")
    ctl.add_argument("--change-global-batch", action="store_true",
                     help="set-batch-size: keep accumulation (the global batch changes) instead")
    ctl.add_argument("--run", help="runs/<name> or its path; default: the newest live run")
    ctl.add_argument("--json", action="store_true", help="print the whole reply as JSON")
    ctl.add_argument("--timeout", type=float, default=600, help="seconds to wait for the reply")
    ctl.set_defaults(func=cmd_ctl)

    stop = sub.add_parser("stop", help="stop a run at the next step, with a checkpoint")
    stop.add_argument("run", nargs="?")
    stop.add_argument("--timeout", type=float, default=600)
    stop.set_defaults(func=cmd_stop)

    keys = sub.add_parser("keys", help="CURVE keys for TCP endpoints").add_subparsers(dest="keys_command",
                                                                                    required=True)
    gen = keys.add_parser("generate", help="server and client key pairs for daemon.curve_keys_dir")
    gen.add_argument("directory")
    gen.add_argument("--client", default="client", help="name of the client key pair")
    gen.set_defaults(func=cmd_keys_generate)

    lst = sub.add_parser("list", help="runs, their state, step and daemon pid")
    lst.add_argument("--runs-root", default="runs")
    lst.set_defaults(func=cmd_list)

    logs = sub.add_parser("logs", help="a run's log")
    logs.add_argument("run", nargs="?")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing while the daemon runs")
    logs.set_defaults(func=cmd_logs)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="check data files and report every problem")
    check.add_argument("paths", nargs="+", help="files or directories")
    check.add_argument("--config", help="take max_seq_len, split, tokenizer ... from this config")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.add_argument("--strict", action="store_true", help="exit 1 if there is any problem")
    check.set_defaults(func=cmd_data_check)
    th = data.add_parser("think", help="write reasoning traces with the model for records with none or a poor one "
                                       "(the ones data check warns about); your files are not touched")
    th.add_argument("paths", nargs="+", help="files or directories (JSON, JSON Lines, Markdown)")
    th.add_argument("--out", required=True, help="directory for the copies, review.jsonl and the progress; "
                                                 "the same --out again continues")
    th.add_argument("--config", help="the model, eval.* sampling and data.* settings; default: the built-in defaults")
    th.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    th.add_argument("--all", action="store_true", help="every record, not only those with a poor trace")
    th.add_argument("--min-agreement", type=float, default=0.3,
                    help="least term-weighted ROUGE-L F1 between the model's answer and the record's (default 0.3)")
    th.add_argument("--limit", type=int, help="generate for at most this many records in this call")
    th.set_defaults(func=cmd_data_think)

    ev = sub.add_parser("eval", help="answer the run's held-out split with the base model and with the adapter, "
                                     "and score both")
    ev.add_argument("run", help="runs/<name> or its path")
    ev.add_argument("--checkpoint", default="final", help="final (default) or a checkpoint's step")
    ev.add_argument("--split", choices=["test", "validation"], help="default: eval.split of the run's config")
    ev.add_argument("--limit", type=int, help="answer at most this many questions")
    ev.add_argument("--json", action="store_true", help="print the summary as JSON")
    ev.set_defaults(func=cmd_eval)

    rep = sub.add_parser("report", help="write the run's report.html (charts, summary, advice) from its files")
    rep.add_argument("run", nargs="?", help="runs/<name> or its path; default: the newest live run")
    rep.add_argument("--json", action="store_true", help="print the summary as JSON")
    rep.set_defaults(func=cmd_report)

    from qwen_daemon.train.export import FORMATS, QUANTS

    exp = sub.add_parser("export", help="the adapter merged into the bf16 base (safetensors), or that as GGUF "
                                        "for llama.cpp / Ollama")
    exp.add_argument("run", help="runs/<name> or its path")
    exp.add_argument("--format", required=True, choices=FORMATS, help="merged: for transformers and vLLM; "
                                                                       "gguf: one file and a Modelfile")
    exp.add_argument("--checkpoint", default="final", help="final (default) or a checkpoint's step")
    exp.add_argument("--quant", choices=QUANTS, help="gguf: q8_0 (default), f16, or q4_k_m (needs llama.cpp)")
    exp.add_argument("--out", help="default: <run>/export/<checkpoint>-merged|<quant>")
    exp.add_argument("--force", action="store_true", help="replace an existing --out (once the new export is whole)")
    exp.set_defaults(func=cmd_export)
    return p


def cmd_export(args: argparse.Namespace) -> int:
    from qwen_daemon.train.export import ExportError, export_run
    from qwen_daemon.train.model import ModelLoadError

    _setup_logging()
    run = _find_run(args.run, live=False)
    try:
        path = export_run(run, args.format, args.checkpoint, args.quant, args.out, force=args.force)
    except (ExportError, ModelLoadError) as e:
        raise DataError(str(e)) from None
    print(path)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from qwen_daemon.report import summarise_run, write_report

    run = _find_run(args.run, live=False) if args.run else _find_run(None, live=True)
    path = write_report(run)
    if args.json:
        print(json.dumps({"report": str(path), **summarise_run(run)}, ensure_ascii=False, indent=1, default=str))
    else:
        print(path)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qwen_daemon.train.evaluate import EvaluationError, evaluate_run, format_table
    from qwen_daemon.train.model import ModelLoadError

    _setup_logging(quiet=True)
    run = _find_run(args.run, live=False)
    try:
        summary = evaluate_run(run, args.checkpoint, args.split, args.limit)
    except (EvaluationError, ModelLoadError) as e:
        raise DataError(str(e)) from None
    print(json.dumps(summary, ensure_ascii=False, indent=1) if args.json else format_table(summary))
    return 0


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


def cmd_data_think(args: argparse.Namespace) -> int:
    from qwen_daemon.train.model import ModelLoadError
    from qwen_daemon.train.think import ThinkError, think

    _setup_logging(quiet=True)
    cfg = load_config(args.config, args.set)
    try:
        summary = think(cfg, args.paths, Path(args.out), all_records=args.all, min_agreement=args.min_agreement,
                        limit=args.limit, on_batch=lambda n, total: print(f"think: {n}/{total} records", file=sys.stderr,
                                                                          flush=True))
    except (ThinkError, ModelLoadError) as e:
        raise DataError(str(e)) from None
    print(f"{summary['records']} records, {summary['needed']} needing a trace; generated {summary['generated']} now, "
          f"{summary['accepted']} accepted, {summary['review']} for review in {Path(args.out) / 'review.jsonl'}"
          + (f", {summary['remaining']} still to do (run again)" if summary["remaining"] else ""))
    for f in summary["files"]:
        print(f"  wrote {f}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    from qwen_daemon.supervisor import Supervisor

    if args.resume:
        run = _find_run(args.resume, live=False)
        if runs.live_daemon(run):
            raise DataError(f"{run} is running; nothing to resume")
        ended = (runs.read_json(run / runs.DAEMON_JSON) or {}).get("state")
        if ended == "finished":
            print(f"{run} has finished (step {runs.last_step(run)}, adapter in {run / 'final'}); nothing to resume. "
                  "To train on, start a new run, e.g. with --set train.epochs=... from its config.")
            return 0
    else:
        if not args.config:
            raise ConfigError("start needs --config FILE (or --resume RUN)")
        cfg = load_config(args.config, args.set)
        if cfg.run.name is None:
            cfg.run.name = runs.default_run_name(args.config)
        run = runs.run_dir(cfg)
        if run.exists():
            raise DataError(f"run directory {run} already exists; choose another run.name (--set run.name=...) "
                            f"or continue it with --resume {run}")
        run.mkdir(parents=True)
        (run / runs.CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    if args.foreground:
        _setup_logging(log_file=run / runs.DAEMON_LOG)
        print(f"run {run.name} in {run} (foreground; Ctrl-C stops at the next step with a checkpoint)", flush=True)
        try:
            return Supervisor(run, resume=bool(args.resume), foreground=True).run()
        except RuntimeError as e:
            raise DataError(str(e)) from None
    cmd = [sys.executable, "-m", "qwen_daemon.supervisor", str(run)] + (["--resume"] if args.resume else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=launch.child_env(), text=True)  # survives the SSH session
    ready = proc.stdout.readline().split()
    if ready and ready[0] == "ready" and not _call(run, "ping", {}, timeout=30)["ok"]:
        ready = []  # bound but not answering
    if not ready or ready[0] != "ready":
        errors = [line for line in (run / runs.DAEMON_LOG).read_text(encoding="utf-8", errors="replace").splitlines()
                  if " ERROR " in line] if (run / runs.DAEMON_LOG).exists() else []
        raise DataError(f"the daemon did not start{': ' + errors[-1] if errors else ''}; see {run / runs.DAEMON_LOG}")
    print(f"run:        {run.name}\nrun dir:    {run}\ndaemon pid: {proc.pid}\n"
          f"control:    {ready[1]}\ntelemetry:  {ready[2]}\n"
          f"follow it:  qwen-daemon logs {run} -f      steer it: qwen-daemon ctl status --run {run}\n"
          f"attach:     qwen-tui attach {run.name}")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from qwen_daemon.supervisor import generate_keys

    made = generate_keys(Path(args.directory), args.client)
    print(f"server key pair: {made['server']} (stays here; set daemon.curve_keys_dir: {args.directory})\n"
          f"client key pair: {made['client']} (copy it to the client machine, with server.key)\n"
          f"authorised clients: {Path(args.directory) / 'authorized'} (add more clients' .key files there)")
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    cmd = args.command_name.replace("-", "_")
    call_args = {}
    if cmd == "set_batch_size":
        if args.value is None:
            raise ConfigError("set-batch-size needs the new micro-batch size, e.g. qwen-daemon ctl set-batch-size 2")
        call_args = {"micro_batch_size": args.value}
        if args.change_global_batch:
            call_args["keep_global_batch"] = False
    run = _find_run(args.run, live=True)
    reply = _call(run, cmd, call_args, timeout=args.timeout)
    if args.json:
        print(json.dumps(reply, ensure_ascii=False, indent=2))
    elif reply["ok"]:
        for key, value in (reply.get("result") or {}).items():
            if cmd != "snapshot" or not isinstance(value, list):
                print(f"{key}: {value}")
    else:
        print(f"error ({reply['error']['code']}): {reply['error']['message']}", file=sys.stderr)
    return 0 if reply["ok"] else 1


def cmd_stop(args: argparse.Namespace) -> int:
    run = _find_run(args.run, live=True)
    reply = _call(run, "stop", {}, timeout=args.timeout)
    print(f"{run.name}: stopping at step {reply['result']['step']}" if reply["ok"] else reply["error"]["message"])
    return 0 if reply["ok"] else 1


def cmd_list(args: argparse.Namespace) -> int:
    found = runs.list_runs(args.runs_root)
    if not found:
        print(f"no runs in {args.runs_root}")
    for run in found:
        state = (runs.read_json(run / runs.DAEMON_JSON) or {}).get("state", "-")
        live = runs.live_daemon(run)
        if live is None and state not in (*protocol.FINAL_STATES, "-"):
            state = "dead"  # its daemon was killed mid-run: `start --resume` goes on from the last checkpoint
        print(f"{run.name:40} {state:10} step {runs.last_step(run):>7} pid {live['pid'] if live else '-'}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    import time

    run = _find_run(args.run, live=False)
    path = run / runs.DAEMON_LOG
    with open(path, encoding="utf-8", errors="replace") as f:
        sys.stdout.write(f.read())
        while args.follow:
            line = f.readline()
            if line:
                sys.stdout.write(line)
                sys.stdout.flush()
            elif runs.live_daemon(run) is None:
                return 0
            else:
                time.sleep(0.3)  # tail -f: nothing to wait on but the file
    return 0


def _call(run: Path, cmd: str, args: dict, timeout: float) -> dict:
    import zmq

    info = runs.read_json(run / runs.DAEMON_JSON)
    context = zmq.Context()
    try:
        return protocol.request(context, info["endpoints"]["control"], cmd, args, timeout)
    except TimeoutError:
        raise DataError(f"no answer from the daemon of {run} within {timeout:g} s (it applies commands at "
                        "the next step boundary; try a larger --timeout)") from None
    finally:
        context.destroy(linger=0)


def _find_run(name: str | None, live: bool) -> Path:
    """A run by directory or name; with no name, the newest run with a live daemon."""
    run = runs.find_run(name or None)
    if run is None:
        raise DataError(f"no run {name!r} (give runs/<name> or its path; see qwen-daemon list)" if name else
                        "no live run in ./runs; name one with --run (see qwen-daemon list)")
    if name and live and runs.live_daemon(run) is None:
        raise DataError(f"{run} has no running daemon (see qwen-daemon list)")
    return run


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
