"""Training data: JSONL formats and validation, prompt masking, batching, the bundled task."""
from __future__ import annotations

import json

import pytest
import torch

from lorakit.train import data as D
from tiny_lm import one_thread, CHAT_TEMPLATE, tiny_tokenizer, toy_records, write_jsonl


_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _labelled_tokens(tok, t: D.Tokenized) -> list[str]:
    return [tok.convert_ids_to_tokens(i) for i, lab in zip(t.input_ids, t.labels) if lab != D.IGNORE_INDEX]


# ----------------------------------------------------------------------------- formats
def test_all_four_formats_parse(tmp_path):
    lines = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
        {"prompt": "p", "completion": "c"},
        {"instruction": "do", "input": "this", "output": "done"},
        {"instruction": "do", "output": "done"},
        {"text": "some text"},
    ]
    path = write_jsonl(lines, tmp_path / "d.jsonl")
    ex = D.read_jsonl(path)
    assert [e.answer for e in ex] == ["hello", "c", "done", "done", None]
    assert ex[2].messages[0] == {"role": "user", "content": "do\n\nthis"}
    assert ex[3].messages[0] == {"role": "user", "content": "do"}
    assert ex[4].text == "some text"
    assert ex[0].prompt_messages == lines[0]["messages"][:2]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt": "p"}', "missing 'completion'"),
    ('{"prompt": "p", "completion": null}', "'completion' must be a string, got NoneType"),
    ('{"prompt": "p", "completion": ""}', "'completion' is empty"),
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "bot", "content": "hi"}]}', "role 'bot'"),
    ('{"messages": [{"role": "user"}]}', "messages[0]"),
    ('{"instruction": "x"}', "missing 'output'"),
    ('{"text": 3}', "'text' must be a string"),
    ('{"question": "q", "answer": "a"}', "unrecognised record with keys ['answer', 'question']"),
    ('{"prompt": "p", "completion": "c", "text": "t"}', "mixes formats (prompt/completion and text)"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}',
     "messages[1] (assistant) is empty"),
    ('{"prompt": "good \\ud800 film", "completion": "c"}', "'prompt' is not valid Unicode text"),
])
def test_bad_line_reports_line_number_and_problem(tmp_path, line, problem):
    good = json.dumps({"prompt": "p", "completion": "c"})
    path = tmp_path / "bad.jsonl"
    path.write_text(f"{good}\n\n{good}\n{line}\n{good}\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        D.read_jsonl(path)
    msg = str(info.value)
    assert f"{path}:4:" in msg  # blank line 2 still counts
    assert problem in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        D.read_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no records"):
        D.read_jsonl(tmp_path / "empty.jsonl")


def test_byte_order_mark_on_the_first_line_is_skipped(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_text('\ufeff{"prompt": "p", "completion": "c"}\n{"text": "t"}\n', encoding="utf-8")
    assert [e.answer for e in D.read_jsonl(path)] == ["c", None]


def test_non_utf8_file_names_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    path.write_bytes(good + b"\n" + good + b"\n" + '{"prompt": "caf\u00e9", "completion": "c"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 text"):
        D.read_jsonl(path)


def test_directory_is_not_reported_as_missing(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        D.read_jsonl(tmp_path)


def test_write_jsonl_roundtrip(tmp_path):
    ex = [D.Example(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
          D.Example(text="t")]
    D.write_jsonl(ex, tmp_path / "x.jsonl")
    assert D.read_jsonl(tmp_path / "x.jsonl") == ex


# ----------------------------------------------------------------------------- masking
def test_prompt_tokens_are_masked(tok):
    ex = D.parse_record(toy_records(1)[0], "x")
    t = D.tokenize_example(tok, ex, 128)
    assert len(t.labels) == len(t.input_ids)
    # Only the answer and its end-of-turn token carry labels; the rest is -100.
    assert _labelled_tokens(tok, t) == [ex.answer, "<|im_end|>"]
    assert t.n_labels == 2
    first = t.labels.index(next(x for x in t.labels if x != D.IGNORE_INDEX))
    assert tok.convert_ids_to_tokens(t.input_ids[first - 1]) == "assistant"
    # Labels equal the input ids where they are set (the shift happens in the loss).
    assert all(lab in (D.IGNORE_INDEX, i) for i, lab in zip(t.input_ids, t.labels))


def test_multi_turn_labels_every_assistant_turn(tok):
    ex = D.Example(messages=[
        {"role": "system", "content": "very"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "good film"},
        {"role": "assistant", "content": "positive"}])
    t = D.tokenize_example(tok, ex, 128)
    assert _labelled_tokens(tok, t) == ["hello", "<|im_end|>", "positive", "<|im_end|>"]


def test_plain_text_is_fully_labelled(tok):
    t = D.tokenize_example(tok, D.Example(text="a good film"), 128)
    assert t.labels == t.input_ids and tok.convert_ids_to_tokens(t.input_ids[-1]) == "<|im_end|>"


def test_fallback_template_without_chat_template():
    tok = tiny_tokenizer(chat_template=None)
    ex = D.Example(messages=[{"role": "user", "content": "good film"}, {"role": "assistant", "content": "positive"}])
    t = D.tokenize_example(tok, ex, 128)
    assert _labelled_tokens(tok, t) == ["positive", "<|im_end|>"]
    prompt = D.encode_prompt(tok, ex.prompt_messages)
    assert t.input_ids[: len(prompt)] == prompt  # the generation prompt is a prefix of the example


def test_truncation_drops_examples_without_answer(tok, capsys):
    ex = [D.parse_record(r, "x") for r in toy_records(3)]
    short = D.parse_record({"prompt": "hi", "completion": "hello"}, "x")  # 8 tokens in all
    kept = D.tokenize_all(tok, ex + [short], 8, what="train")
    assert len(kept) == 1 and kept[0].n_labels == 2
    assert "dropped 3 examples" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_length=8"):
        D.tokenize_all(tok, ex, 8)
    assert len(D.tokenize_all(tok, ex, 128)) == 3


# ----------------------------------------------------------------------------- batching
def test_epoch_batches_cover_each_example_once_and_are_deterministic():
    lengths = [(i * 37) % 50 + 1 for i in range(203)]
    b1 = D.epoch_batches(lengths, 8, seed=3, epoch=0, chunk_batches=4)
    assert sorted(i for b in b1 for i in b) == list(range(203))
    assert all(len(b) <= 8 for b in b1)
    assert b1 == D.epoch_batches(lengths, 8, seed=3, epoch=0, chunk_batches=4)
    assert b1 != D.epoch_batches(lengths, 8, seed=3, epoch=1, chunk_batches=4)
    # Bucketing: far less padding than random batches.
    waste = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in b1)
    rand = [list(range(203))[k : k + 8] for k in range(0, 203, 8)]
    waste_rand = sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in rand)
    assert waste < waste_rand / 2


def test_collate_pads_right_and_masks():
    items = [D.Tokenized([5, 6, 7], [-100, 6, 7]), D.Tokenized([8], [8])]
    b = D.collate(items, pad_id=0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_normalize_answer():
    assert D.normalize_answer("  Positive.\n") == "positive"
    assert D.normalize_answer("NEGATIVE!") == D.normalize_answer("negative")
    assert D.normalize_answer("not  bad, really") == "not bad really"


# ----------------------------------------------------------------------------- bundled task
def test_rotten_tomatoes_split_is_fixed_balanced_and_disjoint():
    train, test = D.load_rotten_tomatoes()
    assert len(test) == 500 and len(train) > 4000
    labels = [e.answer for e in test]
    assert set(labels) == {"positive", "negative"}
    assert 0.4 < labels.count("positive") / len(labels) < 0.6
    assert {e.messages[0]["content"] for e in train}.isdisjoint({e.messages[0]["content"] for e in test})
    again_train, again_test = D.load_rotten_tomatoes()
    assert again_test == test and again_train[:10] == train[:10]
    assert test[0].messages[0]["content"].startswith("Review: ")
    assert D.SENTIMENT_QUESTION in test[0].messages[0]["content"]
    assert D.load_examples("rotten_tomatoes", "test") == test


def test_chat_template_constant_renders(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    text = D.render_chat(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")


def test_conversation_opening_with_an_assistant_message_labels_only_the_answers():
    """The template's text before a first assistant message (a default system prompt, the turn
    markup) is not an answer: only the assistant contents and their end-of-turn tokens are labels."""
    template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nvery<|im_end|>\n{% endif %}"
                + CHAT_TEMPLATE)
    tok = tiny_tokenizer(template)
    ex = D.Example(messages=[{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "positive"}])
    t = D.tokenize_example(tok, ex, 128)
    assert _labelled_tokens(tok, t) == ["hello", "<|im_end|>", "positive", "<|im_end|>"]


def test_a_json_array_file_says_data_files_are_jsonl(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}], indent=1))
    with pytest.raises(ValueError, match="JSONL: one JSON object per line"):
        D.load_examples(str(path), "train")


def test_an_answer_inside_the_templates_default_system_prompt_is_labelled_where_it_is_answered():
    # SmolLM2's template adds "... trained by Hugging Face" before a chat that opens with the
    # assistant: a search from the start labelled that system prompt for the answer "Hugging Face",
    # and a one-letter answer inside the markup ("m" in "<|im_start|>"-less text: "system")
    template = ("{% if messages[0]['role'] != 'system' %}<|im_start|>system\nvery good<|im_end|>\n{% endif %}"
                + CHAT_TEMPLATE)
    tok = tiny_tokenizer(template)
    for answer in ("very good", "good", "very"):
        ex = D.Example(messages=[{"role": "assistant", "content": answer}, {"role": "user", "content": "hi"},
                                 {"role": "assistant", "content": "positive"}])
        t = D.tokenize_example(tok, ex, 128)
        assert _labelled_tokens(tok, t) == [*answer.split(), "<|im_end|>", "positive", "<|im_end|>"], answer
        first = t.labels.index(next(x for x in t.labels if x != D.IGNORE_INDEX))
        assert first > t.input_ids.index(tok.convert_tokens_to_ids("assistant"))  # after the system prompt


def test_a_token_that_straddles_the_start_of_an_answer_is_learned():
    # a byte-level BPE merges the template's "\n" with an answer's leading "\n" ("ĊĊ"): the token
    # started before the answer, so the answer's first character was never learned
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", ":", "!", ":!",
                                         "hi", "good"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # ":!" is one token: the header's ":" and the answer's "!"
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}:{{ m['content'] }}<|im_end|>{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
    ex = D.Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "!good"}])
    t = D.tokenize_example(tok, ex, 64)
    assert _labelled_tokens(tok, t) == [":!", "good", "<|im_end|>"]
    plain = D.tokenize_example(tok, D.Example(messages=[{"role": "user", "content": "hi"},
                                                       {"role": "assistant", "content": "good"}]), 64)
    assert _labelled_tokens(tok, plain) == ["good", "<|im_end|>"]  # (":" is the header's alone)


