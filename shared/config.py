"""The typed run configuration: YAML in, validated settings out.

One schema for every entry point. `load_config(path, overrides)` reads a YAML file, applies
`--set section.key=value` overrides, and validates everything in one pass, so a user sees every
problem at once, each naming the file, the line where YAML has one, and the key:

    configs/demo.yaml:14: train.learning_rate: must be greater than 0 (got -0.0002)

Keys are the contract in DESIGN.md ("Config keys scripts rely on"); docs/configuration.md lists
every key with its default, and a test keeps the two in step.
"""

from __future__ import annotations

import difflib
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


BUNDLED_DATA = Path(__file__).resolve().parents[1] / "data"  # the Chinese cryptography set and its terms
# Settings that name files: a relative path in a config file is relative to that file, one in a
# --set override to the current directory; both are stored absolute, so the run's frozen
# config.yaml means the same from anywhere.
PATH_SETTINGS = (("data", "paths"), ("data", "terms"))


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently fall back to a default); assignment is
    # validated too, so code that adjusts a config after loading cannot smuggle in a bad value.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str | None = None
    """Run name; the run directory is <runs_root>/<name>. Default: <config file stem>-<timestamp>."""
    runs_root: str = "runs"
    """Directory holding all runs."""

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str | None) -> str | None:
        if v is not None and (not v or "/" in v or v in {".", ".."} or v.strip() != v):
            raise ValueError("must be a plain directory name (no '/', no surrounding spaces)")
        return v


class ModelConfig(_Section):
    name_or_path: str = "Qwen/Qwen3-4B-Thinking-2507"
    """Hugging Face id, local directory, or builtin:tiny-qwen3."""
    tokenizer: str | None = None
    """Tokenizer id/path/builtin:qwen3-tokenizer; default: the model's own tokenizer."""
    load_in_4bit: bool = True
    """Quantise the base model to 4 bit with bitsandbytes (QLoRA); false = plain LoRA."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """auto = bfloat16 where supported, else float16 on GPU, float32 on CPU."""
    attn_implementation: Literal["auto", "sdpa", "sdpa_varlen", "eager", "flash_attention_2"] = "auto"
    """auto = sdpa_varlen (torch's varlen flash kernel over each packed sample, no mask) on a CUDA GPU
    with packing, else sdpa (a block-diagonal mask for packed rows)."""
    liger_kernels: bool = True
    """Use liger-kernel's fused kernels on CUDA (fused linear cross-entropy, RMSNorm, RoPE, SwiGLU)."""
    fused_lora: bool = True
    """One autograd function per LoRA projection and per MLP (base matmul, 4-bit dequantisation and
    the LoRA update together); false = peft's own layers (slower, more memory)."""


class LoraConfig(_Section):
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    use_rslora: bool = False
    """Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."""
    use_dora: bool = False
    """Weight-decomposed LoRA (DoRA); slower per step."""


class SplitConfig(_Section):
    train: float = Field(0.9, gt=0, le=1)
    validation: float = Field(0.05, ge=0, le=1)
    test: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> SplitConfig:
        total = self.train + self.validation + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"train + validation + test must sum to 1 (got {total:g})")
        return self


class DataConfig(_Section):
    paths: list[str] = Field(default_factory=lambda: [str(BUNDLED_DATA / "crypto_qa")])
    """Files or directories (searched recursively) of training records; relative to the config file."""
    max_seq_len: int = Field(2048, ge=16)
    packing: bool = True
    """Pack samples into sequences of max_seq_len (padding-free); false = dynamic padding."""
    overlong: Literal["drop", "truncate"] = "drop"
    """What to do with a sample longer than max_seq_len; either way it is reported."""
    split: SplitConfig = Field(default_factory=SplitConfig)
    seed: int = 42
    to_simplified: bool = True
    """Convert traditional Chinese to mainland simplified: true = a record with traditional
    characters gets the Taiwan vocabulary (qwen_daemon/train/tw_vocabulary.tsv: 金鑰 -> 密钥) and
    then OpenCC t2s (characters only); simplified records, and records that ask for answers in
    traditional Chinese, stay as written; false = keep every record as written."""
    terms: str = str(BUNDLED_DATA / "crypto_terms.tsv")
    """Term dictionary (TSV) for jieba segmentation, term statistics and stratified splits; relative
    to the config file."""
    min_thinking_tokens: int = Field(128, ge=0)
    """`data check` warns about reasoning traces shorter than this (in tokens) or under half their
    answer; `data think` writes new traces for them. 0 = only the ratio to the answer counts."""
    system_prompt: str | None = None
    """System prompt for records that carry none; null = no system turn."""
    num_proc: int | Literal["auto"] = "auto"
    """Worker processes for data preparation; auto = min(cores, 8), 1 for small data."""

    @field_validator("paths")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("needs at least one file or directory")
        return v

    @field_validator("to_simplified", mode="before")
    @classmethod
    def _no_opencc_config(cls, v: Any) -> Any:
        # Until issue 14 this took an OpenCC configuration name; tw2sp broke words (橢圓曲線上 -> 椭圆曲在线).
        if isinstance(v, str) and v.strip().lower() in {"tw2sp", "t2s", "tw2s", "hk2s"}:
            raise ValueError("OpenCC configuration names are no longer accepted; write true (Taiwan vocabulary, "
                             "then OpenCC t2s characters) or false (keep traditional Chinese as written)")
        return v

    @field_validator("num_proc")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


