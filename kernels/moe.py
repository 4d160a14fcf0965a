"""Mixture-of-Experts in plain torch: the router's top-k, and the experts of a step's tokens computed grouped by
expert (the CPU path, the training path and the test oracle of kernels/triton_moe.py).

A step's tokens each pick `top_k` of `E` experts. Rather than loop over tokens, the (token, slot) pairs are sorted by
expert and every expert that received any runs once over its rows: gate/up projection, SiLU(gate) * up, down
projection. Each pair's result is scaled by its router weight and a token's pairs are summed in ascending expert
order (transformers' order), so a token's output depends on its own row and its experts only.

Expert weights are stacked: w13 [E, 2 * I, H] holds each expert's gate rows then its up rows, w2 [E, H, I] its down
projection (what transformers' `gate_proj`, `up_proj`, `down_proj` of experts.N become, models/moe.py).
"""
import torch
import torch.nn.functional as F


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts in float32, the top_k of them, and (renormalize) their weights rescaled to sum to 1
    (Mixtral, Qwen3-MoE with norm_topk_prob); returns weights float32 [T, top_k] and expert ids int64 [T, top_k],
    best first."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def sort_by_expert(topk_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs, flattened as token * top_k + slot, in order of expert (stable: by token within an
    expert), and the number of pairs each expert received [num_experts]."""
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, counts


def combine(pair_out: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """pair_out [T * top_k, H] (one row per pair, in token-major order) -> [T, H]: each pair scaled by its router
    weight, then a token's pairs added one at a time in ascending expert order, starting from its lowest."""
    tokens, top_k = topk_ids.shape
    weighted = pair_out.view(tokens, top_k, -1) * topk_weights.unsqueeze(-1).to(pair_out.dtype)
    if top_k == 1:
        return weighted[:, 0]
    slots = topk_ids.argsort(dim=-1)
    weighted = weighted.gather(1, slots.unsqueeze(-1).expand_as(weighted))
    out = weighted[:, 0]
    for j in range(1, top_k):
        out = out + weighted[:, j]
    return out


def _linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T. On the CPU, float32, 2 to 96 rows: as (w @ x.T).T, which MKL runs 1.3-1.8x faster at an expert's
    size (1024 x 5632, 2 and 4 rows, Zen 3; one row keeps its GEMV, which is faster): models/cpu_linear.py."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and 2 <= x.shape[0] <= 96:
        return torch.mm(w, x.t()).t()
    return F.linear(x, w)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """The experts' output for x [T, H]: sum over a token's top_k experts e of weight * w2[e] @ (SiLU(g) * u),
    (g, u) = w13[e] @ x. One matmul per expert that received a pair, over all its rows; differentiable."""
    tokens, top_k = topk_ids.shape
    if tokens == 0:
        return x.new_zeros(x.shape)
    order, counts = sort_by_expert(topk_ids, w13.shape[0])
    rows = x[order // top_k]
    outs = []
    start = 0
    for expert, n in enumerate(counts.tolist()):  # one host sync per call: the eager path only
        if n == 0:
            continue
        gate, up = _linear(rows[start:start + n], w13[expert]).chunk(2, dim=-1)
        outs.append(_linear(F.silu(gate) * up, w2[expert]))
        start += n
    sorted_out = torch.cat(outs)
    pair_out = sorted_out[torch.argsort(order)]  # back to token-major order (a gather, so autograd follows)
    return combine(pair_out, topk_weights, topk_ids)


@torch.library.custom_op("tokenmill::fused_moe", mutates_args=())
def fused_moe_op(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                 topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe as one torch op: torch.compile sees a single call of known output shape instead of tracing (and
    failing on) its per-expert loop. No autograd: serving only."""
    return fused_moe(x, w13, w2, topk_weights, topk_ids).contiguous()


@fused_moe_op.register_fake
def _(x, w13, w2, topk_weights, topk_ids):
    return x.new_empty(x.shape)


def load_balancing_loss(router_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss over router_logits [T, E] of one or more layers: E * sum_e f_e * P_e,
    f_e the pairs routed to e per token and P_e e's mean router probability; top_k at perfect balance. This is
    transformers' `load_balancing_loss_func` (unmasked), so `router_aux_loss_coef` means what it means there."""
    num_experts = router_logits.shape[-1]
    probs = torch.softmax(router_logits.float(), dim=-1)
    _, ids = torch.topk(probs, top_k, dim=-1)
    chosen = F.one_hot(ids, num_experts).float().sum(dim=1)  # [T, E]: 1 where e is among the token's top_k
    fraction = chosen.mean(dim=0)
    return num_experts * (fraction * probs.mean(dim=0)).sum()
