"""The README's quick start runs as written, and its set-up commands exist in the Makefile."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_setup_commands_exist():
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.integration
def test_quick_start_runs_as_written(tmp_path, monkeypatch, capsys):
    code = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    # The counts the README quotes are the ones the code prints.
    assert "460,800" in printed and "134,975,808" in printed
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    import lorakit as lk

    assert not any(isinstance(m, lk.LoraLayer) for m in namespace["plain"].modules())
    assert any(isinstance(m, lk.LoraLayer) for m in namespace["model2"].modules())


def test_the_multi_adapter_guide_example_runs_as_written(tmp_path, monkeypatch):
    """docs/multi_adapter.md's first example, on a tiny model and tokenizer standing in for the
    embedded ones (it deleted an adapter, then used it, and gave 4 adapter names for 2 rows)."""
    import sys

    import torch

    import lorakit as lk
    import lorakit.models

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_lm import tiny_llama_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    tok.pad_token = tok.pad_token or tok.eos_token
    monkeypatch.chdir(tmp_path)
    for seed, name in enumerate(("medical", "legal", "legal-v2")):
        m = tiny_llama_lm(tok)
        torch.manual_seed(seed)
        lk.get_lora_model(m, lk.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
        lk.save_adapter(m, f"adapters/{name}")
    monkeypatch.setattr(lorakit.models, "load_model_and_tokenizer", lambda *a, **k: (tiny_llama_lm(tok), tok))
    guide = (ROOT / "docs" / "multi_adapter.md").read_text()
    code = re.search(r"```python\n(.*?)```", guide, re.S).group(1).replace("...", "pass")
    namespace: dict = {}
    exec(compile(code, "docs/multi_adapter.md", "exec"), namespace)
    assert (tmp_path / "adapters" / "mix" / "adapter_model.safetensors").is_file()
    assert sorted(namespace["model"]._lorakit.configs) == ["legal", "mix", "mix8"]
