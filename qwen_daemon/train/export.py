"""Exporting a run's model: the adapter merged into the base, or that merge as GGUF for llama.cpp / Ollama.

    qwen-daemon export RUN --format merged|gguf [--checkpoint N|final] [--quant f16|q8_0|q4_k_m] [--out DIR] [--force]

The merge loads the base model unquantised in bf16 (never the NF4 weights training used: merging
into them would bake the 4-bit rounding into every weight), merges the adapter (peft
`merge_and_unload`) and saves safetensors with the tokenizer, its chat template and the generation
config. Before anything is kept, `check_merged` compares the saved model's logits with base +
adapter's in float32 and refuses a merge that is off.

GGUF: the merged model converted tensor by tensor with the `gguf` package's writer and tensor-name
map (`write_gguf`, reading the safetensors' mmap, so a 4B model never needs a second copy in
memory), f16 or q8_0; q4_k_m is quantised from the f16 file by llama.cpp (`llama-quantize` on PATH,
or a Python with llama-cpp-python), which the `gguf` package does not contain. An Ollama Modelfile
with the same chat template goes next to the file.

Every export is written into `.tmp-<out>-<pid>` beside `out` (runs.atomic_directory) and renamed to `out` when complete:
a failed or killed export leaves nothing under the final name, and `force` replaces an old export
only once the new one is whole. One export per output directory at a time.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from qwen_daemon.train.evaluate import EvaluationError, adapter_dir
from shared import runs
from shared.config import Config, load_config

log = logging.getLogger(__name__)

FORMATS = ("merged", "gguf")
QUANTS = ("f16", "q8_0", "q4_k_m")
LLAMA_PYTHON_ENV = "QWEN_DAEMON_LLAMA_PYTHON"

# Bytes per weight on disk, for the free-space check (q4_k_m is ~4.9 bits; 0.7 leaves room for the
# q6_k tensors llama.cpp keeps in it).
BYTES_PER_WEIGHT = {"bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32, "q4_k_m": 0.7}
DISK_SLACK_BYTES = 64 << 20  # tokenizer, configs, card

# Qwen3-Thinking's recommended sampling (its generation_config.json), where the model has none.
QWEN3_SAMPLING = {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")

CHECK_PROMPTS = (
    "SM4 和 AES 的分组长度与轮数各是多少？",
    "Explain in one sentence what a LoRA adapter changes in a model.",
    "用一句话说明 HMAC 的用途。",
)
# bf16 keeps 8 significant bits: each merged weight W + s*BA is rounded by up to 2^-9 of itself.
# The roundings are independent and compound over the layers. Measured (RMS error relative to the
# logits' spread): 0.09 % on the 2-layer tiny model, 1.5 % on Qwen3-4B's shape (36 layers) with
# random weights. 5 % stays clear of that and well below what a wrong merge does (a missing or
# doubled adapter, a wrong scaling: an error the size of the adapter's own effect).
MERGE_TOLERANCE = 0.05


class ExportError(RuntimeError):
    """The export cannot be made; the message says why and what to do."""


def export_run(run_dir: Path, fmt: str, checkpoint: str | int = "final", quant: str | None = None,
               out: Path | None = None, *, force: bool = False, device=None, check: bool = True) -> Path:
    """Export the run's adapter (`final` or checkpoint N) merged into its bf16 base: as a Hugging
    Face model directory (`fmt` merged), or as one .gguf file (`fmt` gguf, `quant` default q8_0)
    with an Ollama Modelfile. `out` defaults to `<run>/export/<adapter>-merged|<quant>`. Returns
    the directory, or the .gguf file's path."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "merged" and quant:
        raise ExportError(f"--quant {quant} is for --format gguf; a merged export is bf16 safetensors")
    quant = (quant or "q8_0") if fmt == "gguf" else None
    if quant not in (None, *QUANTS):
        raise ExportError(f"unknown GGUF quantisation {quant!r}; choose one of {', '.join(QUANTS)}")
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ExportError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml")
    try:
        adapter = adapter_dir(run_dir, checkpoint)
    except EvaluationError as e:
        raise ExportError(str(e)) from None
    out = Path(out) if out else run_dir / "export" / f"{adapter.name}-{quant or 'merged'}"
    gguf_name = f"{run_dir.name}-{adapter.name}-{quant}.gguf" if quant else None
    quantiser = find_quantiser() if quant == "q4_k_m" else None  # fail before an hour of merging

    with _staging(out, force) as tmp:
        parameters = _count_parameters(_base_config(cfg, fmt))
        # At worst all of it lies on this disk at once: the merge, the GGUF, the f16 file q4_k_m comes from.
        per_weight = BYTES_PER_WEIGHT["bf16"] + BYTES_PER_WEIGHT.get(quant, 0) + (2 if quantiser else 0)
        _check_disk(out.parent, parameters * per_weight)
        merged = tmp / "merged" if gguf_name else tmp
        checked = merge(cfg, adapter, merged, device, check)
        if gguf_name:
            path = tmp / gguf_name
            if quantiser:
                quantise(write_gguf(merged, tmp / "f16.gguf", "f16", name=path.stem), path, quantiser)
                (tmp / "f16.gguf").unlink()
            else:
                write_gguf(merged, path, quant, name=path.stem)
            write_modelfile(tmp / "Modelfile", gguf_name, merged)
        (tmp / "README.md").write_text(model_card(cfg, run_dir, adapter, merged, checked, gguf_name), encoding="utf-8")
        if gguf_name:
            shutil.rmtree(merged)  # the scratch merge
    log.info("exported %s to %s", adapter, out)
    return out / gguf_name if gguf_name else out


