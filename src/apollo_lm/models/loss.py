"""The output layer and its cross-entropy, optionally in chunks of rows that never hold the whole logits tensor.

The plain path (``chunk == 0``) computes the logits of every position, upcasts them to fp32 and calls
``F.cross_entropy``: with a 50k vocabulary and 16k tokens a step that is 3.3 GB of fp32 logits, written and read
several times (upcast, softmax, its gradient, the downcast for the matmuls): memory traffic and memory, not
matmul work (how much of a GPU step it costs is what bench/throughput.py --loss-chunk measures).

The chunked path (``chunk > 0``) runs the output matmul, the log-sum-exp and the gradient of the loss with
respect to the logits for ``chunk`` rows at a time, and finishes each chunk's two gradient matmuls (hidden
states and output weight) inside the forward, so only one chunk of logits is ever alive. Since the loss is the
last node of the graph, its backward only scales the stored gradients by the incoming one. Same FLOPs, same
precision rules as the plain path (matmuls in the autocast dtype, softmax and loss in fp32), and the same mean
over the targets that are not ``-100``; the results agree to floating-point rounding (tested).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                chunk: int, need_grad: bool) -> torch.Tensor:
        h2 = h.reshape(-1, h.size(-1))
        t = targets.reshape(-1)
        if t.numel() != h2.size(0):
            raise ValueError(f"{t.numel()} targets for {h2.size(0)} positions")
        valid = t != IGNORE
        count = valid.sum().to(torch.float32)  # the mean of F.cross_entropy: over the scored targets
        autocast = torch.is_autocast_enabled(h.device.type)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h2) if need_grad else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
            if need_grad and bias is not None else None
        for s in range(0, h2.size(0), chunk):
            hc, tc, vc = h2[s:s + chunk], t[s:s + chunk], valid[s:s + chunk]
            tc_safe = tc.clamp(min=0)
            logits = F.linear(hc, weight, bias).float()  # (n, vocab): the only logits alive
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, tc_safe[:, None]).squeeze(1)
            total = total + ((lse - picked) * vc).sum()
            if not need_grad:
                continue
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            g.scatter_add_(1, tc_safe[:, None], torch.full_like(picked[:, None], -1.0))  # minus the one-hot target
            g.mul_((vc.to(g.dtype) / count)[:, None])  # d mean / d logits; ignored rows get none
            if grad_b is not None:
                grad_b += g.sum(0)
            # under autocast the matmuls cast as the plain path's backward does; otherwise in the weight's dtype
            gm, hm = (g, hc) if autocast else (g.to(weight.dtype), hc.to(weight.dtype))
            grad_h[s:s + chunk] = gm @ weight
            grad_w += gm.t() @ hm
        ctx.grads = (grad_h.view_as(h) if need_grad else None,
                     grad_w.to(weight.dtype) if need_grad else None,
                     grad_b.to(bias.dtype) if grad_b is not None else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        return (gh * grad_out.to(gh.dtype) if gh is not None and ctx.needs_input_grad[0] else None,
                gw * grad_out.to(gw.dtype) if gw is not None and ctx.needs_input_grad[1] else None,
                gb * grad_out.to(gb.dtype) if gb is not None and ctx.needs_input_grad[2] else None,
                None, None, None)


def head_and_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor | None,
                  chunk: int = 0) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(logits, loss) of the output layer ``F.linear(h, weight, bias)`` and the mean cross-entropy against
    ``targets`` (``-100`` = not scored). ``chunk > 0`` with targets computes the loss ``chunk`` rows at a time
    and returns no logits (see the module docstring); otherwise the logits and ``F.cross_entropy`` in fp32."""
    if chunk > 0 and targets is not None:
        need = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        return None, _ChunkedLinearCrossEntropy.apply(h, weight, bias, targets, chunk, need)
    logits = F.linear(h, weight, bias)
    loss = None
    if targets is not None:
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE)
    return logits, loss
