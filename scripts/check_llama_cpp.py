"""Does a lorakit adapter give the same model in llama.cpp? A manual interop check (not run by CI).

llama.cpp serves LoRA adapters as GGUF files made by its own converter, ``convert_lora_to_gguf.py``,
from the PEFT format that ``lorakit.save_adapter`` writes. This script takes the embedded
SmolLM2-135M-Instruct, gives it an adapter with non-zero B on every linear layer (so each
projection, and the q/k row permutation llama.cpp applies, is exercised), saves it with lorakit,
converts base and adapter with llama.cpp's scripts, runs both through llama.cpp (via the
``llama_cpp`` Python bindings) and compares the logits with lorakit's on the same tokens.

    python scripts/check_llama_cpp.py --llama-cpp DIR [--work DIR] [--rank 8] [--alpha 16]

``DIR`` is a llama.cpp source tree (the one vendored in the ``llama-cpp-python`` sdist works:
``pip download --no-deps --no-binary :all: llama-cpp-python``), and ``llama_cpp`` must be importable
(``pip install`` that sdist; it compiles llama.cpp). Needs nothing from a model hub.

Printed: the largest logit difference llama.cpp vs lorakit for the base and for base + adapter
(float32 weights on both sides), how far llama.cpp's adapter effect (adapted − base logits) is from
lorakit's, relative to its size, and whether greedy next tokens agree; then the same for the
embedded Q4_1 GGUF as llama.cpp's base (llama.cpp quantises activations there, so only the
adapter effect and the greedy tokens are compared).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TEXT = ("The film is a quiet, patient portrait of a family, and its best moments come when nothing "
        "much happens at all. I liked it more than I expected.")


def lorakit_logits(work: Path, rank: int, alpha: float) -> tuple[list[int], torch.Tensor, torch.Tensor, Path]:
    """The adapter (saved under ``work/adapter``), the tokens, and lorakit's base and adapted logits."""
    import lorakit as lk
    from lorakit.models import default_model_path, load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(dtype=torch.float32)
    model.eval()
    ids = tok(TEXT)["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        base = model(x).logits[0].float()
    torch.manual_seed(0)
    cfg = lk.LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                        base_model_name_or_path=str(default_model_path()))
    lk.get_lora_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)  # B = 0 would make the adapter a no-op
        adapted = model(x).logits[0].float()
    lk.save_adapter(model, work / "adapter")
    return ids, base, adapted, default_model_path()


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"error: {cmd[1]} failed:\n{proc.stderr[-3000:]}")


def llama_logits(model_path: Path, ids: list[int], lora: Path | None) -> torch.Tensor:
    from llama_cpp import Llama

    kwargs = {"lora_path": str(lora)} if lora is not None else {}
    # type_k / type_v 0 = GGML_TYPE_F32: a float32 KV cache (llama.cpp's default is float16)
    llm = Llama(model_path=str(model_path), n_ctx=max(64, len(ids) + 8), logits_all=True, verbose=False,
                n_threads=torch.get_num_threads(), type_k=0, type_v=0, **kwargs)
    llm.eval(ids)
    scores = torch.from_numpy(llm.scores[: len(ids)].copy()).float()
    del llm
    return scores


def compare(label: str, ref_base, ref_adapted, base, adapted) -> None:
    effect_ref, effect = ref_adapted - ref_base, adapted - base
    rel = float((effect - effect_ref).norm() / effect_ref.norm())
    agree = float((adapted.argmax(-1) == ref_adapted.argmax(-1)).float().mean())
    print(f"\n{label}")
    for name, mine, ref in (("base", base, ref_base), ("adapted", adapted, ref_adapted)):
        print(f"  {name} logits: max |llama.cpp − lorakit| {float((mine - ref).abs().max()):.2e}, "
              f"‖llama.cpp − lorakit‖ / ‖lorakit‖ {float((mine - ref).norm() / ref.norm()):.2e}")
    print(f"  adapter effect, ‖Δllama.cpp − Δlorakit‖ / ‖Δlorakit‖: {rel:.2e}  (‖Δlorakit‖ / ‖base‖ = "
          f"{float(effect_ref.norm() / ref_base.norm()):.2e})")
    print(f"  greedy next token agrees at {agree:.1%} of {len(base)} positions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp source tree (has convert_lora_to_gguf.py)")
    ap.add_argument("--work", type=Path, default=None, help="where the files go (default: a new temporary directory)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    args = ap.parse_args()
    try:
        import llama_cpp  # noqa: F401  (checked before minutes of conversion)
    except ImportError:
        sys.exit("error: the llama_cpp Python bindings are not importable: pip install the llama-cpp-python sdist "
                 "(it compiles llama.cpp) or put its install directory on PYTHONPATH")
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        if not (args.llama_cpp / script).is_file():
            sys.exit(f"error: {args.llama_cpp / script} not found: --llama-cpp must be a llama.cpp source tree")
    if args.work is None:
        args.work = Path(tempfile.mkdtemp(prefix="lorakit-llama-cpp-"))
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"files under {args.work}")
    ids, ref_base, ref_adapted, base_dir = lorakit_logits(args.work, args.rank, args.alpha)
    base_gguf, lora_gguf = args.work / "base-f32.gguf", args.work / "adapter-f32.gguf"
    run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(base_dir), "--outtype", "f32",
         "--outfile", str(base_gguf)])
    run([sys.executable, str(args.llama_cpp / "convert_lora_to_gguf.py"), str(args.work / "adapter"),
         "--base", str(base_dir), "--outtype", "f32", "--outfile", str(lora_gguf)])
    print(f"\n{len(ids)} tokens; adapter r={args.rank}, alpha={args.alpha:g} on all linear layers, B ~ N(0, 0.02)")
    compare("llama.cpp, float32 base converted from lorakit's model:", ref_base, ref_adapted,
            llama_logits(base_gguf, ids, None), llama_logits(base_gguf, ids, lora_gguf))
    from lorakit.models import default_gguf_path

    q4 = default_gguf_path()
    compare(f"llama.cpp, the embedded {q4.name} as base:", ref_base, ref_adapted,
            llama_logits(q4, ids, None), llama_logits(q4, ids, lora_gguf))


if __name__ == "__main__":
    main()