# --------------------------------------------------------------------------- the base model


def _base_config(cfg: Config, fmt: str):
    """The base model's config, with a clear error (as training gives) when it is not in the cache."""
    from transformers import AutoConfig

    from qwen_daemon.train.builtin import resolve_model_path
    from qwen_daemon.train.model import _from_pretrained

    base = cfg.model.name_or_path
    config = _from_pretrained(AutoConfig.from_pretrained, resolve_model_path(base), "base model's config")
    if getattr(config, "quantization_config", None):
        raise ExportError(f"{base} is stored quantised (quantization_config in its config.json); the merge needs "
                          "the original bf16 weights: set model.name_or_path in the run's config.yaml to the "
                          "unquantised model the adapter was trained on (e.g. Qwen/Qwen3-4B-Thinking-2507)")
    if fmt == "gguf" and config.model_type != "qwen3":
        raise ExportError(f"{base} is a {config.model_type!r} model; the GGUF export writes Qwen3 (dense) models only")
    return config


def _count_parameters(config) -> int:
    """The model's parameter count, from an empty model on the meta device (tied embeddings once)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


# --------------------------------------------------------------------------- merge and check


def merge(cfg: Config, adapter: Path, out: Path, device=None, check: bool = True) -> str | None:
    """Save the bf16 base with the adapter merged into `out`, with the tokenizer; then check it
    against base + adapter unless told not to. Returns the check's one-line result."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from qwen_daemon.train.builtin import resolve_model_path
    from qwen_daemon.train.model import _from_pretrained, load_tokenizer

    device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = resolve_model_path(cfg.model.name_or_path)
    log.info("merging %s into %s (bf16, on %s)", adapter, cfg.model.name_or_path, device)
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, base, "base model", dtype=torch.bfloat16,
                             device_map={"": device})
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()  # one bf16 rounding per weight
    merged.config.use_cache = True
    merged.save_pretrained(str(out))  # with generation_config.json
    del merged, model
    gc.collect()  # the bf16 copy must be gone before the check loads a float32 one (4B: 8 + 16 GB)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name_or_path)
    tokenizer.save_pretrained(str(out))
    if not check:
        return None
    error, effect = check_merged(out, base, adapter, tokenizer, device)
    result = (f"merged vs base + adapter on {len(CHECK_PROMPTS)} prompts in float32: RMS logit error "
              f"{error:.3%} of the logits' spread (tolerance {MERGE_TOLERANCE:.0%}); the adapter itself moves "
              f"them by {effect:.1%}")
    log.info("%s", result)
    if error > MERGE_TOLERANCE:
        raise ExportError(f"the merged model does not reproduce base + adapter: {result}. Nothing was written; "
                          f"please report this with {adapter / 'adapter_config.json'}")
    if effect < 2 * MERGE_TOLERANCE:
        log.warning("the adapter barely changes the logits (%.1f%%): the check cannot tell the merged model "
                    "from the base model", 100 * effect)
    return result


