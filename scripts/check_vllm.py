"""Do lorakit adapters load in vLLM? A manual interop check (not run by CI: it needs ~530 MB of vLLM).

vLLM serves PEFT-format LoRA adapters (``enable_lora=True``). Its engine needs a GPU, but the code that
reads an adapter is plain Python and torch, and this script runs that code, unmodified, on adapters
saved by ``lorakit.save_adapter``. It follows the steps of
``WorkerLoRAManager._load_adapter`` (vllm/lora/worker_manager.py) for a Llama model:

* ``PEFTHelper.from_local_dir`` + ``validate_legal``: reading and checking ``adapter_config.json``;
* ``LoRAModel.from_local_checkpoint``: tensor names, the modules vLLM's Llama takes, the scaling;
* ``LoRAModelManager._create_merged_loras_inplace``: q/k/v and gate/up packed into vLLM's fused
  ``qkv_proj`` / ``gate_up_proj``, with the scaling folded into ``lora_b``.

The inputs that step takes from a live vLLM model are rebuilt from vLLM's own Llama class: its
``packed_modules_mapping``, ``embedding_modules``, ``hf_to_vllm_mapper``, and its linear layers, which
are read from ``llama.py``. The vocabulary size comes from the base, ``max_lora_rank`` is 16 (vLLM's
default) and the dtype float32. Turning vLLM's packed weights back into ΔW and comparing that with
lorakit's own merge (``merge_and_unload``) would catch any key, transposition or scaling error.
Each case is also saved by PEFT 0.21.2 with the same weights, and vLLM must give it the same verdict.
Not covered: the GPU side (copying into the engine's buffers, the kernels).

    python scripts/check_vllm.py --setup DIR      # once: vllm==0.34.0 (--no-deps) and its pure-Python
                                                  # imports, unpacked under DIR, not into the venv
    python scripts/check_vllm.py --vllm DIR [--real]

``--real`` adds two cases on the embedded SmolLM2-135M-Instruct. The exit status is 0 when every case
got its expected verdict: accepted with the same ΔW, or rejected with the expected message.
vLLM's compiled CUDA extension is never loaded, and pinned memory (which needs an accelerator) is
switched off in vLLM's LoRA modules; that is a transfer optimisation, not part of the parsing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import peft
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit import LoraConfig, get_lora_model, merge_and_unload, save_adapter

# vllm==0.34.0's imports that its LoRA modules reach, pinned (--no-deps: none of them pulls torch).
VLLM_IMPORTS = ("pyzmq==27.3.0 aiohttp==3.14.5 multidict==7.2.1 yarl==1.25.1 propcache==0.5.4 frozenlist==1.8.0 "
                "aiosignal==1.4.0 attrs==26.1.0 aiohappyeyeballs==2.7.1 pybase64==1.5.1 cachetools==8.0.2 "
                "cbor2==6.3.0 msgspec==0.23.0 cloudpickle==3.1.3 uvloop==0.23.0 py-cpuinfo==9.0.0 "
                "prometheus_client==0.26.0 llguidance==1.9.1 xgrammar==0.2.8 apache-tvm-ffi==0.1.11 "
                "einops==0.8.2").split()
OUT = ""  # where each case's adapters are written (main sets it)


def setup(directory: Path) -> None:
    """Unpack the vllm wheel's ``vllm/`` into ``directory/site`` and its imports into ``directory/deps``."""
    import zipfile

    pip = [sys.executable, "-m", "pip", "-q"]
    wheels = directory / "wheel"
    subprocess.run(pip + ["download", "--no-deps", "-d", str(wheels), "vllm==0.34.0"], check=True)
    with zipfile.ZipFile(next(wheels.glob("vllm-0.34.0-*.whl"))) as whl:
        whl.extractall(directory / "site", [n for n in whl.namelist() if n.startswith("vllm/")])
    shutil.rmtree(wheels)  # (230 MB, no longer needed)
    subprocess.run(pip + ["install", "--no-deps", "--target", str(directory / "deps"), *VLLM_IMPORTS], check=True)
    print(f"vLLM's code is under {directory}: python {sys.argv[0]} --vllm {directory}")


