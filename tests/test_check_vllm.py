"""scripts/check_vllm.py: its argument checks here; the whole check where vLLM's code has been set up
(``python scripts/check_vllm.py --setup DIR``, then LORAKIT_VLLM_DIR=DIR; not in CI: ~530 MB)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "check_vllm.py"


def _script():
    spec = importlib.util.spec_from_file_location("check_vllm", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_check_vllm_asks_for_a_set_up_directory(tmp_path, capsys):
    script = _script()
    with pytest.raises(SystemExit):
        script.main([])
    assert "give --vllm DIR (made once with --setup DIR)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        script.main(["--vllm", str(tmp_path)])
    assert f"{tmp_path} holds no site/vllm: make it with --setup" in capsys.readouterr().err
    (tmp_path / "site" / "vllm").mkdir(parents=True)
    with pytest.raises(SystemExit):
        script.main(["--vllm", str(tmp_path), "--adapter", str(tmp_path / "nope")])
    assert "holds no adapter_config.json" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("LORAKIT_VLLM_DIR"), reason="vLLM's code not set up (LORAKIT_VLLM_DIR)")
def test_vllm_reads_lorakit_adapters(tmp_path, capsys):
    import subprocess

    proc = subprocess.run([sys.executable, str(SCRIPT), "--vllm", os.environ["LORAKIT_VLLM_DIR"],
                           "--work", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\nOK ") >= 19 and "FAIL" not in proc.stdout
