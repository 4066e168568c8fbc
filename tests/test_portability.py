"""What differs on Windows and macOS, simulated here on Linux (a portability audit): no ``resource``
module, no ``os.fchmod`` (Windows before Python 3.13), no ``/proc``, cmd.exe's quoting, and text
files as an editor on Windows may write them (UTF-8 with a byte-order mark)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import pytest
import torch
from conftest import tiny_llama

import lorakit as lk
from lorakit.train import generate, loop


def test_the_training_loop_imports_and_reports_memory_without_the_resource_module(monkeypatch):
    code = ("import sys; sys.modules['resource'] = None; import lorakit.train.loop as loop; "
            "import math; v = loop.peak_memory_mb(); print('ok', v > 0 or math.isnan(v))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["ok", "True"], out.stderr[-2000:]
    monkeypatch.setitem(sys.modules, "resource", None)  # Windows: psutil's peak working set
    info = types.SimpleNamespace(peak_wset=3 * 2**20)
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(Process=lambda: types.SimpleNamespace(
        memory_info=lambda: info)))
    assert loop.peak_memory_mb() == 3.0


def test_adapters_save_without_os_fchmod(monkeypatch, tmp_path):
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    monkeypatch.delattr(os, "fchmod")
    lk.save_adapter(model, tmp_path / "a")
    assert lk.LoraConfig.load(tmp_path / "a").r == 2 and (tmp_path / "a" / "adapter_model.safetensors").is_file()


def test_an_adapter_config_in_utf8_with_a_byte_order_mark_loads(tmp_path):
    model = lk.get_lora_model(tiny_llama(), lk.LoraConfig(r=2, target_modules=["q_proj"]))
    lk.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = "José/模型"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(config, ensure_ascii=False).encode("utf-8"))
    assert lk.LoraConfig.load(tmp_path / "a").base_model_name_or_path == "José/模型"
    assert generate.read_json_object(path)["base_model_name_or_path"] == "José/模型"  # (lorakit generate --adapter)
    fresh = tiny_llama()
    lk.load_adapter(fresh, tmp_path / "a")
    assert any(n.endswith("q_proj") for n, _ in lk.iter_lora_layers(fresh))


@pytest.mark.parametrize("content, message", [
    (b"[1, 2]", "expected a JSON object, found list"),
    (b'{"r": 4', "not valid JSON (Expecting ',' delimiter at line 1, column 8)"),
    (b'{"r": "caf\xe9"}', "not UTF-8 text (invalid continuation byte at byte 10)"),
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deep to read)"),
    (b'{"r": ' + b"9" * 5000 + b"}", "not readable JSON (Exceeds the limit"),
])
def test_one_json_reader_names_the_file_and_what_is_wrong_for_every_caller(tmp_path, content, message):
    """``lorakit.config.read_json_object`` is what LoraConfig.load, lorakit generate's metadata and
    the lab's config / index reads use (four copies before, with four wordings)."""
    from lorakit.analysis import weights
    from lorakit.config import read_json_object

    (tmp_path / "adapter_config.json").write_bytes(content)
    (tmp_path / "config.json").write_bytes(content)
    for read in (lambda: lk.LoraConfig.load(tmp_path), lambda: generate.read_json_object(tmp_path / "adapter_config.json"),
                 lambda: weights.load_config(tmp_path), lambda: read_json_object(tmp_path / "config.json", bom=False)):
        with pytest.raises(ValueError) as caught:
            read()
        assert str(caught.value).startswith(str(tmp_path)) and message in str(caught.value), str(caught.value)


def test_a_byte_order_mark_is_taken_in_lorakit_s_own_files_not_in_those_transformers_reads(tmp_path):
    from lorakit.config import read_json_object

    path = tmp_path / "config.json"
    path.write_bytes(b'\xef\xbb\xbf{"model_type": "llama"}')
    assert read_json_object(path) == {"model_type": "llama"}
    with pytest.raises(ValueError, match="Unexpected UTF-8 BOM"):  # (transformers' own json.load refuses it)
        read_json_object(path, bom=False)


def test_bf16_is_detected_from_torch_s_probes_without_proc(monkeypatch):
    real_open = open

    def no_proc(file, *a, **k):
        if str(file).startswith("/proc/"):
            raise FileNotFoundError(file)
        return real_open(file, *a, **k)
    monkeypatch.setattr("builtins.open", no_proc)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert generate.cpu_supports_bf16() and generate.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert not generate.cpu_supports_bf16() and generate.resolve_precision("auto") == "fp32"

    # and the machine's busy cores from psutil where /proc/stat is missing
    monkeypatch.setitem(sys.modules, "psutil", types.SimpleNamespace(cpu_percent=lambda interval: 50.0))
    assert generate.busy_cores(0.01) == 0.5 * (os.cpu_count() or 1)
    monkeypatch.setitem(sys.modules, "psutil", None)
    assert generate.busy_cores(0.01) is None


def test_commands_to_copy_are_quoted_for_the_shell_they_run_in(monkeypatch, tmp_path):
    run = tmp_path / "my run's dir"
    assert loop.resume_command(run) == f"lorakit train --resume '{str(run)[:-len(run.name)]}my run'\"'\"'s dir'"
    assert loop.shell_quote(r"C:\Users\me\runs\my run", windows=True) == r'"C:\Users\me\runs\my run"'
    assert loop.shell_quote(r"C:\runs\a&b", windows=True) == r'"C:\runs\a&b"'  # (cmd.exe splits at &)
    assert loop.shell_quote(r"C:\runs\plain", windows=True) == r"C:\runs\plain"


def test_without_fcntl_an_error_of_a_cache_load_is_not_chained_to_the_missing_module(monkeypatch, tmp_path):
    from lorakit import models

    monkeypatch.setitem(sys.modules, "fcntl", None)
    entry = tmp_path / "models" / "e"
    entry.mkdir(parents=True)
    try:
        with models._entry_lock(entry, exclusive=False) as present:
            assert present
            raise RuntimeError("in the block")
    except RuntimeError as exc:
        assert exc.__context__ is None