class TrainConfig(_Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    """Optimizer steps; null = as many as `epochs` take."""
    micro_batch_size: int | Literal["auto"] = 2
    """Units (packed rows, or samples without packing) per forward pass on each process; auto = the
    largest that fits the GPU with train.memory_headroom to spare (measured by a probe before
    training), within train.global_batch_size."""
    grad_accum: int = Field(4, gt=0)
    """Micro-batches per optimizer step; derived from train.global_batch_size when that is set."""
    global_batch_size: int | None = Field(None, gt=0)
    """Units per optimizer step over all processes (micro-batch x accumulation x processes); null =
    micro_batch_size x grad_accum x processes. Needed with micro_batch_size auto."""
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping threshold."""
    on_anomaly: Literal["pause", "skip", "stop"] = "pause"
    """A step with a NaN or inf loss or gradient is never applied (skipped, an `anomaly` event);
    three in a row: pause (look in the TUI, then resume or stop), skip (go on) or stop (a
    checkpoint of the good weights, then the run ends)."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """adamw: torch's AdamW (fused on CUDA; 8 bytes of state per LoRA weight, about 0.26 GB for r=16
    on Qwen3-4B); adamw_8bit: bitsandbytes' paged 8-bit AdamW (a quarter of that state, one kernel
    per weight and step; not with launch.strategy fsdp)."""
    grad_checkpointing: bool | Literal["auto"] = True
    """Recompute each decoder layer's activations in the backward instead of keeping them; auto =
    recompute only as many layers as the memory needs (fewer is faster)."""
    offload_activations: bool | Literal["auto"] = "auto"
    """Keep the recomputed layers' inputs in host memory (pinned, copied on a side stream) instead of
    on the GPU; auto = where that lets a faster plan fit (CUDA only)."""
    memory_headroom: float = Field(0.1, ge=0, lt=1)
    """Share of the GPU's memory the automatic plan leaves free (other processes, fragmentation)."""
    seed: int = 42
    eval_every_steps: int = Field(100, gt=0)
    inference_check_tokens: int = Field(256, ge=0)
    """After training, answer a few test-split questions with the saved adapter, generating up to
    this many tokens each; 0 = skip the check."""


    @field_validator("micro_batch_size")
    @classmethod
    def _positive_or_auto(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v

    @model_validator(mode="after")
    def _auto_needs_global_batch(self) -> TrainConfig:
        if self.micro_batch_size == "auto" and self.global_batch_size is None:
            raise ValueError("micro_batch_size auto needs global_batch_size (units per optimizer step over "
                             "all processes, e.g. 16)")
        return self


class EvalConfig(_Section):
    at_end: bool = False
    """After training, answer the held-out split with the base model and with base + adapter and
    score both (`qwen-daemon eval`); the daemon's state says evaluating meanwhile."""
    split: Literal["test", "validation"] = "test"
    limit: int | None = Field(None, gt=0)
    """Records of the split to answer at most; null = all."""
    max_new_tokens: int = Field(1024, gt=0)
    """Tokens generated per answer, thinking included."""
    do_sample: bool = True
    """Sample as Qwen3-Thinking recommends (greedy decoding makes it repeat itself), seeded; false = greedy."""
    temperature: float = Field(0.6, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    top_k: int = Field(20, ge=0)
    seed: int = 42
    batch_size: int = Field(8, gt=0)
    """Questions generated together (left-padded)."""
    generate_every_steps: int | None = Field(None, gt=0)
    """During training, score `sample_size` fixed validation records every N steps with the model
    being trained (published as `eval` metrics next to the loss); null = never."""
    sample_size: int = Field(8, gt=0)


class CheckpointConfig(_Section):
    every_steps: int = Field(200, gt=0)
    keep_last: int = Field(3, gt=0)


class LaunchConfig(_Section):
    num_processes: int | Literal["auto"] = "auto"
    """auto = one per visible GPU, else 1 on CPU."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = nccl on GPUs, gloo on CPU."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every process holds the whole 4-bit model (fastest while it fits); fsdp: the 4-bit
    base, LoRA weights, gradients and optimizer state are sharded over the processes (FSDP2)."""
    torchrun_args: list[str] = Field(default_factory=list)
    """Options passed to torch.distributed.run, e.g. for several nodes: ["--nnodes=2", "--node-rank=0",
    "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500"]. Empty: one node (--standalone)."""
    collective_timeout_s: int = Field(600, ge=10)
    """A collective (gradient all-reduce, command broadcast) that waits longer fails the workers; the
    daemon then restarts them from the newest checkpoint."""

    @field_validator("num_processes")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be >= 1 or 'auto'")
        return v


class DaemonConfig(_Section):
    listen: list[str] = Field(default_factory=list)
    """Extra TCP endpoints tcp://HOST:PORT (control at PORT, telemetry at PORT+1); non-loopback
    ones need curve_keys_dir."""
    max_restarts: int = Field(2, ge=0)
    """Times a killed or crashed worker is restarted from the newest checkpoint before the run fails."""
    curve_keys_dir: str | None = None
    """Directory from `qwen-daemon keys generate`: server key pair and authorized/ client keys.
    When set, every TCP endpoint requires CURVE."""

    @field_validator("listen")
    @classmethod
    def _tcp(cls, v: list[str]) -> list[str]:
        for endpoint in v:
            host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
            if not endpoint.startswith("tcp://") or not host or not port.isdigit() or not 0 < int(port) < 65535:
                raise ValueError(f"{endpoint!r} is not tcp://HOST:PORT (e.g. tcp://127.0.0.1:5555)")
        return v


class Config(_Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    launch: LaunchConfig = Field(default_factory=LaunchConfig)
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)

    def to_yaml(self) -> str:
        """The resolved config as YAML, as frozen into a run directory."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


class ConfigError(ValueError):
    """A config file or override is invalid; the message lists every problem, one per line."""


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load and validate a config: YAML file (or all defaults), then `section.key=value` overrides."""
    source = str(path) if path is not None else "<defaults>"
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
        try:
            raw = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{source}:{mark.line + 1}" if mark else source
            raise ConfigError(f"{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of sections (run:, model:, data:, ...)")

    problems = []
    origin: dict[tuple[str, ...], str] = {}
    for item in overrides:
        try:
            keys, value = _parse_override(item)
            _set_path(raw, keys, value)
            origin[keys] = f"--set {item}"
        except ValueError as e:
            problems.append(f"--set {item}: {e}")
    for keys in PATH_SETTINGS:
        base = Path.cwd() if keys in origin or path is None else Path(path).resolve().parent
        _resolve_path(raw, keys, base)

    try:
        config = Config.model_validate(raw)
    except ValidationError as e:
        for err in e.errors():
            problems.append(_describe(err, source, lines, origin))
        config = None
    if problems:
        raise ConfigError("\n".join(problems))
    return config


def _resolve_path(raw: dict[str, Any], keys: tuple[str, ...], base: Path) -> None:
    """Make the path (or list of paths) at `keys` absolute against `base`; anything else is left
    for validation to describe."""
    section = raw.get(keys[0])
    if not isinstance(section, dict) or keys[1] not in section:
        return
    value = section[keys[1]]

    def absolute(p: Any) -> Any:
        return os.path.normpath(base / Path(p).expanduser()) if isinstance(p, str) and p else p

    section[keys[1]] = [absolute(p) for p in value] if isinstance(value, list) else absolute(value)


def _parse_override(item: str) -> tuple[tuple[str, ...], Any]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ValueError("expected section.key=value, e.g. --set train.learning_rate=1e-4")
    keys = tuple(key.strip().split("."))
    if any(not k for k in keys):
        raise ValueError(f"malformed key {key!r}")
    # YAML typing, so `--set data.paths=[a,b]` and `--set train.max_steps=null` mean what they say.
    try:
        return keys, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return keys, value


def _set_path(raw: dict, keys: tuple[str, ...], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ValueError(f"{k!r} is not a section")
        node = child
    node[keys[-1]] = value


def _describe(err: dict, source: str, lines: dict[tuple[str, ...], int], origin: dict[tuple[str, ...], str]) -> str:
    loc = tuple(str(p) for p in err["loc"])
    dotted = ".".join(loc)
    # A section-level error (split ratios) caused by an override of one of its keys names that override.
    where = origin.get(loc) or next((o for keys, o in origin.items() if keys[:len(loc)] == loc), None) \
        or _where(source, lines, loc)
    if err["type"] == "extra_forbidden":
        return f"{where}: {dotted}: unknown key{_suggest(loc)}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{where}: {dotted}: {msg}{shown}"


def _where(source: str, lines: dict[tuple[str, ...], int], loc: tuple[str, ...]) -> str:
    # The closest key that exists in the file: a missing leaf reports its section's line.
    for n in range(len(loc), 0, -1):
        if loc[:n] in lines:
            return f"{source}:{lines[loc[:n]]}"
    return source


def _suggest(loc: tuple[str, ...]) -> str:
    section: type[BaseModel] = Config
    for part in loc[:-1]:
        field = section.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return ""
        section = field.annotation
    known = list(section.model_fields)
    close = difflib.get_close_matches(loc[-1], known, n=1)
    hint = f"; did you mean {'.'.join(loc[:-1] + (close[0],))}?" if close else ""
    return f"{hint} (known keys here: {', '.join(known)})"


def _key_lines(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Map each key path in a YAML document to its 1-based line."""
    out: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (str(key.value),)
            out[path] = key.start_mark.line + 1
            out.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = prefix + (str(i),)
            out[path] = value.start_mark.line + 1
            out.update(_key_lines(value, path))
    return out
