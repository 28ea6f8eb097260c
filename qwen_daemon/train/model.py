"""Loading what a config names: the tokenizer, and the 4-bit base model with LoRA adapters."""

from __future__ import annotations

import logging
import os
import types
from pathlib import Path

from qwen_daemon.train.builtin import resolve_model_path
from shared.config import Config

log = logging.getLogger(__name__)

HUB_ADVICE = (
    "  - a hub id must already be in the local Hugging Face cache when the hub is unreachable "
    "(download it first, e.g. `huggingface-cli download Qwen/Qwen3-4B-Thinking-2507`; in mainland China "
    "set HF_ENDPOINT=https://hf-mirror.com);\n"
    "  - or point model.name_or_path at a local model directory;\n"
    "  - or use builtin:tiny-qwen3 / builtin:qwen3-tokenizer (offline, for trying the pipeline)."
)


class ModelLoadError(RuntimeError):
    """The model or tokenizer cannot be loaded; the message says what to do."""


def _from_pretrained(loader, path: str, what: str, **kwargs):
    """The local cache first (an offline server must not wait for the hub's retries), then the hub."""
    try:
        return loader(path, local_files_only=True, **kwargs)
    except (OSError, ValueError):
        pass
    if os.sep in path or path.startswith(".") or Path(path).is_absolute():
        raise ModelLoadError(f"cannot load the {what} from {path!r}: no such model directory "
                             "(a local path must hold config.json and the weights)")
    try:
        return loader(path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the {what} of {path!r}: {e}\n{HUB_ADVICE}") from None


def load_tokenizer(name_or_path: str):
    """A fast tokenizer by hub id, local directory or builtin:* name, with a clear error offline."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, resolve_model_path(name_or_path), "tokenizer")
    if not tokenizer.is_fast:
        raise ModelLoadError(f"{name_or_path!r} has no fast tokenizer (tokenizer.json); the data pipeline needs one")
    if tokenizer.eos_token is None or tokenizer.chat_template is None:
        raise ModelLoadError(f"{name_or_path!r} has no chat template or eos token; use a chat model's tokenizer")
    return tokenizer


def compute_dtype(cfg: Config, device):
    """The dtype of activations and LoRA weights on this device (`model.compute_dtype`)."""
    import torch

    if cfg.model.compute_dtype != "auto":
        return getattr(torch, cfg.model.compute_dtype)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(cfg: Config, device):
    """The base model (4-bit NF4 unless switched off) with fresh LoRA adapters, ready to train."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(cfg.model.name_or_path)
    model_config = _from_pretrained(AutoConfig.from_pretrained, path, "model config")
    dtype = compute_dtype(cfg, device)
    kwargs = {"dtype": dtype, "attn_implementation": attention_implementation(cfg, device)}
    if cfg.model.load_in_4bit:
        kwargs["quantization_config"] = bnb_config(cfg, dtype)
    if device.type == "cuda":
        _check_gpu_memory(model_config, cfg, device)
        kwargs["device_map"] = {"": device.index or 0}
    model = _from_pretrained(AutoModelForCausalLM.from_pretrained, path, "model", **kwargs)
    model.config.use_cache = False  # training: a KV cache also hides packed sequences from the masks
    if cfg.model.liger_kernels and device.type == "cuda":
        apply_liger(model)

    # Not peft's prepare_model_for_kbit_training: it upcasts every non-quantised weight (the
    # 151936-row embedding included) to float32, which costs memory and speed for nothing here.
    model.requires_grad_(False)
    lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, use_rslora=cfg.lora.use_rslora,
                      use_dora=cfg.lora.use_dora, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for p in model.parameters():  # LoRA weights train in float32 for a stable optimizer state
        if p.requires_grad:
            p.data = p.data.float()
    from qwen_daemon.train.checkpointing import set_checkpointing
    from qwen_daemon.train.fused import fuse

    if cfg.model.fused_lora:
        fused = fuse(model)
        log.info("fused LoRA: %d MLPs and %d projections", fused["mlp"], fused["linear"])
    # Every layer recomputed until the memory plan (memory.py) says otherwise.
    set_checkpointing(model, None if cfg.train.grad_checkpointing else 0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log.info("model %s on %s, %s, compute %s: %d trainable of %d parameters (%.3f%%)", cfg.model.name_or_path,
             device, "4-bit " + cfg.model.quant_type if cfg.model.load_in_4bit else "unquantised",
             str(dtype).removeprefix("torch."), trainable, total, 100 * trainable / total)
    if device.type == "cuda":
        model.to(device)
    # from_pretrained returns eval mode, in which gradient checkpointing, LoRA dropout and liger's
    # logit-free loss are all off.
    model.train()
    return model


def attention_implementation(cfg: Config, device) -> str:
    """`model.attn_implementation`, with auto resolved: sdpa_varlen for packed rows on a CUDA GPU
    where torch has the varlen kernel, else sdpa."""
    from qwen_daemon.train import attention

    chosen = cfg.model.attn_implementation
    if chosen == "auto":
        chosen = "sdpa_varlen" if cfg.data.packing and device.type == "cuda" and attention.varlen_available() \
            else "sdpa"
    if chosen == attention.NAME:
        attention.register()
    return chosen


def flattened(cfg: Config, device) -> bool:
    """Whether a micro-batch is one row with the samples' boundaries (varlen attention)."""
    return attention_implementation(cfg, device) in ("sdpa_varlen", "flash_attention_2") and cfg.data.packing


def apply_liger(model) -> None:
    """liger-kernel's Triton kernels for this model instance (fused linear cross-entropy: the
    151936-wide logits are never materialised; RoPE, SwiGLU), where liger has them; RMSNorm is
    our own (own_rms_norm): liger's costs 0.2 ms of host time a call, torch's 3-5x the time its
    memory traffic takes on the GPU (docs/benchmarks.md)."""
    own_rms_norm(model)
    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as e:
        log.warning("liger-kernel is not available (%s); training without its fused kernels", e)
        return
    patch = getattr(monkey_patch, f"apply_liger_kernel_to_{model.config.model_type}", None)
    if patch is None:
        log.info("liger-kernel has no kernels for %s", model.config.model_type)
        return
    patch(model=model, rms_norm=False)
    log.info("liger-kernel: fused linear cross-entropy, RoPE and SwiGLU for %s (RMSNorm: our own)",
             model.config.model_type)


def own_rms_norm(model, kernel: bool = True) -> int:
    """Every RMSNorm of the model (Qwen3's own, or liger's patch of it) through rmsnorm.py: its
    Triton kernel on CUDA (many rows a program, launched without a Python wrapper), torch's fused
    `F.rms_norm` elsewhere or with `kernel=False`. Computes in float32 like both, with the weight
    applied after the cast back. Returns how many."""
    from torch.nn.functional import rms_norm as torch_rms_norm

    from qwen_daemon.train.rmsnorm import rms_norm

    def forward(self, hidden_states):
        return rms_norm(hidden_states, self.weight, self.variance_epsilon)

    def torch_forward(self, hidden_states):
        return torch_rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)

    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(forward if kernel else torch_forward, module)
            count += 1
    return count


def bnb_config(cfg: Config, dtype):
    from transformers import BitsAndBytesConfig

    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the user
        raise ModelLoadError(f"bitsandbytes cannot be used on this machine ({type(e).__name__}: {e}); "
                             "install a bitsandbytes build for this device, or train plain LoRA with "
                             "--set model.load_in_4bit=false") from None
    # Under FSDP the packed 4-bit weights are stored in the compute dtype (two bytes hold four
    # weights) instead of uint8: a layer's parameters are then gathered in one dtype, and no
    # dtype cast on FSDP's side can turn the packed bytes into numbers.
    storage = {"bnb_4bit_quant_storage": dtype} if cfg.launch.strategy == "fsdp" else {}
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.model.quant_type,
                              bnb_4bit_use_double_quant=cfg.model.double_quant, bnb_4bit_compute_dtype=dtype,
                              **storage)


