"""The batched LoRA product of multi-adapter serving: for each token t with adapter slot s = slots[t],

    out[t] = scale[s] * B[s] @ (A[s] @ x[t])         (slot 0: no adapter, its A and B are zeros)

with A stacked [slots, r, in] and B [slots, out, r] (adapters of lower rank zero-padded to r). `lora_delta` is the
plain-torch reference and the CPU path: up to GATHER_ROWS tokens (decode steps) each token's A and B are gathered
and multiplied in one batched product; past that (prefill chunks) a segmented product, one pair of GEMMs per
adapter present (rows gathered, results scattered back), so a chunk of one adapter costs what that adapter alone
does.
`lora_delta_triton` (kernels/triton_lora.py) is the CUDA kernel, checked against it."""
import torch


GATHER_ROWS = 64  # up to this many tokens, A and B are gathered per token


def segments(slots: torch.Tensor) -> list[tuple[int, torch.Tensor | slice]]:
    """(slot, its rows) for every adapter present: computed once per step, shared by every module. Rows that are
    one contiguous run become a slice (no gather)."""
    found = []
    for slot in torch.unique(slots).tolist():
        if slot == 0:
            continue
        rows = (slots == slot).nonzero().squeeze(1)
        first, last = int(rows[0]), int(rows[-1])
        found.append((slot, slice(first, last + 1) if last - first + 1 == len(rows) else rows))
    return found


def lora_delta(x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor,
               plan: list[tuple[int, torch.Tensor | slice]] | None = None,
               ranks: list[int] | None = None) -> torch.Tensor:
    """x [T, in], slots [T] int, a [S, r, in], b [S, out, r], scales [S] -> [T, out] in x's dtype. `plan`: the
    step's segments(slots); `ranks`: each slot's own rank (the stacks' padding skipped)."""
    plan = plan if plan is not None else segments(slots)
    if x.shape[0] <= GATHER_ROWS:
        # a decode step: one gathered batched product instead of two GEMMs per adapter; each row its own product,
        # so a row's result does not depend on the others
        r = max(ranks[slot] for slot, _ in plan) if ranks is not None else a.shape[1]
        hidden = torch.bmm(a[slots, :r], x.unsqueeze(2))
        return (torch.bmm(b[slots, :, :r], hidden).squeeze(2) * scales[slots].unsqueeze(1)).to(x.dtype)
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for slot, rows in plan:
        r = ranks[slot] if ranks is not None else a.shape[1]
        hidden = x[rows] @ a[slot, :r].t()
        out[rows] = (hidden @ b[slot, :, :r].t()) * scales[slot].to(x.dtype)
    return out