@pytest.mark.parametrize("record, key", [
    ({"prompt": "Classify:", "input": "a dull film", "completion": "negative"}, "input"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "input": "x"}, "input"),
    ({"instruction": "i", "output": "o", "system": "be brief"}, "system"),
    ({"prompt": "p", "completion": "c", "response": "r"}, "response"),
])
def test_a_key_that_holds_text_in_another_format_is_refused_not_dropped(tmp_path, record, key):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:1: '{key}' is not part of the .* format and would be dropped"):
        D.read_jsonl(path)
    # other keys are ignored; "input" belongs to the instruction format
    path.write_text(json.dumps({"prompt": "p", "completion": "c", "id": 7, "source": "web"}) + "\n"
                    + json.dumps({"instruction": "i", "input": "x", "output": "o"}) + "\n")
    assert [e.messages[0]["content"] for e in D.read_jsonl(path)] == ["p", "i\n\nx"]


def test_the_first_bad_line_is_reported_even_when_a_later_one_is_not_utf8(tmp_path):
    # the text-mode reader decoded ahead of the parser: line 3's bad byte was reported, line 2 never
    path = tmp_path / "d.jsonl"
    good = json.dumps({"prompt": "p", "completion": "c"}).encode()
    path.write_bytes(good + b"\n{oops\n" + good[:-1] + b'\xff"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: invalid JSON"):
        D.read_jsonl(path)
    path.write_bytes(good + b"\r\n" + good + b"\r" + good[:-1] + b'\xff"}\n')  # CRLF and a bare CR end lines
    with pytest.raises(ValueError, match=rf"{path}:3: not UTF-8 text \(invalid start byte\)"):
        D.read_jsonl(path)


def test_a_one_line_json_array_says_data_files_are_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]) + "\n")
    with pytest.raises(ValueError, match=r":1: expected a JSON object, got list; data files are JSONL"):
        D.read_jsonl(path)


