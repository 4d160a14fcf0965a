"""The batched LoRA product of multi-adapter serving: for each token t with adapter slot s = slots[t],

    out[t] = scale[s] * B[s] @ (A[s] @ x[t])         (slot 0: no adapter, its A and B are zeros)

with A stacked [slots, r, in] and B [slots, out, r] (adapters of lower rank zero-padded to r). `lora_delta` is the
plain-torch reference and the CPU path: a segmented product, one pair of GEMMs per adapter present in the batch
(rows gathered, results scattered back), so a batch of one adapter costs what that adapter alone does.
`lora_delta_triton` (kernels/triton_lora.py) is the CUDA kernel, checked against it."""
import torch


def lora_delta(x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               scales: torch.Tensor) -> torch.Tensor:
    """x [T, in], slots [T] int, a [S, r, in], b [S, out, r], scales [S] -> [T, out] in x's dtype."""
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for slot in torch.unique(slots).tolist():
        if slot == 0:
            continue
        rows = (slots == slot).nonzero().squeeze(1)
        hidden = x[rows] @ a[slot].t()
        out[rows] = (hidden @ b[slot].t()) * scales[slot].to(x.dtype)
    return out
