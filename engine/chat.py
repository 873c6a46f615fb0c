"""The chat wraps a run can train with, in a module free of torch, so the config can check a name against the
table it will use (engine.config) without importing the model code. engine.encoding applies them."""

# llm2vec's chat wrapping (llm2vec/llm2vec.py ``prepare_for_tokenization`` and experiments/run_supervised.py): the
# text, stripped, between a head and a tail, keyed on the base model's hub id. (head, tail)
CHAT_WRAPS = {
    "llama3": ("<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>"),
    "inst": ("[INST] ", " [/INST]"),
    "gemma2": ("<bos><start_of_turn>user\n", "<end_of_turn>"),
    "qwen2": ("<|im_start|>user\n", "<|im_end|>"),
}
CHAT_WRAP_BY_BASE = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama3",
    "mistralai/Mistral-7B-Instruct-v0.2": "inst",
    "meta-llama/Llama-2-7b-chat-hf": "inst",
    "google/gemma-2-9b-it": "gemma2",
    "Qwen/Qwen2-1.5B-Instruct": "qwen2",
    "Qwen/Qwen2-7B-Instruct": "qwen2",
}
CHAT_SETTINGS = ("auto", "none", *CHAT_WRAPS)
