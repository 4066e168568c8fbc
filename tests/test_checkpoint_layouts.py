"""Model directories as people have them (an audit of checkpoint layouts, /tmp/ckpt16): a config.json
that does not match the weights, sharded weights without their index or with a shard missing, an
extra copy of the weights beside the model's, and the lab's matrices in layer order."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_lm import save_tiny_model

from lorakit import models
from lorakit.analysis import lowrank, weights


def test_weights_of_another_model_are_refused_not_initialised_at_random(tmp_path):
    llama = save_tiny_model(tmp_path / "llama")
    gpt2 = save_tiny_model(tmp_path / "gpt2", kind="gpt2")
    for f in llama.glob("*.safetensors"):
        f.unlink()
    for f in gpt2.glob("*.safetensors"):  # Llama's config.json, GPT-2's weights
        (llama / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ValueError, match=r"could not be loaded: its weight files lack \d+ of the model's tensors "
                                         r"\(lm_head.weight, model.*initialised at random"):
        models.load_model_and_tokenizer(llama)


def test_a_gguf_file_whose_tensors_the_reader_leaves_out_is_refused(tmp_path, monkeypatch):
    """transformers' GGUF reader initialises the tensors it finds no name for at random, as it does
    for a directory (here its answer is stood in for: the loading info it gives lists them)."""
    import transformers
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    calls = []

    def from_pretrained(path, **kwargs):
        calls.append(kwargs)
        info = {"missing_keys": ["model.layers.0.mlp.up_proj.weight", "model.norm.weight"]}
        return (tiny_llama_lm(tok), info) if kwargs.get("output_loading_info") else tiny_llama_lm(tok)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match=r"model.gguf lacks 2 of the model's tensors \(model.layers.0.mlp.up_proj.weight, "
                                         r"model.norm.weight\), which would be initialised at random: transformers' GGUF"):
        models.load_model_and_tokenizer(gguf)
    assert calls and all(c.get("gguf_file") == "model.gguf" for c in calls)


def test_a_tied_model_has_no_missing_weights(tmp_path):
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_llama_lm(tok)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert "lm_head.weight" not in load_file(tmp_path / "m" / "model.safetensors")
    loaded, _ = models.load_model_and_tokenizer(tmp_path / "m")
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()


def _sharded(tmp_path):
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    directory = tmp_path / "sharded"
    tiny_llama_lm(tiny_tokenizer()).save_pretrained(directory, max_shard_size="20KB")
    shards = sorted(directory.glob("model-*.safetensors"))
    assert len(shards) >= 3 and (directory / "model.safetensors.index.json").is_file()
    return directory, shards


def test_shards_without_their_index_are_read_only_when_all_are_there(tmp_path):
    directory, shards = _sharded(tmp_path)
    whole = weights.load_state_dict(directory)
    (directory / "model.safetensors.index.json").unlink()
    assert weights.load_state_dict(directory).keys() == whole.keys()  # all shards: the same tensors
    shards[1].unlink()
    with pytest.raises(FileNotFoundError, match=f"lacks 1 of its {len(shards)} weight shards: {shards[1].name}"):
        weights.load_state_dict(directory)


def test_an_extra_copy_beside_the_model_s_weights_is_not_read_over_them(tmp_path):
    directory = save_tiny_model(tmp_path / "m")
    state = load_file(directory / "model.safetensors")
    save_file({k: v + 1 for k, v in state.items()}, str(directory / "model_ema.safetensors"))
    read = weights.load_state_dict(directory)
    assert all(torch.equal(read[k], state[k]) for k in state)  # model.safetensors, as transformers loads
    directory2, shards = _sharded(tmp_path)  # a model.safetensors left beside a sharded save: what transformers loads
    save_file(state, str(directory2 / "model.safetensors"))
    assert weights.safetensors_files(directory2) == [directory2 / "model.safetensors"]
    (directory / "model.safetensors").rename(directory / "weights_a.safetensors")
    with pytest.raises(ValueError, match="several safetensors files and neither model.safetensors nor an index"):
        weights.load_state_dict(directory)


def test_the_lab_shows_the_first_matrices_in_layer_order_whatever_the_files(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=12,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "plain")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    pattern = r"q_proj"
    plain, n = lowrank.select_weights_counted(str(tmp_path / "plain"), pattern, limit=11)
    sharded, _ = lowrank.select_weights_counted(str(tmp_path / "sharded"), pattern, limit=11)
    assert n == 12 and list(plain) == list(sharded) == [f"model.layers.{i}.self_attn.q_proj" for i in range(11)]
    assert json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())["weight_map"]
