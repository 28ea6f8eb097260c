"""Exporting a run's model: merged safetensors checked against base + adapter, GGUF tensors and
metadata, the Ollama template rendered by Go, how an export is written (staging, --force, disk),
the CLI; and (slow) the GGUF read back by gguf's reader and run in llama.cpp itself."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_run_dir
from qwen_daemon import cli
from qwen_daemon.train import export
from qwen_daemon.train.builtin import TINY_MODEL_NAME, resolve_model_path
from qwen_daemon.train.checkpoint import TrainState, save_checkpoint
from qwen_daemon.train.export import ExportError, check_merged, export_run, write_gguf
from qwen_daemon.train.model import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
STEP = 12


def make_base(root: Path) -> Path:
    """The tiny Qwen3 in bf16 with its RMSNorm weights (all ones when initialised) made distinct,
    so that a norm written under the wrong name changes the model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(TINY_MODEL_NAME), dtype=torch.bfloat16)
    torch.manual_seed(2)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data = (1 + 0.2 * torch.randn_like(p, dtype=torch.float32)).to(p.dtype)
    model.save_pretrained(root / "base")
    load_tokenizer(TINY_MODEL_NAME).save_pretrained(root / "base")
    return root / "base"


def make_finished_run(root: Path) -> Path:
    """A run of the tiny model as training leaves it, without the training: config.yaml, final/
    (adapter and tokenizer), the last checkpoint and an eval summary. The adapter's B matrices are
    random, as after training (a fresh adapter's are zero and would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = make_base(root)
    run = make_run_dir(root, f"model.name_or_path={base_dir}", "lora.r=4", "lora.alpha=8")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    model.save_pretrained(run / "final")
    load_tokenizer(TINY_MODEL_NAME).save_pretrained(run / "final")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    save_checkpoint(run, TrainState(step=STEP), model, optimizer,
                    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), keep_last=2)
    (run / "eval").mkdir()
    (run / "eval" / "summary.json").write_text(json.dumps({
        "run": run.name, "checkpoint": "final", "split": "test", "records": 5, "loss": {"base": 3.25, "tuned": 1.5},
        "overall": {"base": {"rouge_l_chars": 0.125}, "tuned": {"rouge_l_chars": 0.375}},
        "file": "eval/final-test.jsonl"}))
    return run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_finished_run(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def merged(run):
    """The run's final adapter exported as a merged model, with its check."""
    return export_run(run, "merged")


@pytest.fixture
def quick_merge(monkeypatch):
    """Stands in for the merge where what is tested is how the export is written, not what."""
    def write(cfg, adapter, out, device, check):
        out.mkdir(exist_ok=True)
        (out / "model.safetensors").write_text(f"merged {adapter.name}")

    monkeypatch.setattr(export, "merge", write)


@pytest.fixture
def copied_merge(monkeypatch, merged):
    """Stands in for the merge with a copy of the one made already."""
    monkeypatch.setattr(export, "merge", lambda cfg, adapter, out, device, check: shutil.copytree(merged, out) and None)


# --------------------------------------------------------------------------- merged


def test_the_merge_is_checked_and_the_check_would_see_a_wrong_merge(run, merged):
    card = (merged / "README.md").read_text()
    error = float(card.split("RMS logit error ")[1].split("%")[0]) / 100
    assert error < export.MERGE_TOLERANCE / 4
    # The unmerged base model, presented as the merge, fails: the adapter moves the logits far more
    # than the tolerance.
    base = run.parent / "base"
    wrong, effect = check_merged(base, str(base), run / "final", load_tokenizer(str(merged)),
                                 prompts=export.CHECK_PROMPTS[:1])
    assert wrong == pytest.approx(effect) and wrong > 10 * export.MERGE_TOLERANCE


