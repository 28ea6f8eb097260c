"""Loading the tokenizer (and, with the training engine, the model) a config names."""

from __future__ import annotations

from qwen_daemon.train.builtin import resolve_model_path


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says what to do."""


def load_tokenizer(name_or_path: str):
    """A fast tokenizer by hub id, local directory or builtin:* name, with a clear error offline."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        # The local cache first: an offline GPU server must not wait for the hub's retries.
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError):
        tokenizer = None
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(
            f"cannot load the tokenizer of {name_or_path!r}: {e}\n"
            "  - a hub id must already be in the local Hugging Face cache when the hub is unreachable "
            "(download it first, e.g. `huggingface-cli download Qwen/Qwen3-4B-Thinking-2507`; in mainland China "
            "set HF_ENDPOINT=https://hf-mirror.com);\n"
            "  - or point model.name_or_path (or model.tokenizer) at a local model directory;\n"
            "  - or use builtin:qwen3-tokenizer (the real Qwen3 vocabulary and a Qwen3-Thinking chat template, offline)."
        ) from None
    if not tokenizer.is_fast:
        raise ModelLoadError(f"{name_or_path!r} has no fast tokenizer (tokenizer.json); the data pipeline needs one")
    if tokenizer.eos_token is None or tokenizer.chat_template is None:
        raise ModelLoadError(f"{name_or_path!r} has no chat template or eos token; use a chat model's tokenizer")
    return tokenizer