def check_merged(merged_dir: Path, base: str, adapter: Path, tokenizer, device="cpu",
                 prompts=CHECK_PROMPTS) -> tuple[float, float]:
    """(error, effect): how far the merged model's logits are from base + adapter's, and how far the
    base model's are, at every position of the chat-formatted `prompts`; each the RMS of the
    difference relative to the RMS of base + adapter's logits, centred per position (logits are
    defined up to a constant). In float32, one model in memory at a time (4B: 16 GB)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    inputs = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                            return_dict=True, return_tensors="pt")["input_ids"] for p in prompts]

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            rows = torch.cat([model(input_ids=ids.to(device)).logits[0].float().cpu() for ids in inputs])
        return rows - rows.mean(dim=-1, keepdim=True)

    def load(path):
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, device_map={"": device}).eval()

    model = PeftModel.from_pretrained(load(base), str(adapter)).eval()
    reference = logits(model)
    with model.disable_adapter():
        base_only = logits(model)
    del model
    gc.collect()
    candidate = logits(load(merged_dir))
    spread = reference.pow(2).mean().sqrt()
    return (((candidate - reference).pow(2).mean().sqrt() / spread).item(),
            ((base_only - reference).pow(2).mean().sqrt() / spread).item())


# --------------------------------------------------------------------------- GGUF


def write_gguf(merged_dir: Path, path: Path, quant: str = "f16", *, name: str | None = None) -> Path:
    """Convert a merged Qwen3 model directory (safetensors + tokenizer) to one GGUF file, f16 or
    q8_0, one tensor in memory at a time. The metadata is what llama.cpp's convert_hf_to_gguf.py
    writes for Qwen3."""
    import gguf
    import numpy as np

    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    weight_type = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[quant]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN3])
    try:
        _add_metadata(writer, config, quant, name or merged_dir.name)
        _add_vocabulary(writer, merged_dir, config["vocab_size"])
        plan = _tensor_plan(merged_dir, config, weight_type)
        for gguf_name, (_, _, shape, qtype) in plan.items():
            dtype = np.dtype({gguf.GGMLQuantizationType.F32: np.float32,
                              gguf.GGMLQuantizationType.F16: np.float16}.get(qtype, np.uint8))
            byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype) if dtype == np.uint8 else shape
            writer.add_tensor_info(gguf_name, byte_shape, dtype, int(np.prod(byte_shape)) * dtype.itemsize,
                                   raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, (file, hf_name, _, qtype) in plan.items():
            writer.write_tensor_data(_converted(file, hf_name, qtype))
    finally:
        writer.close()
    return path


def _add_metadata(writer, config: dict, quant: str, name: str) -> None:
    import gguf

    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ExportError(f"config.json: RoPE scaling {rope!r} is not supported by the GGUF export (default only)")
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(head_dim)  # Qwen3-4B: 128, not hidden / heads = 80
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))


def _add_vocabulary(writer, merged_dir: Path, vocab_size: int) -> None:
    """Qwen's byte-level BPE: every id up to the (padded) embedding size with its type, the merges,
    bos/eos/pad, no BOS added, and the chat template."""
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        token = by_id.get(i)
        tokens.append(token or f"[PAD{i}]")  # Qwen pads the embedding past the tokenizer (151669 -> 151936)
        if token is None:
            types.append(gguf.TokenType.UNUSED)
        elif i not in added:
            types.append(gguf.TokenType.NORMAL)
        elif added[i].special or (token.startswith("<|") and token.endswith("|>")):
            types.append(gguf.TokenType.CONTROL)
        else:  # <think>, </think>, <tool_call>, ...: text the model writes, matched before BPE
            types.append(gguf.TokenType.USER_DEFINED)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # llama.cpp's name for the Qwen2/2.5/3 pre-tokeniser regex
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(merged_dir, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError(f"{merged_dir / 'tokenizer.json'} has no BPE merges; the GGUF could not tokenise")
    special.add_special_token["bos"] = False  # Qwen never prepends a BOS token
    special.chat_template = special.chat_template or tokenizer.chat_template
    special.add_to_gguf(writer, quiet=True)


def _tensor_plan(merged_dir: Path, config: dict, weight_type) -> dict:
    """GGUF name -> (safetensors file, HF name, shape, GGML type) of every tensor to write. Norms and
    other 1-D tensors stay float32 (llama.cpp computes them so); matrices get `weight_type`, or f16
    where a row does not split into whole quantisation blocks."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, config["num_hidden_layers"])
    block, _ = gguf.GGML_QUANT_SIZES[weight_type]
    plan = {}
    for file in sorted(merged_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for hf_name in f.keys():
                if hf_name == "lm_head.weight" and config.get("tie_word_embeddings"):
                    continue  # llama.cpp uses token_embd as the output matrix when there is no output.weight
                gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise ExportError(f"{file}: tensor {hf_name!r} has no place in a GGUF qwen3 model")
                shape = tuple(f.get_slice(hf_name).get_shape())
                qtype = (gguf.GGMLQuantizationType.F32 if len(shape) == 1 else
                         weight_type if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16)
                plan[gguf_name] = (file, hf_name, shape, qtype)
    if "token_embd.weight" not in plan:
        raise ExportError(f"{merged_dir}: no safetensors weights with the embedding (model.embed_tokens.weight)")
    return plan


def _converted(file: Path, hf_name: str, qtype):
    """One tensor read from the safetensors file and converted to its GGML type, as numpy."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        tensor = f.get_tensor(hf_name).to(torch.float32)
    if qtype == gguf.GGMLQuantizationType.F32:
        return tensor.numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        data = tensor.to(torch.float16).numpy()
        if not np.isfinite(data).all():
            raise ExportError(f"{file}: {hf_name} has values beyond float16's range (65504); export it as merged")
        return data
    # gguf's numpy quantiser makes several float32 copies of its input: 4096 rows at a time keep that
    # to tens of MB for Qwen3's 151936-row embedding (q8_0 blocks lie within a row).
    rows = tensor.reshape(-1, tensor.shape[-1]).numpy()
    chunks = [gguf.quants.quantize(rows[i:i + 4096], qtype) for i in range(0, len(rows), 4096)]
    return np.concatenate(chunks).reshape(*tensor.shape[:-1], -1)


# --------------------------------------------------------------------------- q4_k_m (llama.cpp's quantiser)

# Run as `python -c _QUANTISE IN OUT Q4_K_M`, the arguments llama-quantize takes.
_QUANTISE = """\
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params)))
"""


def find_quantiser() -> list[str]:
    """The command that quantises a GGUF to q4_k_m: llama.cpp's `llama-quantize` on PATH, or a Python
    with llama-cpp-python ($QWEN_DAEMON_LLAMA_PYTHON, or this one)."""
    import importlib.util

    if shutil.which("llama-quantize"):
        return [shutil.which("llama-quantize")]
    python = os.environ.get(LLAMA_PYTHON_ENV)
    if python:
        try:
            probe = subprocess.run([python, "-c", "import llama_cpp"], capture_output=True, text=True, check=False)
            problem = probe.returncode and (probe.stderr or f"exit code {probe.returncode}")
        except OSError as e:
            problem = str(e)
        if problem:
            raise ExportError(f"{LLAMA_PYTHON_ENV}={python} cannot import llama_cpp: {problem.strip()[-300:]}")
        return [python, "-c", _QUANTISE]
    if importlib.util.find_spec("llama_cpp"):
        return [sys.executable, "-c", _QUANTISE]
    raise ExportError(
        "q4_k_m needs llama.cpp's quantiser and none was found: put llama.cpp's `llama-quantize` on PATH, or "
        f"install llama-cpp-python into a separate environment and set {LLAMA_PYTHON_ENV} to its python "
        "(uv venv /opt/llama && uv pip install --python /opt/llama/bin/python llama-cpp-python); "
        "f16 and q8_0 need neither")


def quantise(source: Path, target: Path, command: list[str]) -> Path:
    """An f16 GGUF quantised to q4_k_m by llama.cpp, in its own process (a crash in C fails the export only)."""
    done = subprocess.run([*command, str(source), str(target), "Q4_K_M"], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not target.exists():
        raise ExportError(f"llama.cpp's quantiser failed ({done.returncode}) on {source}:\n"
                          f"{(done.stderr or done.stdout)[-2000:]}")
    return target


# --------------------------------------------------------------------------- Ollama

# Our chat template (chat_template.jinja) in Ollama's Go-template syntax. Ollama hands the template
# the system prompt as .System, the conversation as .Messages (Role, Content, Thinking, ToolCalls)
# and the tools as .Tools. As in the Jinja template: reasoning is kept for the assistant turns
# after the last user message and dropped from earlier ones, tool results go into user turns, and
# the generation prompt opens <think>. One difference is Ollama's convention: a final assistant
# message is a prefix to continue, so it is left open (no <|im_end|>).
OLLAMA_TEMPLATE = """\
{{- $lastQuery := -1 }}
{{- range $i, $m := .Messages }}{{ if eq $m.Role "user" }}{{ $lastQuery = $i }}{{ end }}{{ end }}
{{- if or .System .Tools }}<|im_start|>system
{{ if .System }}{{ .System }}{{ if .Tools }}

