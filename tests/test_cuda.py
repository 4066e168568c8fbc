"""The fast paths on a CUDA device: the same values and gradients as the plain path (float64 on the
GPU), dropout masks kept as bits, mixed-adapter rows, merge. Skipped where no CUDA GPU is present;
run on a lent GPU machine with ``python -m pytest -q tests/test_cuda.py``."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_same_in_float64, lora_llama, loss_and_grads, tiny_llama

import lorakit as lk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_training_kernels_equal_plain_path_in_float64(dropout):
    from lorakit.train.loop import use_lora_training_kernels

    model = lora_llama(dropout=dropout).to(CUDA)
    ids = torch.randint(3, 101, (3, 9), device=CUDA)
    reference = loss_and_grads(model, ids, seed=5)
    use_lora_training_kernels(model)
    assert_same_in_float64(loss_and_grads(model, ids, seed=5), reference)


def test_label_position_loss_equals_full_logits_loss():
    from lorakit.train.generate import loss_sum

    model = tiny_llama().to(CUDA, torch.float64)
    ids = torch.randint(3, 101, (3, 12), device=CUDA)
    labels = ids.clone()
    labels[:, :7] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    fast, n = loss_sum(model, batch)
    plain = model(**batch).loss
    torch.testing.assert_close(fast / n, plain.to(fast.dtype), rtol=1e-6, atol=1e-6)  # loss_sum sums in fp32


@pytest.mark.parametrize("shape", [(7,), (3, 33), (64, 129)])
def test_pack_bits_round_trip_on_the_device(shape):
    from lorakit.layers.fused import pack_bits, unpack_bits

    mask = torch.rand(shape, device=CUDA) < 0.7
    packed = pack_bits(mask)
    assert packed[0].device.type == "cuda"
    torch.testing.assert_close(unpack_bits(packed, mask.shape), mask)


def test_keep_mask_draws_on_the_device_with_the_right_rate():
    from lorakit.layers.fused import KeepMask

    drop = KeepMask((256, 1024), 0.25, CUDA)
    mask = drop.get().clone()
    assert mask.device.type == "cuda" and mask.dtype == torch.bool
    assert abs(mask.float().mean().item() - 0.75) < 0.01
    drop.release()
    assert torch.equal(drop.get(), mask)  # kept as bits, unpacked bit for bit


def test_mixed_adapter_rows_equal_each_row_alone():
    model = tiny_llama().to(CUDA)
    for name, targets in (("medical", ["q_proj", "v_proj"]), ("legal", ["o_proj", "down_proj"])):
        lk.get_lora_model(model, lk.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
                          adapter_name=name)
    model.eval()
    ids = torch.randint(3, 101, (4, 6), device=CUDA)
    names = ["medical", "legal", "__base__", "legal"]
    with torch.no_grad():
        mixed = model(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with lk.disable_adapters(model):
                    alone = model(ids[i:i + 1]).logits
            else:
                lk.set_adapter(model, name)
                alone = model(ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_merge_and_unmerge_on_the_device():
    model = lora_llama(dtype=torch.float64).to(CUDA).eval()
    ids = torch.randint(3, 101, (2, 7), device=CUDA)
    with torch.no_grad():
        before = model(ids).logits
        merged = lk.merge_and_unload(copy.deepcopy(model))
        torch.testing.assert_close(merged(ids).logits, before, rtol=1e-10, atol=1e-10)