def test_merged_weights_are_the_bf16_base_plus_the_lora_delta(run, merged):
    """Merged into the unquantised bf16 weights: W + (alpha/r) B A, rounded once to bf16 (an NF4
    base would be off by several percent of each weight)."""
    from safetensors.torch import load_file

    base = load_file(str(run.parent / "base" / "model.safetensors"))
    adapter = load_file(str(run / "final" / "adapter_model.safetensors"))
    weights = load_file(str(merged / "model.safetensors"))
    prefix = "base_model.model.model.layers.1.mlp.down_proj"
    delta = (8 / 4) * adapter[f"{prefix}.lora_B.weight"] @ adapter[f"{prefix}.lora_A.weight"]
    got = weights["model.layers.1.mlp.down_proj.weight"]
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, (base["model.layers.1.mlp.down_proj.weight"].float() + delta).to(torch.bfloat16))
    assert delta.abs().max() > 0.01  # the delta is not lost in the rounding
    config = json.loads((merged / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"


def test_merged_directory_has_tokenizer_with_template_generation_config_and_card(run, merged):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    assert tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                         add_generation_prompt=True).endswith("<|im_start|>assistant\n<think>\n")
    generation = json.loads((merged / "generation_config.json").read_text())
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 20)
    assert merged == run / "export" / "final-merged"
    card = (merged / "README.md").read_text()
    for expected in (f"base_model: {run.parent / 'base'}", str(run.parent / "qa.jsonl"), f"- steps: {STEP} ",
                     "r 4, alpha 8", "loss", "1.500", "rouge_l_chars", "vllm serve .", "- check: merged vs base"):
        assert expected in card, expected


def test_a_checkpoint_exports_too_and_a_missing_one_is_named(run, tmp_path, quick_merge):
    out = export_run(run, "merged", STEP, out=tmp_path / "ckpt")
    assert (out / "model.safetensors").read_text() == f"merged checkpoint-{STEP}"
    assert f"adapter `checkpoint-{STEP}`" in (out / "README.md").read_text()
    with pytest.raises(ExportError, match=f"checkpoint-99: no adapter there.*checkpoints: checkpoint-{STEP}"):
        export_run(run, "merged", 99, out=tmp_path / "missing")
    assert not (tmp_path / "missing").exists()


def test_wrong_arguments_are_refused_before_anything_is_written(run, tmp_path):
    with pytest.raises(ExportError, match="--quant q8_0 is for --format gguf"):
        export_run(run, "merged", quant="q8_0", out=tmp_path / "x")
    with pytest.raises(ExportError, match="unknown export format 'onnx'; choose one of merged, gguf"):
        export_run(run, "onnx", out=tmp_path / "x")
    with pytest.raises(ExportError, match="unknown GGUF quantisation 'q5'; choose one of f16, q8_0, q4_k_m"):
        export_run(run, "gguf", quant="q5", out=tmp_path / "x")
    with pytest.raises(ExportError, match="not a run directory"):
        export_run(tmp_path, "gguf")
    assert list(tmp_path.iterdir()) == []