def load_vllm(directory: Path) -> None:
    """Import vLLM's LoRA modules from ``directory`` (see ``setup``) into this module's globals."""
    global vllm, LoRAConfig, LoRAModel, LoRAModelManager, PEFTHelper, parse_fine_tuned_lora_name, VllmLlama
    site = (directory / "site").resolve()
    sys.path[:0] = [str(site), str(directory / "deps")]
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    import vllm
    import vllm.lora.lora_model
    import vllm.lora.lora_weights
    import vllm.lora.model_manager
    from vllm.config.lora import LoRAConfig
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.utils import parse_fine_tuned_lora_name
    from vllm.model_executor.models.llama import LlamaForCausalLM as VllmLlama

    if not Path(vllm.__file__).resolve().is_relative_to(site):
        raise SystemExit(f"vllm was imported from {vllm.__file__}, not from {site}")
    for module in (vllm.lora.lora_model, vllm.lora.model_manager, vllm.lora.lora_weights):
        if hasattr(module, "PIN_MEMORY"):
            module.PIN_MEMORY = False  # pin_memory() needs an accelerator


PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# vLLM Llama's LinearBase leaves (model_executor/models/llama.py: qkv_proj, o_proj, gate_up_proj,
# down_proj) + LlamaForCausalLM.embedding_modules keys, i.e. get_supported_lora_modules(model).
VLLM_LLAMA_LINEAR_LEAVES = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
PREFIX = "base_model.model."


def vllm_llama_linear_leaves() -> list[str]:
    """Attribute names that vLLM's llama.py assigns a LinearBase subclass to (``self.x = Cls(...)``),
    i.e. what get_supported_lora_modules (vllm/lora/utils.py:248-262) collects from a built model's
    LinearBase modules. Read from the source because the model cannot be built without a GPU."""
    import ast
    import vllm.model_executor.layers.linear as lin
    import vllm.model_executor.models.llama as llama_mod

    tree = ast.parse(Path(llama_mod.__file__).read_text())
    leaves = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Attribute) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)):
            cls = getattr(lin, node.value.func.id, None) or getattr(llama_mod, node.value.func.id, None)
            if isinstance(cls, type) and issubclass(cls, lin.LinearBase):
                leaves.add(node.targets[0].attr)
    return sorted(leaves)


def vllm_expected_lora_modules() -> set[str]:
    """WorkerLoRAManager._load_adapter, vllm/lora/worker_manager.py:108-118, for vLLM's Llama."""
    assert sorted(VLLM_LLAMA_LINEAR_LEAVES) == vllm_llama_linear_leaves(), vllm_llama_linear_leaves()
    supported = VLLM_LLAMA_LINEAR_LEAVES + list(VllmLlama.embedding_modules)
    packed = VllmLlama.packed_modules_mapping
    out: list[str] = []
    for module in supported:
        if module in packed:
            out.extend(packed[module])
        else:
            out.append(module)
    return set(out)


def vllm_load(adapter_dir: Path, vocab_size: int, max_pos: int, max_lora_rank: int = 16):
    """The adapter-reading part of WorkerLoRAManager._load_adapter (worker_manager.py:119-152)."""
    peft_helper = PEFTHelper.from_local_dir(str(adapter_dir), max_pos)
    peft_helper.validate_legal(LoRAConfig(max_lora_rank=max_lora_rank, lora_dtype=torch.float32))
    mapper = VllmLlama.hf_to_vllm_mapper.get_rename_mapper()
    lora = LoRAModel.from_local_checkpoint(
        str(adapter_dir), vllm_expected_lora_modules(), peft_helper=peft_helper, lora_model_id=1,
        device="cpu", dtype=torch.float32, model_vocab_size=vocab_size, weights_mapper=mapper,
        skip_prefixes=getattr(VllmLlama, "lora_skip_prefixes", None), unsupported_lora_modules=set())
    return peft_helper, lora


def vllm_pack(lora: LoRAModel, num_layers: int) -> LoRAModel:
    """LoRAModelManager._create_merged_loras_inplace (model_manager.py:870) on a manager holding only
    the state that method reads for a dense Llama (the q/k/v and gate/up packed modules)."""
    mgr = LoRAModelManager.__new__(LoRAModelManager)
    mgr.packed_modules_mapping = dict(VllmLlama.packed_modules_mapping)
    mgr.packed_modules = {}
    mgr.modules = {}
    mgr.is_pooling_model = False
    mgr.supports_mm = False
    mgr._enable_moe_shared_loras = False
    mgr._enable_mixed_moe_lora_format = False
    mgr._is_non_gated_moe = False
    for i in range(num_layers):
        mgr._register_packed_modules(f"model.layers.{i}.self_attn.qkv_proj", None)
        mgr._register_packed_modules(f"model.layers.{i}.mlp.gate_up_proj", None)
    mgr._create_merged_loras_inplace(lora)
    return lora