def _check_gpu_memory(model_config, cfg: Config, device) -> None:
    """Refuse to load weights that cannot fit the free GPU memory. What training needs beyond the
    weights is measured after loading (memory.py), not guessed here."""
    import torch

    free, _total = torch.cuda.mem_get_info(device)
    h = model_config.hidden_size
    layers = model_config.num_hidden_layers
    inter = model_config.intermediate_size
    heads, kv, hd = model_config.num_attention_heads, model_config.num_key_value_heads, \
        getattr(model_config, "head_dim", None) or h // model_config.num_attention_heads
    linear = layers * (h * hd * (heads * 2 + kv * 2) + 3 * h * inter)
    embed = model_config.vocab_size * h * (1 if model_config.tie_word_embeddings else 2)
    weight_bytes = (0.56 if cfg.model.load_in_4bit else 2) * linear + 2 * embed  # NF4 + absmax
    if weight_bytes > free:
        raise ModelLoadError(
            f"not enough GPU memory on {device}: the weights alone need about {weight_bytes / 2**30:.1f} GiB and "
            f"{free / 2**30:.1f} GiB are free. Free the GPU, use model.load_in_4bit: true, or use "
            "launch.strategy: fsdp on several GPUs")
    log.info("GPU memory: the weights need about %.1f GiB, %.1f GiB free on %s", weight_bytes / 2**30,
             free / 2**30, device)
