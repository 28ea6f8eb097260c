"""Shared pytest fixtures."""

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def builtin_cache_dir():
    """Point the builtin model/tokenizer cache at ``<repo>/.cache/test-builtins``.

    The builds take seconds, so they are shared by all tests of a session and kept between
    runs (``.cache/`` is git-ignored). An explicitly set ``QWEN_DAEMON_CACHE`` wins.
    """
    from qwen_daemon.train.builtin import CACHE_ENV

    previous = os.environ.get(CACHE_ENV)
    if not previous:
        os.environ[CACHE_ENV] = str(REPO_ROOT / ".cache" / "test-builtins")
    yield Path(os.environ[CACHE_ENV])
    if not previous:
        os.environ.pop(CACHE_ENV, None)