def vllm_deltas(lora: LoRAModel, num_layers: int) -> dict[str, torch.Tensor]:
    """ΔW per HF module name from vLLM's packed weights (scaling already folded into lora_b)."""
    out = {}
    packed = VllmLlama.packed_modules_mapping
    for name, w in lora.loras.items():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(w.lora_a, list):
            parent = name.rsplit(".", 1)[0]
            for sub, a, b, s in zip(packed[leaf], w.lora_a, w.lora_b, w.scaling):
                if a is None:
                    continue
                assert s == 1, (name, s)
                out[f"{parent}.{sub}"] = b @ a
        else:
            assert w.scaling == 1, (name, w.scaling)
            if leaf == "embed_tokens":
                # VocabParallelEmbeddingWithLoRA.set_lora stores lora_a.T; forward = emb(ids, Aᵀ) Bᵀ
                out[name] = (w.lora_b @ w.lora_a).T
            else:
                out[name] = w.lora_b @ w.lora_a
    return out


# ---------------------------------------------------------------------------------------------------


def tiny_llama(tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def randomise(model, seed: int = 1) -> None:
    """Give every adapter tensor random values (B = 0 would hide transpositions / scaling)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n and ("_B" in n or "_A" in n):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def peft_control(base, cfg_kwargs: dict, lorakit_tensors: dict, out: Path) -> Path | str:
    """Save the same adapter (same weights) with PEFT: the format vLLM is written against."""
    kw = dict(cfg_kwargs)
    try:
        pcfg = peft.LoraConfig(**kw)
        pm = peft.get_peft_model(copy.deepcopy(base), pcfg)
        res = peft.set_peft_model_state_dict(pm, lorakit_tensors)
        if res.unexpected_keys:
            return f"PEFT could not take lorakit's tensors: unexpected {res.unexpected_keys[:3]}"
        pm.save_pretrained(str(out))
        return out
    except Exception as exc:  # noqa: BLE001
        return f"PEFT control not built: {type(exc).__name__}: {exc}"


def file_summary(d: Path) -> tuple[dict, dict]:
    return json.loads((d / "adapter_config.json").read_text()), load_file(str(d / "adapter_model.safetensors"))


def through_vllm(d: Path, base, lk_delta: dict[str, torch.Tensor], max_lora_rank: int = 16) -> dict:
    """vLLM's verdict on the adapter in ``d`` for ``base`` and, where it accepts it, how far the ΔW it
    would apply is from ``lk_delta`` (lorakit's merged minus base weights, per module)."""
    hf = base.config
    num_layers, vocab, max_pos = hf.num_hidden_layers, hf.vocab_size, hf.max_position_embeddings
    r: dict = {}
    try:
        helper, lora = vllm_load(d, vocab, max_pos, max_lora_rank)
    except Exception as exc:  # noqa: BLE001
        r["verdict"] = "rejected"
        r["error"] = f"{type(exc).__name__}: {exc}"
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        r["where"] = f"{frame.filename.split('site-packages/')[-1].split('/vllm/', 1)[-1]}:{frame.lineno}"
        return r
    r["verdict"] = "accepted"
    r["scaling_factor"] = helper.vllm_lora_scaling_factor
    r["modules"] = len(lora.loras)
    r["modules_to_save"] = sorted(lora.modules_to_save)
    # unpacked weights must equal the file's tensors exactly
    mism = []
    on_disk = load_file(str(d / "adapter_model.safetensors"))
    for tname, t in on_disk.items():
        try:
            mod, is_a = parse_fine_tuned_lora_name(tname)
        except ValueError:
            continue
        w = lora.loras.get(mod)
        if w is None:
            continue
        got = w.lora_a if is_a else w.lora_b
        if got is None or not torch.equal(got, t.float()):
            mism.append(tname)
    r["tensor_mismatches"] = mism
    for mname, full in lora.modules_to_save.items():
        if not torch.equal(full.weight, on_disk[f"{PREFIX}{mname}.weight"]):
            mism.append(f"{mname} (modules_to_save)")
    r["scalings"] = sorted({(w.rank, round(w.scaling, 6)) for w in lora.loras.values()})
    lora = vllm_pack(lora, num_layers)
    vd = vllm_deltas(lora, num_layers)
    r["packed_modules"] = sorted({n.rsplit(".", 1)[-1] for n in lora.loras})
    missing = sorted(set(lk_delta) - set(vd))
    extra = sorted(set(vd) - set(lk_delta))
    worst = 0.0
    for k in sorted(set(vd) & set(lk_delta)):
        rel = ((vd[k].double() - lk_delta[k]).norm() / lk_delta[k].norm()).item()
        worst = max(worst, rel)
    r["delta_vs_lorakit_merge"] = {"max_rel_err": worst, "only_in_lorakit_merge": missing[:4],
                                   "only_in_vllm": extra[:4], "compared": len(set(vd) & set(lk_delta))}
    return r


def same_update(v: dict) -> bool:
    """vLLM accepted the adapter, read its tensors unchanged and would apply lorakit's ΔW everywhere."""
    d = v.get("delta_vs_lorakit_merge", {})
    return (v["verdict"] == "accepted" and not v["tensor_mismatches"] and d["max_rel_err"] < 1e-5
            and not d["only_in_lorakit_merge"] and not d["only_in_vllm"])


def check_run(adapter_dir: Path) -> dict:
    """vLLM on an adapter already saved (e.g. a ``lorakit train`` run) for the embedded model."""
    from lorakit import load_adapter
    from lorakit.models import load_model_and_tokenizer

    base, _ = load_model_and_tokenizer()
    base.eval()
    model = load_adapter(copy.deepcopy(base), adapter_dir)
    v = through_vllm(adapter_dir, base, lorakit_deltas(model, base), max_lora_rank=max(16, _max_rank(adapter_dir)))
    return {"case": str(adapter_dir), "expect": "accept", "vllm_on_lorakit": v, "ok": same_update(v)}


def _max_rank(adapter_dir: Path) -> int:
    """The largest rank in the adapter's file (vLLM's --max-lora-rank must be at least that)."""
    return max((t.shape[0] for k, t in load_file(str(adapter_dir / "adapter_model.safetensors")).items()
               if k.endswith("lora_A.weight")), default=0)


def lorakit_deltas(model, base) -> dict[str, torch.Tensor]:
    """lorakit's own ΔW per module: its merged weights minus the base's, in float64 (in float32 the
    difference of two nearly equal weights would carry W's rounding, large against a small ΔW)."""
    merged = merge_and_unload(copy.deepcopy(model).double())
    base_sd, merged_sd = base.state_dict(), merged.state_dict()
    return {k[: -len(".weight")]: merged_sd[k] - base_sd[k].double() for k in base_sd
            if k.endswith(".weight") and not torch.equal(merged_sd[k], base_sd[k].double())}


def run_case(name: str, cfg_kwargs: dict, expect: str, tie: bool = False, base=None,
             save_kwargs: dict | None = None, max_lora_rank: int = 16, control: bool = True) -> dict:
    """expect: "accept" or a substring of the ValueError vLLM must raise."""
    res: dict = {"case": name, "expect": expect}
    if base == "seq_cls":
        from transformers import LlamaForSequenceClassification
        config = tiny_llama(tie).config  # (which leaves the RNG seeded for the head below)
        base = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 3,
                                                             "pad_token_id": 0})).eval()
    base = base if base is not None else tiny_llama(tie)
    root = Path(tempfile.mkdtemp(prefix=f"{name}_", dir=OUT))

    model = get_lora_model(copy.deepcopy(base), LoraConfig(**cfg_kwargs))
    randomise(model)
    d_lk = save_adapter(model, root / "lorakit", **(save_kwargs or {}))
    lk_cfg, lk_tensors = file_summary(d_lk)
    res["lorakit_config"] = {k: lk_cfg.get(k) for k in ("r", "lora_alpha", "use_rslora", "use_dora", "bias",
                                                         "modules_to_save", "init_lora_weights", "target_modules",
                                                         "rank_pattern", "alpha_pattern", "task_type")}
    res["lorakit_keys_sample"] = sorted(lk_tensors)[:4]
    res["lorakit_num_tensors"] = len(lk_tensors)

    lk_delta = lorakit_deltas(model, base)

    res["vllm_on_lorakit"] = through_vllm(d_lk, base, lk_delta, max_lora_rank)
    if control:
        d_pf = peft_control(base, {k: v for k, v in cfg_kwargs.items()}, lk_tensors, root / "peft")
        if isinstance(d_pf, Path):
            pf_cfg, pf_tensors = file_summary(d_pf)
            res["peft_vs_lorakit_files"] = {
                "keys_only_in_lorakit": sorted(set(lk_tensors) - set(pf_tensors))[:4],
                "keys_only_in_peft": sorted(set(pf_tensors) - set(lk_tensors))[:4],
                "unequal_tensors": sorted(k for k in set(lk_tensors) & set(pf_tensors)
                                          if not torch.equal(lk_tensors[k], pf_tensors[k]))[:4],
                "config_fields_differing_vllm_reads": {
                    k: (lk_cfg.get(k), pf_cfg.get(k)) for k in
                    ("r", "lora_alpha", "target_modules", "bias", "modules_to_save", "task_type", "use_rslora",
                     "use_dora", "lora_bias", "init_lora_weights", "alpha_pattern", "rank_pattern",
                     "alora_invocation_tokens", "layer_replication", "use_bdlora", "use_qalora")
                    if (sorted(lk_cfg.get(k)) if isinstance(lk_cfg.get(k), list) else lk_cfg.get(k))
                    != (sorted(pf_cfg.get(k)) if isinstance(pf_cfg.get(k), list) else pf_cfg.get(k))},
            }
            res["vllm_on_peft"] = through_vllm(d_pf, base, lk_delta, max_lora_rank)
        else:
            res["vllm_on_peft"] = {"verdict": "n/a", "note": d_pf}

    v = res["vllm_on_lorakit"]
    if expect == "accept":
        ok = same_update(v)
    else:
        ok = v["verdict"] == "rejected" and expect in v["error"]
    if control and isinstance(res.get("vllm_on_peft"), dict) and res["vllm_on_peft"].get("verdict") in ("accepted", "rejected"):
        res["same_verdict_as_peft"] = res["vllm_on_peft"]["verdict"] == v["verdict"]
        ok = ok and res["same_verdict_as_peft"]
    res["ok"] = ok
    return res