def test_a_pipe_is_read_like_a_file(tmp_path):
    import os
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n"),
                              daemon=True)
    writer.start()
    try:
        assert [e.answer for e in D.read_jsonl(fifo)] == ["c"]  # was "data file ... not found"
    finally:
        if writer.is_alive():  # not read: open the reading end so that the writer is not left blocked
            fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
            writer.join(timeout=10)
            os.close(fd)


def test_a_text_cut_to_one_token_is_dropped_not_scored_as_zero_loss(tok, capsys):
    # one token has a label but nothing before it to predict it from: training ran at loss 0.0,
    # grad norm 0.0, and eval printed loss 0.0000
    from lorakit.train.generate import evaluate
    from tiny_lm import tiny_llama_lm

    texts = [D.Example(text="good film"), D.Example(text="bad plot")]
    with pytest.raises(ValueError, match="no example has answer tokens within max_length=1"):
        D.tokenize_all(tok, texts, 1)
    assert len(D.tokenize_all(tok, texts, 2)) == 2  # two tokens: the second is predicted
    with pytest.raises(ValueError, match="no example has answer tokens within max_length=1"):
        evaluate(tiny_llama_lm(tok), tok, texts, 1, 2, "fp32")
    res = evaluate(tiny_llama_lm(tok), tok, texts + [D.Example(text="good film bad plot")], 2, 2, "fp32")
    assert res["n"] == 3 and res["n_dropped"] == 0 and res["n_labels"] == 3 and res["loss"] > 0


