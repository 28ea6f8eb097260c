"""The run directory layout (DESIGN.md, "Run directory"): one place that knows the file names."""

from __future__ import annotations

import time
from pathlib import Path

from shared.config import Config

CONFIG = "config.yaml"
DAEMON_LOG = "daemon.log"
DATA_REPORT = "data_report.json"


def default_run_name(config_path: str | Path | None) -> str:
    """<config file stem>-<local time>, e.g. demo-20261123-151200."""
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def run_dir(cfg: Config) -> Path:
    if cfg.run.name is None:
        raise ValueError("run.name is not set; call default_run_name() first")
    return Path(cfg.run.runs_root) / cfg.run.name