{{ end }}{{ end }}
{{- if .Tools }}# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{{- range .Tools }}
{"type": "function", "function": {{ .Function }}}
{{- end }}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- range $i, $m := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq $m.Role "user" }}<|im_start|>user
{{ $m.Content }}<|im_end|>
{{ else if eq $m.Role "assistant" }}<|im_start|>assistant
{{ if and (gt $i $lastQuery) (or $last $m.Thinking) }}<think>
{{ $m.Thinking }}
</think>

{{ end }}{{ $m.Content }}
{{- range $j, $call := $m.ToolCalls }}{{ if or $m.Content $j }}
{{ end }}<tool_call>
{"name": "{{ $call.Function.Name }}", "arguments": {{ $call.Function.Arguments }}}
</tool_call>
{{- end }}{{ if not $last }}<|im_end|>
{{ end }}
{{- else if eq $m.Role "tool" }}<|im_start|>user
<tool_response>
{{ $m.Content }}
</tool_response><|im_end|>
{{ end }}
{{- if and $last (ne $m.Role "assistant") }}<|im_start|>assistant
<think>
{{ end }}
{{- end }}"""


def write_modelfile(path: Path, gguf_name: str, merged_dir: Path) -> Path:
    """An Ollama Modelfile for the .gguf next to it: our chat template, the model's sampling
    (Qwen3-Thinking's where it has none), the context and the stop tokens."""
    config = json.loads((merged_dir / "config.json").read_text(encoding="utf-8"))
    # Thinking models write long reasoning; Ollama's default context (a few thousand tokens) cuts it.
    num_ctx = min(config["max_position_embeddings"], 32768)
    name = Path(gguf_name).stem
    lines = [f"# ollama create {name} -f Modelfile && ollama run {name}", f"FROM ./{gguf_name}",
             f'TEMPLATE """{OLLAMA_TEMPLATE}"""',
             *(f"PARAMETER {k} {v}" for k, v in sampling(merged_dir).items()), f"PARAMETER num_ctx {num_ctx}",
             *(f'PARAMETER stop "{t}"' for t in STOP_TOKENS)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def sampling(model_dir: Path) -> dict:
    """temperature, top_p, top_k from the model's generation_config.json, Qwen3-Thinking's where unset."""
    try:
        generation = json.loads((model_dir / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        generation = {}
    return {k: generation.get(k) or v for k, v in QWEN3_SAMPLING.items()}


# --------------------------------------------------------------------------- model card


def model_card(cfg: Config, run_dir: Path, adapter: Path, merged_dir: Path, checked: str | None,
               gguf_name: str | None) -> str:
    """README.md: what the model is, how it was trained and scored, and how to run it."""
    from qwen_daemon.train.checkpoint import checkpoint_step, list_checkpoints
    from qwen_daemon.train.evaluate import format_table

    checkpoints = [adapter] if adapter.name != "final" else list_checkpoints(run_dir)[-1:]  # final: the last one
    lora, train = cfg.lora, cfg.train
    targets = lora.target_modules if isinstance(lora.target_modules, str) else ", ".join(lora.target_modules)
    variants = (", rsLoRA" if lora.use_rslora else "") + (", DoRA" if lora.use_dora else "")
    converted = f" and converted to GGUF: `{gguf_name}`." if gguf_name else "."
    lines = [
        "---", f"base_model: {cfg.model.name_or_path}", f"library_name: {'gguf' if gguf_name else 'transformers'}",
        "tags: [qwen3, lora, qwen-daemon]", "---", "", f"# {run_dir.name}-{adapter.name}", "",
        (f"`{cfg.model.name_or_path}` fine-tuned with LoRA by qwen-daemon (run `{run_dir.name}`, adapter "
         f"`{adapter.name}`), the adapter merged into the unquantised bf16 base weights{converted}"), "",
        f"- data: {', '.join(f'`{p}`' for p in cfg.data.paths)}",
        (f"- steps: {checkpoint_step(checkpoints[0]) if checkpoints else 'unknown'} (micro-batch "
         f"{train.micro_batch_size} x accumulation {train.grad_accum} per process, "
         f"learning rate {train.learning_rate:g})"),
        f"- LoRA: r {lora.r}, alpha {lora.alpha:g}, dropout {lora.dropout:g}, targets {targets}{variants}",
    ]
    if checked:
        lines.append(f"- check: {checked}")
    try:
        summary = json.loads((run_dir / "eval" / "summary.json").read_text(encoding="utf-8"))
        lines += ["", "## Evaluation", "", "```", format_table(summary), "```"]
    except (OSError, ValueError, KeyError):
        pass
    if gguf_name:
        s = sampling(merged_dir)  # llama.cpp does not read generation_config.json
        stem = Path(gguf_name).stem
        usage = [f"llama-cli -m {gguf_name} --jinja          # the chat template is in the file",
                 (f"llama-server -m {gguf_name} --jinja --temp {s['temperature']} --top-p {s['top_p']} "
                  f"--top-k {s['top_k']}"),
                 f"ollama create {stem} -f Modelfile && ollama run {stem}"]
    else:
        usage = ["vllm serve . --reasoning-parser deepseek_r1   # the thinking comes back as reasoning_content",
                 '# transformers: AutoModelForCausalLM.from_pretrained("."), AutoTokenizer.from_pretrained(".")']
    return "\n".join(lines + ["", "## Use", "", "From this directory:", "", "```sh", *usage, "```", ""])


# --------------------------------------------------------------------------- writing safely


@contextlib.contextmanager
def _staging(out: Path, force: bool):
    """`with _staging(out, force) as tmp:` the export built whole or not at all beside `out`
    (runs.atomic_directory: leftovers of a killed export removed first). An existing `out` is
    refused unless `force`, and then replaced only once the new export is complete."""
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or --out another directory")
    with runs.atomic_directory(out) as tmp:
        yield tmp


def _check_disk(directory: Path, need: float) -> None:
    need = int(need * 1.05) + DISK_SLACK_BYTES
    free = shutil.disk_usage(directory).free
    if free < need:
        raise ExportError(f"not enough disk space in {directory}: the export needs about {need / 2**30:.1f} GiB, "
                          f"{free / 2**30:.1f} GiB are free; free some space or pass --out on another disk")