def test_eval_reports_examples_cut_away(tok):
    from lorakit.train.generate import evaluate
    from tiny_lm import tiny_llama_lm

    short = D.Example(messages=[{"role": "user", "content": "film"}, {"role": "assistant", "content": "good"}])
    long = D.Example(messages=[{"role": "user", "content": " ".join(["film"] * 40)},
                               {"role": "assistant", "content": "bad"}])
    n = len(D.tokenize_example(tok, short, 512).input_ids)
    res = evaluate(tiny_llama_lm(tok), tok, [short, long, short], n, 2, "fp32")
    assert (res["n"], res["n_dropped"], res["n_accuracy"]) == (2, 1, 2)


def test_a_local_file_named_like_the_bundled_task_is_pointed_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rotten_tomatoes").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    assert len(D.load_examples("rotten_tomatoes", "test")) == 500  # the bundled task, as documented
    assert "give ./rotten_tomatoes for it" in capsys.readouterr().err
    assert [e.answer for e in D.load_examples("./rotten_tomatoes", "train")] == ["c"]


def _chat(answer="good film"):
    return D.Example(messages=[{"role": "user", "content": "a movie"}, {"role": "assistant", "content": answer}])


def test_cutting_only_the_last_answer_token_marks_the_example_cut():
    # D2: `cut` is set when max_length removes any answer token, the very first one past the limit too
    tok = tiny_tokenizer()
    full = D.tokenize_example(tok, _chat(), 512)
    last = max(i for i, lab in enumerate(full.labels) if lab != D.IGNORE_INDEX)
    assert not full.cut
    assert not D.tokenize_example(tok, _chat(), last + 1).cut
    assert D.tokenize_example(tok, _chat(), last).cut


def test_an_answer_found_by_search_in_a_rewriting_template_learns_its_eos():
    # D6: a template whose first line depends on the last message (not prefix-stable) sends
    # _assistant_spans to its text search; the eos right after the answer is still labelled
    template = ("{{ messages[-1]['content']|length }}\n{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                "{{ m['content'] }}{% if m['role'] == 'assistant' %}<|im_end|>{% endif %}\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = tiny_tokenizer(template)
    t = D.tokenize_example(tok, _chat(), 512)
    labelled = [tok.convert_ids_to_tokens(i) for i, lab in zip(t.input_ids, t.labels) if lab != D.IGNORE_INDEX]
    assert labelled == ["good", "film", "<|im_end|>"]


class _Recorder:
    """A stand-in model: records what greedy_generate passes to generate() and returns pad tokens."""
    training = False
    config = None

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, **kw):
        self.ids, self.mask = input_ids.clone(), attention_mask.clone()
        return torch.cat([input_ids, torch.zeros(input_ids.shape[0], max_new_tokens, dtype=torch.long)], 1)


def test_greedy_generate_left_pads_and_masks_the_padding():
    # G1: a batch of prompts of different lengths is left padded and the pads get attention 0
    from lorakit.train.generate import greedy_generate

    tok = tiny_tokenizer()
    model = _Recorder()
    greedy_generate(model, tok, [[5, 6], [7, 8, 9, 10]], max_new_tokens=2, stop_ids=[3])
    assert model.mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert model.ids[0, 2:].tolist() == [5, 6] and model.ids[0, :2].tolist() == [tok.pad_token_id] * 2


def test_a_template_that_rewrites_earlier_turns_labels_each_repeated_answer_once():
    """A template whose last message gets the end-of-turn marker (so a prefix of the chat renders
    otherwise than the same turns inside the whole chat) sends the answers to the content search:
    three answers with the same word must each be found after the one before, not the first again."""
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
                "{% if loop.last %} <|im_end|>{% endif %} {% endfor %}")
    tok = tiny_tokenizer(template)
    turns = [("user", "good film"), ("assistant", "positive"), ("user", "very dull plot"),
             ("assistant", "positive"), ("user", "good"), ("assistant", "positive")]
    ex = D.Example(messages=[{"role": r, "content": c} for r, c in turns])
    t = D.tokenize_example(tok, ex, 128)
    assert _labelled_tokens(tok, t) == ["positive", "positive", "positive", "<|im_end|>"]
    labelled = [i for i, lab in enumerate(t.labels) if lab != D.IGNORE_INDEX]
    tokens = tok.convert_ids_to_tokens(t.input_ids)
    assert [tokens[i - 1] for i in labelled[:3]] == ["assistant"] * 3  # each right after its own turn's role
