"""Tests from mutation round 11 (/tmp/mutants11: 110 mutants of loraplus, quant, train/data,
ops/linear_cross_entropy, analysis/recommend, variants/dora and pissa, analysis/estimate; 75 caught,
11 equivalent): one test per surviving mutant that was a gap, each checked to fail on its mutant, and
the bug a survivor showed (the estimator read a Qwen2 config's ``attention_bias``) is tested in
test_analysis_estimate.py."""
from __future__ import annotations

import pytest
import torch

import lorakit as lk
from conftest import tiny_llama


# ---------------------------------------------------------------- loraplus
def _lp_model():
    return lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_loraplus_refuses_infinite_weight_decay():
    """lp5: `0 <= weight_decay < inf` -> `0 <= weight_decay` accepted inf (AdamW then zeroes weights)."""
    m = _lp_model()
    with pytest.raises(ValueError, match="weight_decay"):
        lk.loraplus_param_groups(m, lr=1e-3, weight_decay=float("inf"))


def test_loraplus_other_matrices_get_the_base_lr_not_b_s():
    """lp8: trainable non-LoRA matrices (modules_to_save-like) must train at lr, not ratio*lr."""
    m = _lp_model()
    m.lm_head.weight.requires_grad_(True)
    groups = {g["name"]: g for g in lk.loraplus_param_groups(m, lr=1e-3, ratio=16, weight_decay=0.1)}
    other = groups["other"]
    assert any(p is m.lm_head.weight for p in other["params"])
    assert other["lr"] == groups["lora_A"]["lr"] == 1e-3
    assert groups["lora_B"]["lr"] == pytest.approx(16 * other["lr"])
    assert other["weight_decay"] == 0.1


def test_loraplus_refuses_a_bool_learning_rate():
    """lp12: without the bool check, lr=True (an int subclass) was taken as a learning rate of 1."""
    m = _lp_model()
    with pytest.raises(ValueError, match="lr"):
        lk.loraplus_param_groups(m, lr=True)
    with pytest.raises(ValueError, match="ratio"):
        lk.loraplus_param_groups(m, lr=1e-3, ratio=True)


# ---------------------------------------------------------------- quant
def test_nf4_refuses_a_zero_scale_block_size_with_value_error():
    """q2: `scale_block_size < 1` -> `< 0` let 0 through to a ZeroDivisionError."""
    from lorakit.quant import quantize_nf4

    with pytest.raises(ValueError, match="scale_block_size"):
        quantize_nf4(torch.randn(8, 8), scale_block_size=0)


def test_nf4_skip_regex_must_match_the_whole_name_not_a_prefix():
    """q14: re.fullmatch -> re.match made a skip entry that names a parent ("model.layers.0")
    keep every layer under it in full precision."""
    from torch import nn

    from lorakit.layers.nf4_linear import LinearNF4
    from lorakit.quant import quantize_model_nf4

    m = quantize_model_nf4(tiny_llama(), skip=["lm_head", "model.layers.0"])
    assert isinstance(m.model.layers[0].self_attn.q_proj, LinearNF4)
    assert type(m.lm_head) is nn.Linear


def test_nf4_skip_given_as_one_string_is_one_name():
    """q17: a bare string skip was taken as its letters, and lm_head got quantised."""
    from torch import nn

    from lorakit.layers.nf4_linear import LinearNF4
    from lorakit.quant import quantize_model_nf4

    m = quantize_model_nf4(tiny_llama(), skip="lm_head")
    assert type(m.lm_head) is nn.Linear
    assert isinstance(m.model.layers[1].mlp.down_proj, LinearNF4)


# ---------------------------------------------------------------- train/data
def test_whitespace_only_prompt_completion_or_text_is_refused():
    """d6: `not value.strip()` -> `not value` accepted "   " as a prompt/completion/text."""
    from lorakit.train import data as D

    for obj in ({"prompt": "   ", "completion": "c"}, {"prompt": "p", "completion": " \n"},
                {"instruction": "\t", "output": "o"}, {"text": "  "}):
        with pytest.raises(ValueError, match="is empty"):
            D.parse_record(obj, "f:1")


def test_answer_is_none_when_the_chat_ends_with_a_user_turn():
    """d8: Example.answer took the last message whatever its role (a user turn became the reference)."""
    from lorakit.train import data as D

    ex = D.parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                                      {"role": "user", "content": "more"}]}, "f:1")
    assert ex.answer is None and ex.prompt_messages is None