def test_a_base_model_stored_quantised_is_refused(run, tmp_path, quick_merge):
    """A pre-quantised checkpoint (say a bnb-4bit upload) as the base: its 4-bit weights are not
    the ones to merge into."""
    base = shutil.copytree(resolve_model_path(TINY_MODEL_NAME), tmp_path / "base-4bit")
    config = json.loads((base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(config))
    copy = shutil.copytree(run, tmp_path / "run")
    (copy / "config.yaml").write_text((copy / "config.yaml").read_text().replace(str(run.parent / "base"), str(base)))
    with pytest.raises(ExportError, match="is stored quantised .* needs the original bf16 weights"):
        export_run(copy, "merged", out=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_an_existing_output_directory_is_refused_unless_forced(run, tmp_path, quick_merge):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="out already exists; pass --force to replace it"):
        export_run(run, "merged", out=out)
    assert (out / "mine.txt").read_text() == "keep me"
    export_run(run, "merged", out=out, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "model.safetensors"]


def test_a_failed_export_leaves_nothing_half_written(run, tmp_path, monkeypatch, quick_merge):
    def fail(*args, **kwargs):
        raise OSError("disk unplugged")

    # Fails after the weights are written, while the model card is made.
    monkeypatch.setattr(export, "model_card", fail)
    with pytest.raises(OSError, match="disk unplugged"):
        export_run(run, "merged", out=tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # A forced re-export that fails keeps the previous export as it was.
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.safetensors").write_text("previous export")
    with pytest.raises(OSError):
        export_run(run, "merged", out=old, force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (old / "model.safetensors").read_text() == "previous export"
    # A GGUF conversion that fails, likewise.
    monkeypatch.setattr(export, "write_gguf", lambda *a, **k: (_ for _ in ()).throw(ExportError("bad tensor")))
    with pytest.raises(ExportError, match="bad tensor"):
        export_run(run, "gguf", quant="f16", out=tmp_path / "g")
    assert [p.name for p in tmp_path.iterdir()] == ["old"]


def test_a_killed_exports_leftovers_are_removed(run, tmp_path, quick_merge):
    dead = 2**31 - 2  # no such process
    for leftover in (f".tmp-out-{dead}", f".old-out-{dead}", f".tmp-out2-{dead}"):
        (tmp_path / leftover).mkdir()
        (tmp_path / leftover / "model.safetensors").write_text("half")
    (tmp_path / "out").mkdir()  # the export being replaced: the set-aside old one is not put back
    export_run(run, "merged", out=tmp_path / "out", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".tmp-out2-{dead}", "out"]  # another target's


def test_too_little_disk_space_is_refused_before_loading_anything(run, tmp_path, monkeypatch):
    free = 20 << 20
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, (10 << 30) - free, free))
    monkeypatch.setattr(export, "merge", lambda *a, **k: pytest.fail("merged despite the disk check"))
    message = (f"not enough disk space in {tmp_path}: the export needs about 0.1 GiB, 0.0 GiB are free; "
               "free some space or pass --out on another disk")
    with pytest.raises(ExportError, match=re.escape(message)):
        export_run(run, "merged", out=tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_q4_k_m_without_llama_cpp_says_what_to_install_before_merging(run, tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv(export.LLAMA_PYTHON_ENV, raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a))
    monkeypatch.setattr(export, "merge", lambda *a, **k: pytest.fail("merged without a quantiser"))
    with pytest.raises(ExportError, match=f"llama-quantize.*{export.LLAMA_PYTHON_ENV}.*f16 and q8_0 need neither"):
        export_run(run, "gguf", quant="q4_k_m", out=tmp_path / "q4")
    monkeypatch.setenv(export.LLAMA_PYTHON_ENV, str(tmp_path / "no-python"))
    with pytest.raises(ExportError, match=f"{export.LLAMA_PYTHON_ENV}=.*no-python"):
        export.find_quantiser()


# --------------------------------------------------------------------------- GGUF


def tensor_plan(merged, weight_type):
    import gguf

    qtype = getattr(gguf.GGMLQuantizationType, weight_type)
    return export._tensor_plan(merged, json.loads((merged / "config.json").read_text()), qtype)


def expected_tensors(n_layers=2):
    per_block = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm", "attn_k_norm",
                 "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    blocks = {f"blk.{b}.{t}.weight" for b in range(n_layers) for t in per_block}
    return {"token_embd.weight", "output_norm.weight"} | blocks


def test_every_tensor_gets_its_gguf_name_and_type(merged):
    import gguf

    plan = tensor_plan(merged, "Q8_0")
    assert set(plan) == expected_tensors()  # tied embeddings: no output.weight
    assert plan["blk.1.ffn_down.weight"][1:3] == ("model.layers.1.mlp.down_proj.weight", (128, 384))
    assert plan["blk.0.attn_q_norm.weight"][1] == "model.layers.0.self_attn.q_norm.weight"
    types = {name: qtype for name, (_, _, _, qtype) in plan.items()}
    assert {t for n, t in types.items() if "norm" in n} == {gguf.GGMLQuantizationType.F32}
    assert {t for n, t in types.items() if "norm" not in n} == {gguf.GGMLQuantizationType.Q8_0}


def test_f16_holds_the_bf16_weights_exactly_and_q8_0_within_half_a_step(merged):
    """bf16's 8 significant bits fit in f16's 11 (down to f16's subnormals, 2^-24); 1-D tensors
    stay float32. q8_0 rounds each weight to its block's step (max|x|/127 per 32 weights): within
    half a step, plus the f16 rounding of the scale."""
    import gguf
    from safetensors.torch import load_file

    weights = load_file(str(merged / "model.safetensors"))
    plan = tensor_plan(merged, "F16")
    for gguf_name in ("token_embd.weight", "blk.0.attn_v.weight", "blk.1.attn_q_norm.weight"):
        file, hf_name, shape, qtype = plan[gguf_name]
        values = export._converted(file, hf_name, qtype)
        assert values.dtype == (np.float32 if len(shape) == 1 else np.float16)
        np.testing.assert_allclose(values.astype(np.float32), weights[hf_name].float().numpy(),
                                   rtol=2**-11, atol=2**-24)
    file, hf_name, shape, qtype = tensor_plan(merged, "Q8_0")["blk.1.ffn_down.weight"]
    weight = weights[hf_name].float().numpy()
    values = gguf.quants.dequantize(export._converted(file, hf_name, qtype), qtype).reshape(shape)
    blocks = weight.reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    error = np.abs(values.reshape(-1, 32) - blocks)
    assert (error <= step * (0.5 + 127 * 2**-11) + 1e-12).all()
    assert error.max() > 0.2 * step.max()  # it did quantise


def test_gguf_export_writes_the_file_a_modelfile_and_a_card(run, tmp_path, copied_merge):
    path = export_run(run, "gguf", out=tmp_path / "q8_0")
    out = path.parent
    assert path.name == "d-final-q8_0.gguf" and path.stat().st_size > 19_000_000  # the 19M-weight embedding, in q8_0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", path.name]
    assert path.read_bytes()[:4] == b"GGUF"
    modelfile = (out / "Modelfile").read_text()
    assert f"FROM ./{path.name}\n" in modelfile
    assert f'TEMPLATE """{export.OLLAMA_TEMPLATE}"""' in modelfile
    for line in ("PARAMETER temperature 0.6", "PARAMETER top_p 0.95", "PARAMETER top_k 20", "PARAMETER num_ctx 4096",
                 'PARAMETER stop "<|im_end|>"', 'PARAMETER stop "<|endoftext|>"'):
        assert line in modelfile.splitlines(), line
    card = (out / "README.md").read_text()
    assert f"llama-cli -m {path.name} --jinja" in card and "ollama create d-final-q8_0 -f Modelfile" in card


# --------------------------------------------------------------------------- the CLI


def test_the_cli_exports_a_run_and_says_why_it_cannot(run, tmp_path, quick_merge, capsys):
    out = tmp_path / "cli"
    assert cli.main(["export", str(run), "--format", "merged", "--checkpoint", str(STEP), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").read_text() == f"merged checkpoint-{STEP}"
    assert cli.main(["export", str(run), "--format", "merged", "--out", str(out)]) == 1
    assert "already exists; pass --force" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--format", "merged", "--out", str(out), "--force"]) == 0
    assert cli.main(["export", str(run), "--format", "merged", "--checkpoint", "99", "--out", str(out)]) == 1
    assert "checkpoint-99: no adapter there" in capsys.readouterr().err


# --------------------------------------------------------------------------- the Ollama template

GO_RENDER = """package main

import ("encoding/json"; "os"; "strings"; "text/template")

func main() {
	var in []struct { Template string; Data map[string]any }
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
	out := []string{}
	for _, r := range in {
		var b strings.Builder
		if err := template.Must(template.New("t").Parse(r.Template)).Execute(&b, r.Data); err != nil { panic(err) }
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
"""
WEATHER = {"type": "function", "function": {"name": "weather", "description": "天气",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
CONVERSATIONS = [
    [{"role": "user", "content": "SM4 是什么？"}],
    [{"role": "system", "content": "你是密码学助手。"}, {"role": "user", "content": "AES 呢？"}],
    [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2", "reasoning_content": "easy"},
     {"role": "user", "content": "2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "北京天气？"},
     {"role": "assistant", "content": "", "reasoning_content": "call the tool",
      "tool_calls": [{"function": {"name": "weather", "arguments": {"city": "北京"}}}]},
     {"role": "tool", "content": "晴, 25°C"}],
]


def as_ollama(messages, tools):
    """What Ollama hands a template: .System, .Messages (Role, Content, Thinking, ToolCalls), .Tools."""
    def message(m):
        calls = [{"Function": {"Name": c["function"]["name"],
                               "Arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
                 for c in m.get("tool_calls", [])]
        return {"Role": m["role"], "Content": m["content"], "Thinking": m.get("reasoning_content", ""), "ToolCalls": calls}

    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    return {"System": system, "Messages": [message(m) for m in messages],
            "Tools": [{"Function": json.dumps(t["function"], ensure_ascii=False)} for t in tools]}


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go's text/template (apt-get install golang-go)")
def test_ollama_template_renders_as_the_chat_template_does(run, tmp_path):
    """Go's text/template (Ollama's template engine) renders the Modelfile's template exactly as
    transformers renders chat_template.jinja, with and without tools."""
    tokenizer = load_tokenizer(str(run / "final"))
    cases = [(messages, tools) for tools in ([], [WEATHER]) for messages in CONVERSATIONS]
    (tmp_path / "render.go").write_text(GO_RENDER)
    request = json.dumps([{"Template": export.OLLAMA_TEMPLATE, "Data": as_ollama(m, t)} for m, t in cases])
    env = {**os.environ, "GOCACHE": str(REPO_ROOT / ".cache" / "go-build"), "GOFLAGS": "-mod=mod"}
    rendered = json.loads(subprocess.run(["go", "run", str(tmp_path / "render.go")], input=request, capture_output=True,
                                         text=True, check=True, env=env, cwd=tmp_path).stdout)
    for (messages, tools), got in zip(cases, rendered, strict=True):
        assert got == tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                    add_generation_prompt=True), (messages, tools)


# --------------------------------------------------------------------------- slow: gguf's reader, llama.cpp


@pytest.fixture(scope="module")
def ggufs(merged, tmp_path_factory):
    """The merged model written as f16 and as q8_0 GGUF."""
    out = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(merged, out / f"tiny-{q}.gguf", q, name="tiny-final") for q in ("f16", "q8_0")}


def field(reader, key):
    return reader.fields[key].contents()


@pytest.mark.slow
def test_gguf_reads_back_with_qwen3_hyperparameters_vocabulary_and_tensors(ggufs, merged):
    """What llama.cpp's qwen3 loader reads, through gguf's own reader (it parses the 300,000
    vocabulary strings in ~20 s)."""
    import gguf
    from transformers import AutoTokenizer

    reader = gguf.GGUFReader(ggufs["q8_0"])
    arch = "qwen3"
    assert field(reader, "general.architecture") == arch
    expected = {"block_count": 2, "context_length": 4096, "embedding_length": 128, "feed_forward_length": 384,
                "attention.head_count": 4, "attention.head_count_kv": 2, "attention.key_length": 32,
                "attention.value_length": 32, "rope.freq_base": 1e6, "attention.layer_norm_rms_epsilon": 1e-6}
    for key, value in expected.items():
        assert field(reader, f"{arch}.{key}") == pytest.approx(value), key
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert field(reader, "general.name") == "tiny-final"

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert (field(reader, "tokenizer.ggml.model"), field(reader, "tokenizer.ggml.pre")) == ("gpt2", "qwen2")
    assert len(tokens) == len(types) == 151936  # the embedding's rows, past the tokenizer's 151669
    assert tokens[100] == tokenizer.convert_ids_to_tokens(100) and tokens[151644] == "<|im_start|>"
    assert types[100] == gguf.TokenType.NORMAL
    assert types[151644] == types[151645] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("<think>")] == gguf.TokenType.USER_DEFINED
    assert tokens[151700] == "[PAD151700]" and types[151700] == gguf.TokenType.UNUSED
    assert len(field(reader, "tokenizer.ggml.merges")) == 151387
    ids = {k: field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    assert ids == {"bos": 151643, "eos": 151645, "padding": 151643}
    assert field(reader, "tokenizer.ggml.add_bos_token") == False  # noqa: E712 - a numpy bool
    assert field(reader, "tokenizer.chat_template") == tokenizer.chat_template

    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == expected_tensors()
    assert list(tensors["token_embd.weight"].shape) == [128, 151936]  # GGML order: columns first
    assert list(tensors["blk.0.attn_q.weight"].shape) == [128, 4 * 32]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [128, 2 * 32]
    assert list(tensors["blk.1.ffn_down.weight"].shape) == [384, 128]
    assert tensors["blk.0.attn_q_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert list(tensors["blk.0.attn_q_norm.weight"].shape) == [32]


PROBE_TEXTS = ["SM4 与 AES 的分组长度都是 128 位。", "def f(x):\n    return x + 1\n", "Emoji 🙂👍🏽 and  spaces\t\n\n",
               "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n<think>\n嗯</think>\n\n好"]


def llama_python() -> str:
    """The interpreter that has llama_cpp: $QWEN_DAEMON_LLAMA_PYTHON, or this one."""
    other = os.environ.get(export.LLAMA_PYTHON_ENV)
    if other:
        return other
    pytest.importorskip("llama_cpp")
    return sys.executable


def run_in_llama_cpp(python, gguf_path, prompts, tmp_path, greedy=8):
    request = tmp_path / f"{Path(gguf_path).stem}.json"
    request.write_text(json.dumps({"gguf": str(gguf_path), "prompts": prompts, "greedy": greedy, "texts": PROBE_TEXTS}))
    out = tmp_path / f"{Path(gguf_path).stem}.npz"
    subprocess.run([python, str(Path(__file__).with_name("llama_cpp_probe.py")), str(request), str(out)], check=True)
    return dict(np.load(out))


def hf_reference(merged, prompts, greedy=8):
    """The merged model's logits at every prompt position and its greedy continuation, in float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    logits, tokens = [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits.append(model(input_ids=ids).logits[0].numpy())
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=greedy,
                                 do_sample=False, min_new_tokens=greedy)
            tokens.append(out[0, len(prompt):].tolist())
    return logits, tokens


def relative_error(got, want):
    """RMS of the centred logit difference over the centred logits' RMS (as MergeCheck measures)."""
    def centred(x):
        return x - x.mean(axis=-1, keepdims=True)

    return float(np.sqrt((centred(got - want) ** 2).mean() / (centred(want) ** 2).mean()))


@pytest.mark.slow
def test_llama_cpp_runs_the_gguf_like_transformers_runs_the_merged_model(run, merged, ggufs, tmp_path):
    """llama.cpp itself (not our reader) loads each file: tokenises exactly as the HF tokenizer,
    carries the chat template, and computes the merged model's logits and greedy tokens.

    Thresholds, on the tiny random model, where the logits' spread is the unit (measured here:
    f16 0.05-0.07 % RMS error, correlation 1.000000; q8_0 1.7-1.9 %, 0.99985; greedy tokens all
    equal for both):
    - f16: the weights are exact (bf16 fits in f16), but llama.cpp's CPU matmul rounds the
      activations to f16 (2^-11 relative) and sums in another order: RMS error under 0.5 %,
      correlation above 0.9999, and the greedy tokens all equal.
    - q8_0: every 32 weights share a scale of max/127 (rounding error ~0.5 % of their RMS) and
      the activations are quantised the same way before each matmul, over 14 matmuls and the
      tied output matrix: RMS error under 5 %, correlation above 0.999; the first greedy token
      of each prompt equal and at least 3 in 4 of all of them (near-ties may flip).
    A wrong tensor layout, a missing norm, a wrong head dim or RoPE base gives errors of order
    100 % and correlations far below these; a tokeniser difference fails the exact token lists.
    """
    from transformers import AutoTokenizer

    python = llama_python()
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"] for q in export.CHECK_PROMPTS]
    want_logits, want_greedy = hf_reference(merged, prompts)
    limits = {"f16": (0.005, 0.9999, 8), "q8_0": (0.05, 0.999, 1)}
    for quant, path in ggufs.items():
        got = run_in_llama_cpp(python, path, prompts, tmp_path)
        assert str(got["chat_template"]) == tokenizer.chat_template
        for j, text in enumerate(PROBE_TEXTS):
            assert got[f"tokens_{j}"].tolist() == tokenizer(text, add_special_tokens=False)["input_ids"], text
        max_error, min_corr, agree_first = limits[quant]
        for i, prompt in enumerate(prompts):
            logits = got[f"logits_{i}"][:, :len(tokenizer)]
            want = want_logits[i][:, :len(tokenizer)]
            error = relative_error(logits, want)
            corr = float(np.corrcoef(logits.ravel(), want.ravel())[0, 1])
            greedy = got[f"greedy_{i}"].tolist()
            print(f"{quant} prompt {i}: RMS error {100 * error:.3f} %, correlation {corr:.6f}, "
                  f"greedy {greedy} vs {want_greedy[i]}")
            assert error < max_error and corr > min_corr
            assert greedy[:agree_first] == want_greedy[i][:agree_first]
        if quant == "q8_0":
            agree = sum(a == b for i in range(len(prompts)) for a, b in zip(got[f"greedy_{i}"].tolist(), want_greedy[i]))
            assert agree >= 0.75 * 8 * len(prompts)


@pytest.mark.slow
def test_q4_k_m_is_made_by_llama_cpp_and_runs(run, merged, tmp_path, monkeypatch, copied_merge):
    """q4_k_m comes from llama.cpp's own quantiser; the file loads and tokenises in llama.cpp and
    its logits still follow the model's. On the tiny model most rows (128 wide) are not whole
    256-weight Q4_K blocks, and llama.cpp falls back to other 4-5 bit types for them; measured
    7 % RMS error and correlation 0.997: required under 15 % and above 0.99."""
    import gguf
    from transformers import AutoTokenizer

    python = llama_python()
    monkeypatch.setenv(export.LLAMA_PYTHON_ENV, python)
    path = export_run(run, "gguf", quant="q4_k_m", out=tmp_path / "q4")
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", "README.md", path.name]
    reader = gguf.GGUFReader(path)
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_K_M
    assert field(reader, "tokenizer.ggml.pre") == "qwen2"
    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": export.CHECK_PROMPTS[0]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]]
    want_logits, _ = hf_reference(merged, prompts, greedy=1)
    got = run_in_llama_cpp(python, path, prompts, tmp_path, greedy=1)
    logits, want = got["logits_0"][:, :len(tokenizer)], want_logits[0][:, :len(tokenizer)]
    corr = float(np.corrcoef(logits.ravel(), want.ravel())[0, 1])
    error = relative_error(logits, want)
    print(f"q4_k_m: RMS error {100 * error:.2f} %, correlation {corr:.5f}")
    assert error < 0.15 and corr > 0.99