ALL = dict(target_modules=PROJ)
CASES = [
    ("plain_r8", dict(r=8, lora_alpha=16, **ALL), "accept", {}),
    ("rslora_r8", dict(r=8, lora_alpha=16, use_rslora=True, **ALL), "accept", {}),
    ("all_linear_string", dict(r=8, lora_alpha=16, target_modules="all-linear"), "accept", {}),
    ("rank_alpha_pattern", dict(r=8, lora_alpha=16, rank_pattern={"down_proj": 4}, alpha_pattern={"q_proj": 32},
                                **ALL), "accept", {}),
    ("rank_alpha_pattern_rslora", dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"layers.1.mlp.up_proj": 2},
                                       alpha_pattern={"v_proj": 4}, **ALL), "accept", {}),
    ("embed_tokens_target", dict(r=8, lora_alpha=16, target_modules=PROJ + ["embed_tokens"]), "accept", {}),
    ("lm_head_target", dict(r=8, lora_alpha=16, target_modules=PROJ + ["lm_head"]), "accept", {}),
    ("gaussian_init", dict(r=8, lora_alpha=16, init_lora_weights="gaussian", **ALL), "accept", {}),
    ("dora", dict(r=8, lora_alpha=16, use_dora=True, **ALL), "vLLM does not yet support DoRA", {}),
    ("bias_lora_only", dict(r=8, lora_alpha=16, bias="lora_only", **ALL), "Adapter bias is not supported", {}),
    ("modules_to_save_lm_head", dict(r=8, lora_alpha=16, modules_to_save=["lm_head"], **ALL),
     "vLLM only supports modules_to_save", {}),
    ("rank_32_over_max16", dict(r=32, lora_alpha=32, **ALL), "greater than max_lora_rank", {}),
    ("pissa_unconverted", dict(r=8, lora_alpha=8, init_lora_weights="pissa", **ALL),
     "does not support init_lora_weights", {}),
    ("pissa_convert_to_lora", dict(r=8, lora_alpha=8, init_lora_weights="pissa", **ALL), "accept",
     {"save_kwargs": {"convert_to_lora": True}, "control": False}),
    ("pissa_rslora_convert_to_lora", dict(r=4, lora_alpha=8, use_rslora=True, init_lora_weights="pissa",
                                          rank_pattern={"down_proj": 2}, **ALL), "accept",
     {"save_kwargs": {"convert_to_lora": True}, "control": False}),
    ("olora_convert_to_lora", dict(r=8, lora_alpha=16, init_lora_weights="olora", **ALL), "accept",
     {"save_kwargs": {"convert_to_lora": True}, "control": False}),
    # lorakit keeps the pattern order (first match wins); PEFT's save sorts the keys.
    ("rank_pattern_order", dict(r=8, lora_alpha=16, rank_pattern={"up_proj": 4, "layers.1.mlp.up_proj": 2},
                                alpha_pattern={"proj": 8, "q_proj": 32}, **ALL), "accept", {}),
    ("layers_to_transform", dict(r=8, lora_alpha=16, layers_to_transform=[1], layers_pattern="layers", **ALL),
     "accept", {}),
    ("seq_cls_score", dict(r=8, lora_alpha=16, task_type="SEQ_CLS", **ALL), "accept", {"base": "seq_cls"}),
]