def test_cut_is_false_when_only_unlabelled_tokens_are_truncated():
    """d14: `cut` must say answer tokens were cut, not merely that the chat was longer than max_length."""
    from tiny_lm import tiny_tokenizer

    from lorakit.train import data as D

    tok = tiny_tokenizer()
    ex = D.Example(messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "positive"},
                             {"role": "user", "content": " ".join(["film"] * 20)}])
    full = D.tokenize_example(tok, ex, max_length=10_000)
    last_label = max(i for i, x in enumerate(full.labels) if x != D.IGNORE_INDEX)
    n = last_label + 3  # keeps the whole answer, cuts the trailing user turn
    assert n < len(full.input_ids)
    t = D.tokenize_example(tok, ex, max_length=n)
    assert len(t.input_ids) == n and t.n_labels == full.n_labels
    assert t.cut is False
    assert D.tokenize_example(tok, ex, max_length=last_label).cut is True


def test_epoch_batches_order_is_shuffled_not_sorted_by_length():
    """d18: without the final shuffle, a one-chunk epoch's batches came in ascending length order."""
    from lorakit.train import data as D

    lengths = list(range(64))
    orders = []
    for seed in range(4):
        batches = D.epoch_batches(lengths, batch_size=4, seed=seed, epoch=0)
        assert sorted(i for b in batches for i in b) == list(range(64))
        firsts = [min(lengths[i] for i in b) for b in batches]
        orders.append(firsts == sorted(firsts))
    assert not all(orders)


def test_normalize_answer_splits_words_at_punctuation():
    """d26: punctuation removed without a space glued words ("well-made" -> "wellmade")."""
    from lorakit.train import data as D

    assert D.normalize_answer("well-made") == D.normalize_answer("well made") == "well made"
    assert D.normalize_answer("positive,negative") == D.normalize_answer("positive, negative")


# ---------------------------------------------------------------- linear_cross_entropy
def test_linear_cross_entropy_refuses_negative_labels_other_than_ignore_index():
    """l3: without the `min < 0` check a label of -1 indexed the last vocabulary row (Python-style
    negative indexing) and gave a finite loss instead of an error."""
    from lorakit.ops.linear_cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    labels = torch.tensor([1, -1, 3, -100])
    with pytest.raises(ValueError, match="label ids"):
        linear_cross_entropy(hidden, weight, labels)
    with pytest.raises(IndexError):  # the reference refuses it too
        torch.nn.functional.cross_entropy(hidden @ weight.T, labels, reduction="sum")


# ---------------------------------------------------------------- analysis/recommend
def test_a_bare_million_counts_parameters_as_the_message_says():
    """r2: `n < 1e6` -> `n <= 1e6` refused "1000000", which the refusal itself says is accepted."""
    from lorakit.analysis.recommend import parse_model_size

    assert parse_model_size("1000000")[0] == "7B"
    with pytest.raises(ValueError, match="1,000,000 or more"):
        parse_model_size("999999")


def _ranks_from(monkeypatch, spectra, floors=None, **kw):
    from lorakit.analysis import recommend
    from lorakit.analysis.adapter_tools import DeltaSpectra

    found = DeltaSpectra(spectra={k: torch.tensor(v, dtype=torch.float64) for k, v in spectra.items()},
                         floors=floors or {}, compared=len(spectra))
    monkeypatch.setattr(recommend, "delta_spectra_details", lambda **_: found)
    return recommend.data_driven_ranks(adapter="unused", **kw)


def test_data_driven_rank_rounds_up_to_a_power_of_two(monkeypatch):
    """r8: ceil -> floor in _pow2_at_least suggested 2 for an update that needs 3 directions."""
    out = _ranks_from(monkeypatch, {"m": [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0]}, energy=0.99)
    row = out["modules"][0]
    assert row["rank99"] == 3
    assert row["suggested"] == 4 and row["kept"] == pytest.approx(1.0) and not row["capped"]


def test_data_driven_global_rank_takes_the_smaller_on_a_tie(monkeypatch):
    """r9: the docstring's tie rule ("the smaller on a tie") was reversed."""
    out = _ranks_from(monkeypatch, {"a": [1.0, 1.0, 1.0, 1.0], "b": [1.0, 1e-9, 0.0, 0.0]}, energy=0.99)
    assert sorted(r["suggested"] for r in out["modules"]) == [1, 4]
    assert out["r"] == 1 and out["rank_pattern"] == {"a": 4} and out["alpha_pattern"] == {"a": 8}


