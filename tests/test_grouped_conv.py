"""LoRA on a grouped Conv2d (groups = G > 1): PEFT 0.21.2's layout, B a grouped 1×1 conv (out, r/G),
unmerged only (layers/conv2d.py)."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.analysis.adapter_tools import read_adapter, resize_adapter

peft = pytest.importorskip("peft")

GROUPS = 4


class GroupedNet(nn.Module):
    """A grouped 3×3 conv (8 -> 12 channels, 4 groups, strided) and an ordinary 1×1 conv (12 -> 16) after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, groups=GROUPS)
        self.head = nn.Conv2d(12, 16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)))


def net() -> GroupedNet:
    torch.manual_seed(0)
    return GroupedNet().double()


def image(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 8, 7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def config(r: int = 8, **kwargs) -> lk.LoraConfig:
    return lk.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["conv", "head"], init_lora_weights=False, **kwargs)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_b_is_grouped_and_the_branch_is_the_dense_delta_as_a_conv():
    m = lk.get_lora_model(net(), config())
    layer = m.conv
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert tuple(A.shape) == (8, 8, 3, 3) and tuple(B.shape) == (12, 8 // GROUPS, 1, 1)
    x = image()
    # delta_from is the whole branch as one ungrouped kernel: conv with it is B(A(x))
    dense = F.conv2d(x, layer.delta_from(A, B), None, 2, 1)
    torch.testing.assert_close(layer.branch(x, A, B), dense, rtol=0, atol=1e-12)
    # and output group g reads only A's g-th block of rank rows: zeroing one block changes one group
    with torch.no_grad():
        A2 = A.clone()
        A2[2:4] = 0
    changed = (layer.branch(x, A2, B) - layer.branch(x, A, B)).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.tolist() == [False] * 3 + [True] * 3 + [False] * 6


def test_gradients_match_finite_differences():
    layer = lk.get_lora_model(net(), config()).conv
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    x = image(2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, A, B: layer.base_layer(x) + layer.branch(x, A, B) * 2.0, (x, A, B))


@pytest.mark.parametrize("writer", ["lorakit", "peft"])
def test_adapters_move_both_ways_with_peft(tmp_path, writer):
    x = image()
    if writer == "lorakit":
        source = lk.get_lora_model(net(), config())
        lk.save_adapter(source, tmp_path)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PEFT: "Merging is not supported" for groups > 1
            source = peft.get_peft_model(net(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["conv", "head"],
                                                                init_lora_weights=False))
        source.save_pretrained(tmp_path)
    expected = source(x)
    assert not torch.allclose(expected, net()(x))  # the adapter changes the output
    loaded = lk.load_adapter(net(), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        in_peft = peft.PeftModel.from_pretrained(net(), tmp_path)
    torch.testing.assert_close(in_peft(x), expected, rtol=0, atol=1e-12)


def test_a_rank_not_divisible_by_the_groups_is_refused_with_the_model_unchanged():
    m = net()
    x = image()
    before = m(x)
    with pytest.raises(ValueError, match=r"groups=4 needs a rank divisible by 4.*r=6"):
        lk.get_lora_model(m, config(r=6))
    assert type(m.conv) is nn.Conv2d and type(m.head) is nn.Conv2d and not hasattr(m, "_lorakit")
    assert torch.equal(m(x), before)
    # a second adapter of such a rank leaves the first one as it was
    lk.get_lora_model(m, config(r=8))
    with_first = m(x)
    with pytest.raises(ValueError, match="divisible"):
        lk.get_lora_model(m, config(r=6), adapter_name="second")
    assert list(m.conv.lora_A) == ["default"] and list(m.conv.lora_B) == ["default"]
    assert torch.equal(m(x), with_first)


def test_merging_is_refused_with_every_weight_unchanged():
    m = lk.get_lora_model(net(), config())
    x = image()
    before, weights = m(x), snapshot(m)
    for merge in (lk.merge, lk.merge_and_unload):
        with pytest.raises(ValueError, match=r"conv.*groups=4.*reaches across the groups"):
            merge(m)
    with pytest.raises(ValueError, match="groups=4"):
        m.conv.merge()
    assert m.conv.merged_adapters == [] and m.head.merged_adapters == []  # (head is mergeable: left alone too)
    after = snapshot(m)
    assert all(torch.equal(after[k], v) for k, v in weights.items())
    assert torch.equal(m(x), before)


def test_dora_is_refused_with_the_model_unchanged():
    m = net()
    before = m(image())
    with pytest.raises(ValueError, match=r"DoRA.*groups=4"):
        lk.get_lora_model(m, config(use_dora=True))
    assert type(m.conv) is nn.Conv2d and torch.equal(m(image()), before)


def two_adapters() -> nn.Module:
    m = lk.get_lora_model(net(), config(r=8))
    lk.get_lora_model(m, config(r=4), adapter_name="b")
    return m


def output_with(m: nn.Module, name: str | None, x: torch.Tensor) -> torch.Tensor:
    if name is None:
        with lk.disable_adapters(m):
            return m(x)
    lk.set_adapter(m, name)
    return m(x)


def test_mixed_batch_rows_get_their_own_adapter():
    m = two_adapters()
    x = image(4)
    names = ["b", "__base__", "default", "b"]
    mixed = m(x, adapter_names=names)
    for row, name in enumerate(names):
        alone = output_with(m, None if name == "__base__" else name, x[row:row + 1])
        torch.testing.assert_close(mixed[row:row + 1], alone, rtol=0, atol=1e-12)


def test_cat_combination_is_exact_and_svd_is_refused():
    m = two_adapters()
    x = image()
    lk.combine_adapters(m, {"default": 0.5, "b": -1.5}, "mix", method="cat")
    assert tuple(m.conv.lora_B["mix"].shape) == (12, 12 // GROUPS, 1, 1)
    conv_out = {}  # the grouped conv's own output: linear in its ΔW (the ReLU after it is not)
    hook = m.conv.register_forward_hook(lambda mod, args, out: conv_out.__setitem__("y", out))
    ys = {}
    for name in (None, "default", "b", "mix"):
        output_with(m, name, x)
        ys[name] = conv_out["y"]
    hook.remove()
    assert (ys["b"] - ys[None]).abs().max() > 1e-3
    expected = ys[None] + 0.5 * (ys["default"] - ys[None]) - 1.5 * (ys["b"] - ys[None])
    torch.testing.assert_close(ys["mix"], expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"groups=4.*method='cat'"):
        lk.combine_adapters(m, {"default": 1.0, "b": 1.0}, "svd_mix", method="svd", rank=4)
    assert "svd_mix" not in m.conv.lora_A


def test_analysis_tools_read_the_dense_delta_and_refuse_to_resize(tmp_path):
    m = lk.get_lora_model(net(), config())
    lk.save_adapter(m, tmp_path / "adapter")
    module = read_adapter(tmp_path / "adapter").modules["conv"]
    assert module.groups == GROUPS
    left, right = module.factors()
    expected = m.conv.delta_weight("default").reshape(12, -1)
    torch.testing.assert_close(left @ right, expected, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"'conv' is on a convolution of 4 groups"):
        resize_adapter(tmp_path / "adapter", 4, tmp_path / "small")
    assert not (tmp_path / "small").exists()


def test_the_rank_warning_counts_every_input_channel_a_grouped_update_reads():
    depthwise = nn.Sequential(nn.Conv2d(16, 16, 1, groups=16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # r = 16 = min(out, in): no warning (its weight is (16, 1, 1, 1))
        lk.get_lora_model(copy.deepcopy(depthwise), lk.LoraConfig(r=16, target_modules=["0"]))
    with pytest.warns(UserWarning, match="at most rank 16"):
        lk.get_lora_model(copy.deepcopy(depthwise), lk.LoraConfig(r=32, target_modules=["0"]))


def test_a_peft_dora_file_on_a_grouped_conv_is_refused_by_name_with_the_model_unchanged(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (PEFT 0.21.2 makes it, with a norm of B.view(-1, r) @ A)
        dora = peft.get_peft_model(net(), peft.LoraConfig(r=8, lora_alpha=16, target_modules=["conv"], use_dora=True))
    dora.save_pretrained(tmp_path)
    m = net()
    before = m(image())
    with pytest.raises(ValueError, match=r"DoRA needs ΔW in the base weight's layout.*groups=4"):
        lk.load_adapter(m, tmp_path)
    assert type(m.conv) is nn.Conv2d and torch.equal(m(image()), before)


def test_a_channel_multiplier_conv_takes_a_rank_up_to_its_outputs_without_a_warning():
    # (4 -> 16 channels, 4 groups, 1x1: ΔW is 16 x 4, yet each output group reaches it through its own
    # r/4 rank channels, so every ΔW of that shape needs r = 16)
    multiplier = nn.Sequential(nn.Conv2d(4, 16, 1, groups=4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lk.get_lora_model(copy.deepcopy(multiplier), lk.LoraConfig(r=16, target_modules=["0"]))
    with pytest.warns(UserWarning, match="at most rank 16"):
        lk.get_lora_model(copy.deepcopy(multiplier), lk.LoraConfig(r=20, target_modules=["0"]))


def test_the_data_driven_rank_of_a_grouped_conv_is_a_multiple_of_its_groups(tmp_path):
    from lorakit.analysis import recommend

    m = lk.get_lora_model(net(), lk.LoraConfig(r=8, target_modules=["conv"], init_lora_weights=False))
    with torch.no_grad():  # one rank channel per group carries the update: energy rank 1 .. 4
        m.conv.lora_A["default"].view(GROUPS, 2, -1)[:, 1] = 0
    lk.save_adapter(m, tmp_path / "adapter")
    row = recommend.data_driven_ranks(adapter=tmp_path / "adapter", energy=0.5)["modules"][0]
    assert row["rank90"] < GROUPS and row["suggested"] == GROUPS
    lk.get_lora_model(net(), lk.LoraConfig(r=row["suggested"], target_modules=["conv"]))  # (a rank it takes)
