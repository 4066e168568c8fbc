"""Tiny in-process language models, tokenizer and task for the training tests (no downloads).

The task is a toy sentiment classification: a review made of a few words answers "positive" if it
contains more words from POSITIVE than from NEGATIVE. A 2-layer model learns it in a few dozen
steps, which is enough to see the loss fall and accuracy rise.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
POSITIVE = ["good", "great", "tender", "funny", "moving", "clever"]
NEGATIVE = ["bad", "awful", "dull", "boring", "clumsy", "tedious"]
NEUTRAL = ["a", "the", "film", "movie", "plot", "actor", "story", "scene", "and", "very"]
WORDS = ["Review", ":", "Is", "this", "review", "positive", "or", "negative", "?", "Answer", "with",
         "one", "word", ".", ",", "user", "assistant", "system", "#", "hello", "hi", "text", "some"]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    """A WordLevel fast tokenizer over the toy vocabulary, with ChatML-like special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(POSITIVE + NEGATIVE + NEUTRAL + WORDS)))}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def tiny_llama_lm(tokenizer, seed: int = 0):
    """A random 2-layer Llama sized to the tokenizer (hidden 32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def tiny_gpt2_lm(tokenizer, seed: int = 0):
    """A random 2-layer GPT-2 (Conv1D layers) sized to the tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer), n_positions=128,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
    return GPT2LMHeadModel(cfg)


def toy_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` toy sentiment examples in the prompt/completion format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(["positive", "negative"])
        words = rng.sample(POSITIVE if label == "positive" else NEGATIVE, 2) + rng.sample(NEUTRAL, 3)
        rng.shuffle(words)
        out.append({"prompt": f"Review : {' '.join(words)} Is this review positive or negative ?",
                    "completion": label})
    return out


def one_thread():
    """Generator for a module fixture: run tiny models on one thread, then restore the setting.

    Tiny matmuls gain nothing from a second thread, and on a shared 2-core machine OpenMP workers
    spinning for a busy core made these tests several times slower.
    """
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_jsonl(records: list[dict], path: Path) -> Path:
    """Write records one JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def save_tiny_model(directory: Path, kind: str = "llama", seed: int = 0) -> Path:
    """Save a tiny model + tokenizer with save_pretrained (what ``--model DIR`` loads)."""
    tok = tiny_tokenizer(CHAT_TEMPLATE if kind == "llama" else None)
    model = tiny_llama_lm(tok, seed) if kind == "llama" else tiny_gpt2_lm(tok, seed)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