def main(argv: list[str] | None = None) -> int:
    global OUT
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setup", type=Path, metavar="DIR", help="download and unpack vLLM's code under DIR")
    parser.add_argument("--vllm", type=Path, metavar="DIR", help="a directory made by --setup")
    parser.add_argument("--real", action="store_true", help="also check adapters on the embedded SmolLM2-135M")
    parser.add_argument("--adapter", type=Path, action="append", default=[], metavar="DIR",
                        help="instead of the built-in cases, check this adapter of the embedded model "
                        "(e.g. a `lorakit train` run directory); may repeat")
    parser.add_argument("--work", type=Path, default=None, help="keep the saved adapters here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.setup:
        setup(args.setup)
        return 0
    if not args.vllm:
        parser.error("give --vllm DIR (made once with --setup DIR)")
    if not (args.vllm / "site" / "vllm").is_dir():
        parser.error(f"{args.vllm} holds no site/vllm: make it with --setup {args.vllm}")
    for d in args.adapter:
        if not (d / "adapter_config.json").is_file():
            parser.error(f"--adapter {str(d)!r} holds no adapter_config.json (a lorakit run or PEFT adapter directory)")
    warnings.filterwarnings("ignore")
    load_vllm(args.vllm)
    OUT = str(args.work or tempfile.mkdtemp(prefix="lorakit-vllm-"))
    Path(OUT).mkdir(parents=True, exist_ok=True)
    print(f"vllm {vllm.__version__}, lorakit {lorakit.__version__}, peft {peft.__version__}, torch {torch.__version__}")
    print("modules vLLM's Llama takes LoRA on:", sorted(vllm_expected_lora_modules()))
    cases = list(CASES)
    if args.real:
        from lorakit.models import load_model_and_tokenizer

        real, _ = load_model_and_tokenizer()
        real.eval()
        cases.append(("smollm2_135m_plain_r8", dict(r=8, lora_alpha=16, **ALL), "accept", {"base": real}))
        cases.append(("smollm2_135m_rslora_embed", dict(r=8, lora_alpha=16, use_rslora=True,
                                                        target_modules=PROJ + ["embed_tokens"]), "accept", {"base": real}))
    results = [check_run(d) for d in args.adapter]
    for name, kw, expect, extra in ([] if args.adapter else cases):
        try:
            r = run_case(name, kw, expect, **extra)
        except Exception as exc:  # noqa: BLE001 - a crash is one failed case, reported with the others
            r = {"case": name, "ok": False, "crash": f"{type(exc).__name__}: {exc}", "tb": traceback.format_exc()}
        results.append(r)
    (Path(OUT) / "results.json").write_text(json.dumps(results, indent=1, default=str))
    for r in results:
        v, p = r.get("vllm_on_lorakit", {}), r.get("vllm_on_peft", {})
        line = f"{'OK  ' if r['ok'] else 'FAIL'} {r['case']:<28} vLLM on lorakit's: {v.get('verdict', r.get('crash'))}"
        if v.get("verdict") == "accepted":
            line += f", dW rel. error {v['delta_vs_lorakit_merge']['max_rel_err']:.1e}"
        elif v.get("verdict") == "rejected":
            line += f" ({v['error'][:80]} at {v['where']})"
        print(line + (f" | on PEFT's: {p['verdict']}" if p.get("verdict") else ""))
    print(f"details: {Path(OUT) / 'results.json'}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
