"""`qwen-tui`: the terminal UI.

    qwen-tui attach [RUN] [--runs-root runs]             a run by name or path; default: the newest live run
    qwen-tui attach --endpoint tcp://HOST:PORT [--keys DIR]   a daemon's TCP endpoint (daemon.listen)

Also runs as `python -m qwen_tui ...` (the GPU machine has no uv).
"""

from __future__ import annotations

import argparse
import sys

from shared import runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qwen-tui", description="Watch and steer a qwen-daemon run.")
    sub = parser.add_subparsers(dest="command", required=True)
    attach = sub.add_parser("attach", help="attach to a run (read-only when its daemon is gone)")
    attach.add_argument("run", nargs="?", help="runs/<name>, its path or its name; default: the newest live run")
    attach.add_argument("--runs-root", default="runs", help="where runs are (default: ./runs)")
    attach.add_argument("--endpoint", help="tcp://HOST:PORT of a daemon's daemon.listen (control; telemetry is PORT+1)")
    attach.add_argument("--keys", help="directory with server.key and client.key_secret for a CURVE endpoint")
    args = parser.parse_args(argv)
    try:
        app = _app(args)
    except ValueError as e:
        print(f"qwen-tui: {e}", file=sys.stderr)
        return 1
    app.run()
    return 0


def _app(args: argparse.Namespace):
    from qwen_tui.app import QwenTUI
    from qwen_tui.client import Connection, CurveKeys, Endpoints

    if args.endpoint:
        keys = CurveKeys.load(args.keys) if args.keys else None
        return QwenTUI(Connection(endpoints=Endpoints.from_tcp(args.endpoint), keys=keys).start())
    if args.run:
        run = runs.find_run(args.run, args.runs_root)
        if run is None:
            raise ValueError(f"no run {args.run!r}: give runs/<name>, its path or its name "
                             "(qwen-daemon list shows them)")
        return QwenTUI(Connection(run_dir=run).start())
    live = runs.live_runs(args.runs_root)
    if not live:
        finished = runs.list_runs(args.runs_root)
        hint = (f"; to look at a finished run: qwen-tui attach {finished[-1].name}" if finished else
                "; start one with: qwen-daemon start --config configs/demo.yaml")
        raise ValueError(f"no live run in {args.runs_root}{hint} (qwen-daemon list shows every run)")
    if len(live) == 1:
        return QwenTUI(Connection(run_dir=live[0][0]).start())
    return QwenTUI(choices=live)