def test_data_driven_rank_equal_to_the_need_is_not_capped(monkeypatch):
    """r11: `suggested < need` -> `<=` flagged a module whose exact need was met as capped."""
    out = _ranks_from(monkeypatch, {"m": [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}, energy=0.99)
    row = out["modules"][0]
    assert row["suggested"] == 4 and row["capped"] is False
    capped = _ranks_from(monkeypatch, {"m": [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]}, energy=0.99, cap=2)["modules"][0]
    assert capped["suggested"] == 2 and capped["capped"] is True


def test_singular_values_at_the_rounding_floor_are_not_counted(monkeypatch):
    """r12: `s > floor` -> `s >= floor` counted a value at the floor as part of the update."""
    out = _ranks_from(monkeypatch, {"m": [1.0, 0.5, 0.5]}, floors={"m": 0.5}, energy=0.99)
    assert out["modules"][0]["rank99"] == 1 and out["r"] == 1


def test_cost_does_not_flag_a_module_exactly_as_wide_as_the_rank(tmp_path):
    """r7: `rank > min(shape)` -> `>=`: a 32x32 q_proj reaches rank 32, it is not narrower than it."""
    from tiny_lm import save_tiny_model

    from lorakit.analysis.recommend import model_cost

    src = save_tiny_model(tmp_path / "m")
    assert model_cost(src, rank=32, target_modules=("q_proj",))["narrower_than_rank"] == []
    assert len(model_cost(src, rank=33, target_modules=("q_proj",))["narrower_than_rank"]) == 2


def test_data_driven_rank_never_exceeds_the_modules_own_rank(monkeypatch):
    """r15: rounding 3 up to 4 must stop at the module's max_rank 3 (a rank-3 adapter / 3-wide weight)."""
    row = _ranks_from(monkeypatch, {"m": [1.0, 1.0, 1.0]}, energy=0.99)["modules"][0]
    assert row["max_rank"] == 3 and row["suggested"] == 3 and not row["capped"]


# ---------------------------------------------------------------- variants
class _Wrap(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("shape", [(6, 4), (4, 6)])
def test_residual_init_refuses_a_rank_above_either_dimension_with_value_error(init, shape):
    """p1 (`r > smallest + 1`) / p2 (smallest = out only): r = min(out, in) + 1, and r above a
    narrower *input*, were not refused and failed later with a shape error."""
    m = _Wrap(torch.nn.Linear(*shape))
    with pytest.raises(ValueError, match="exceeds the weight's smallest dimension 4"):
        lk.get_lora_model(m, lk.LoraConfig(r=5, lora_alpha=5, target_modules=["layer"], init_lora_weights=init))


# ---------------------------------------------------------------- analysis/estimate
def test_adamw8bit_states_are_two_bytes_and_a_bit_per_trainable_param():
    """e7: 8-bit AdamW keeps two moments (1 byte each + block scales): about a quarter of fp32
    AdamW's 8 bytes per parameter, not an eighth."""
    from lorakit.analysis import estimate as E

    s = E.PRESETS["7B"]
    fp32 = E.estimate_memory(s, "lora", optimizer="adamw").to_dict()
    int8 = E.estimate_memory(s, "lora", optimizer="adamw8bit").to_dict()
    assert fp32["trainable_params"] == int8["trainable_params"] > 0
    assert fp32["optimizer_states"] == 8 * fp32["trainable_params"]  # adapters' fp32 states
    assert 2 * int8["trainable_params"] <= int8["optimizer_states"] <= 2.1 * int8["trainable_params"]


def test_qlora_activations_are_16_bit_whatever_the_precision_flag():
    """e9: QLoRA computes in 16-bit; dropping its override sized fp32 activations."""
    from lorakit.analysis import estimate as E

    s = E.PRESETS["7B"]
    a32 = E.estimate_memory(s, "qlora", precision="fp32").to_dict()["activations"]
    a16 = E.estimate_memory(s, "qlora", precision="bf16").to_dict()["activations"]
    assert a32 == a16 < E.estimate_memory(s, "lora", precision="fp32").to_dict()["activations"]
