"""The batched LoRA product: the torch reference equals each token's own adapter applied alone (and zero for the
base), and the Triton kernel (in the interpreter on CPU) equals the reference."""
import pytest
import torch

from kernels.lora import lora_delta


def _stacks(slots: int, rank: int, size_in: int, size_out: int, used_ranks: list[int]):
    g = torch.Generator().manual_seed(0)
    a = torch.zeros(slots, rank, size_in)
    b = torch.zeros(slots, size_out, rank)
    for s, r in enumerate(used_ranks, start=1):  # slot 0 stays zero: the base model
        a[s, :r] = torch.randn(r, size_in, generator=g) * 0.1
        b[s, :, :r] = torch.randn(size_out, r, generator=g) * 0.1
    scales = torch.tensor([0.0] + [2.0 / r for r in used_ranks])
    return a, b, scales


@pytest.mark.parametrize("repeat", [1, 4], ids=["gathered", "segmented"])
def test_reference_applies_each_tokens_own_adapter(repeat):
    a, b, scales = _stacks(5, 16, 40, 70, [4, 8, 16, 2])
    slots = torch.tensor([0, 1, 2, 3, 4, 1, 1, 0, 2, 4, 3, 3, 0, 1, 2, 4, 4, 4, 0, 1, 2, 3, 0] * repeat)
    x = torch.randn(len(slots), 40, generator=torch.Generator().manual_seed(1))
    got = lora_delta(x, slots, a, b, scales)
    for t in range(len(x)):
        s = int(slots[t])
        want = torch.zeros(70) if s == 0 else (b[s] @ (a[s] @ x[t])) * scales[s]
        assert s != 0 or not got[t].any()  # the base model's rows get exactly nothing
        torch.testing.assert_close(got[t], want, atol=1e-5, rtol=1e-5)
    alone = lora_delta(x[slots == 2], slots[slots == 2], a, b, scales)  # a token's row does not depend on the batch
    torch.testing.assert_close(alone, got[slots == 2], atol=0 if repeat == 1 else 1e-6, rtol=0)


@pytest.mark.parametrize("tokens,size_in,size_out", [(1, 64, 64), (9, 100, 130), (17, 40, 257)])
def test_triton_kernel_equals_the_reference(tokens, size_in, size_out):
    pytest.importorskip("triton")
    from kernels.triton_lora import lora_delta_triton
    a, b, scales = _stacks(4, 16, size_in, size_out, [16, 8, 3])
    x = torch.randn(tokens, size_in, generator=torch.Generator().manual_seed(2))
    slots = torch.randint(0, 4, (tokens,), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(lora_delta_triton(x, slots, a, b, scales), lora_delta(x, slots, a, b, scales),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="power of two"):
        lora_delta_triton(x, slots, a[:, :12], b[:, :, :12], scales)
