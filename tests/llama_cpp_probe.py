"""Run a GGUF file in llama.cpp (llama-cpp-python) and save what it computes, for test_export.py.

    python llama_cpp_probe.py REQUEST.json OUT.npz

Needs only llama_cpp and numpy, so that it also runs under another interpreter (the one
$QWEN_DAEMON_LLAMA_PYTHON names) than the project's. The request holds "gguf" (path), "prompts"
(token id lists), "greedy" (how many tokens to generate greedily after each prompt) and "texts"
(strings to tokenise, special tokens parsed). The .npz holds, for prompt i, `logits_i` (one row per
prompt position) and `greedy_i`, for text j `tokens_j`, and `chat_template` from the file's metadata.
"""

import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama


def main(request_path: str, out_path: str) -> None:
    request = json.loads(Path(request_path).read_text(encoding="utf-8"))
    llm = Llama(model_path=request["gguf"], n_ctx=512, n_batch=512, logits_all=True, n_threads=2,
                seed=0, verbose=False)
    result = {"chat_template": np.array(llm.metadata.get("tokenizer.chat_template", ""))}
    for i, prompt in enumerate(request["prompts"]):
        llm.reset()
        llm.eval(prompt)
        result[f"logits_{i}"] = np.array(llm.scores[:len(prompt)], dtype=np.float32)
        greedy = []
        for _ in range(request["greedy"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            greedy.append(token)
            llm.eval([token])
        result[f"greedy_{i}"] = np.array(greedy, dtype=np.int64)
    for j, text in enumerate(request["texts"]):
        result[f"tokens_{j}"] = np.array(llm.tokenize(text.encode("utf-8"), add_bos=False, special=True), dtype=np.int64)
    np.savez(out_path, **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
