"""Token log-probabilities without materialising [b, t, v] fp32 logits (pitfall 11).

With a 128k vocabulary the full fp32 logits of a 16 x 512 batch take 4 GiB: more than the 4-bit
weights of an 8B model. We project hidden states to logits one chunk of positions at a time and keep
only the (b, t) log-probs. A chunk holds `chunk_size` tokens counted over the whole batch
(chunk_size // b positions of every row), whatever the batch size; a bf16/fp16 head's logits are made
fp32 an eighth of the chunk's rows at a time (about 2.5 bytes per logit alive), fp32 logits are
worked on whole (4 bytes). The backward pass recomputes one chunk's logits at a time and turns them into
their gradient in place (`_ChunkLogprobs`). The same chunks give the entropy of the whole next-token
distribution (PPO's entropy bonus) for the price of one softmax per chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint


def _logsumexp_(z: torch.Tensor) -> torch.Tensor:
    """torch.logsumexp(z, -1) computed as torch computes it (max, exp of the shifted values, sum, log, max
    added back), but overwriting z with exp(z - max) instead of allocating a copy of it."""
    m = z.amax(-1, keepdim=True)
    m.masked_fill_(m.abs() == float("inf"), 0)
    return z.sub_(m).exp_().sum(-1).log_().add_(m.squeeze(-1))


_PIECES = 8


def _softmax_dot(z: torch.Tensor, pieces: int = _PIECES) -> torch.Tensor:
    """sum_v softmax(z)_v z_v over the last dim, the softmax made for 1/`pieces` of the rows at a time: each
    row's values are those of the whole-tensor expression, with an eighth of a chunk alive instead of a chunk."""
    rows = z.reshape(-1, z.shape[-1])
    out = [torch.softmax(r, dim=-1).unsqueeze(-2) @ r.unsqueeze(-1) for r in _pieces(rows, pieces)]
    return torch.cat(out).reshape(z.shape[:-1])


def _head_rows(head: Callable, hidden: torch.Tensor) -> torch.Tensor:
    """head(hidden) for a (b, c, d) chunk as (b * c, v) logits, computed on its (b * c, d) rows: one plain
    matrix product. (Not viewed back to (b, c, v): the backward writes the gradient into the output's
    storage, and a view of a tensor changed in place gets a new gradient function that allocates a zero
    tensor of the whole storage.)

    A chunk of positions sliced out of (b, t, d) states is not contiguous, and torch.matmul cannot fold such a
    view into one matrix: it multiplies it batch by batch against the head weight expanded to (b, d, v) with a
    zero batch stride, which oneDNN (the CPU's bf16 matmul) first copies: the whole head weight (272 MB for a
    152k x 896 head) for every chunk. The rows are copied instead (c x d values, none when b = 1); every logit
    is the same product of the same values. (A view whose rows are evenly spaced, as one position of each row
    is, stays a view: a matrix product reads rows at any spacing.)
    """
    return head(hidden.reshape(-1, hidden.shape[-1]))


def _pieces(rows: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """A chunk's rows (its b * c positions along the first dimension) in `n` pieces."""
    return rows.split(max(1, -(-rows.shape[0] // n)))


def _n_pieces(logits: torch.Tensor) -> int:
    """fp32 logits are worked on in place, in one piece; low-precision ones an eighth of the rows at a time,
    so that their fp32 copy exists for one piece at a time. Every operation on them is row by row (a row's
    reductions, elementwise steps), so a row's values do not depend on the piece it is in."""
    return 1 if logits.dtype == torch.float32 else _PIECES


def _reuses_output(head: Callable) -> bool:
    """Whether the head's output storage may be overwritten after its graph is built: a linear layer's
    backward keeps its input and weight, never its output (a soft-capped head's tanh keeps its output)."""
    return isinstance(head, torch.nn.Linear)


class _ChunkLogprobs(torch.autograd.Function):
    """(log p(targets), entropy) of one chunk, with one fp32 chunk-sized tensor alive at a time.

    Autograd through `logits.float() / T`, gather and logsumexp keeps four fp32 (c, v) tensors alive at the
    backward (the logits, exp(z - lse), the gather's scattered gradient and their sum): 16 bytes per logit.
    Here the forward keeps nothing of size v (the hidden chunk and the (c,) logsumexp are saved), and the
    backward recomputes the logits and turns them into the gradient in place:
    d(z_y - lse)/dz = onehot(y) - softmax(z). fp32 logits are worked on as they are (4 bytes per logit
    alive); a bf16 head's logits are made fp32 an eighth of the rows at a time, in the forward as in the
    backward, and with a linear head the bf16 logits' storage takes the bf16 gradient: 2.5 bytes per logit
    alive at most (the bf16 logits, and one eighth's fp32 copy), against 6 for one fp32 copy of the whole
    chunk. Every operation is the one autograd would run, on the same values and in the same order, so the
    values and gradients are those of the plain expression to the bit. The entropy, when asked for, is
    returned without a graph.
    """

    @staticmethod
    def forward(ctx, hidden, targets, head, temperature: float, with_entropy: bool):
        out = _head_rows(head, hidden)
        n = _n_pieces(out)
        picked, inner, lse = [], [], []
        for rows, y in zip(_pieces(out, n), _pieces(targets.reshape(-1), n), strict=True):
            z = rows.float()  # the head's own output when it is fp32; else one piece's fp32 copy
            if temperature != 1.0:
                z.div_(temperature)
            picked.append(z.gather(-1, y.unsqueeze(-1)).squeeze(-1))
            if with_entropy:
                inner.append(_softmax_dot(z, _PIECES if n == 1 else 1))  # an eighth of the rows at a time
            lse.append(_logsumexp_(z))
            del z
        del out
        picked, lse = torch.cat(picked).view(targets.shape), torch.cat(lse).view(targets.shape)
        ctx.save_for_backward(hidden, targets, lse)
        ctx.head, ctx.temperature = head, temperature
        entropy = lse - torch.cat(inner).view(targets.shape) if with_entropy else lse.new_empty(0)
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad, _grad_entropy):
        hidden, targets, lse = ctx.saved_tensors
        head, temperature = ctx.head, ctx.temperature
        with torch.enable_grad():
            h = hidden.detach().requires_grad_(ctx.needs_input_grad[0])
            out = _head_rows(head, h)
        n = _n_pieces(out)
        if n == 1:  # fp32: the gradient is made in place, in the head's output unless the head keeps it
            grad_out = out.detach() if _reuses_output(head) else out.detach().clone()
            source = grad_out
        else:  # from each piece's fp32 copy into the low-precision output's storage (or a new one)
            grad_out = out.detach() if _reuses_output(head) else torch.empty_like(out)
            source = out.detach()
        pieces = [_pieces(t, n) for t in (source, grad_out, targets.reshape(-1), grad.reshape(-1), lse.reshape(-1))]
        for rows, dst, y, g, m in zip(*pieces, strict=True):
            z = rows.float()  # fp32: the rows themselves
            if temperature != 1.0:
                z.div_(temperature)
            # z -> grad * (onehot(y) - softmax(z)), as autograd sums the gather's and the logsumexp's terms
            z.sub_(m.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
            z.scatter_add_(-1, y.unsqueeze(-1), g.unsqueeze(-1))
            if temperature != 1.0:
                z.div_(temperature)
            if n > 1:
                dst.copy_(z)
            del z
        del pieces, source
        # accumulates into the head's own trainable leaves as well, as a re-entrant checkpoint does
        torch.autograd.backward(out, grad_out)
        return h.grad if ctx.needs_input_grad[0] else None, None, None, None, None


def _chunk_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: Callable, temperature: float) -> torch.Tensor:
    return _ChunkLogprobs.apply(hidden, targets, head, temperature, False)[0]


def _chunk_logprobs_logged_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: Callable, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ChunkLogprobs.apply(hidden, targets, head, temperature, True)


def _chunk_logprobs_trained_entropy(
    hidden: torch.Tensor, targets: torch.Tensor, head: Callable, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropy both with a graph (an entropy bonus), by plain autograd: checkpoint it."""
    logits = _head_rows(head, hidden).float().view(*hidden.shape[:-1], -1)
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    lse = torch.logsumexp(logits, dim=-1)
    probs = torch.softmax(logits, dim=-1)
    entropy = lse - (probs.unsqueeze(-2) @ logits.unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return picked - lse, entropy


def _over_chunks(
    fn: Callable,
    hidden: torch.Tensor,
    head: Callable,
    targets: torch.Tensor,
    chunk_size: int,
    *args,
    checkpointed: bool = False,
):
    """fn(hidden chunk, targets chunk, head, *args) over chunks of positions; `checkpointed`: fn is plain
    autograd, checkpointed when gradients flow (the others recompute their logits in their own backward)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    checkpointed = (
        checkpointed
        and torch.is_grad_enabled()
        and (hidden.requires_grad or any(p.requires_grad for p in getattr(head, "parameters", lambda: [])()))
    )
    out = []
    positions = max(1, chunk_size // max(hidden.shape[0], 1))
    for start in range(0, hidden.shape[1], positions):
        h = hidden[:, start : start + positions]
        y = targets[:, start : start + positions]
        if checkpointed:
            out.append(checkpoint(fn, h, y, head, *args, use_reentrant=False))
        else:
            out.append(fn(h, y, head, *args))
    return out


def chunked_logprobs(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(targets) under softmax(head(hidden) / temperature), computed chunk by chunk.

    hidden: (b, t, d) states whose next token is `targets`; targets: (b, t) token ids;
    head: maps (n, d) -> (n, v) (the model's lm_head, given a chunk's b x c rows at once); chunk_size: tokens
    per chunk over the whole batch (at least one position per chunk). Returns (b, t) fp32 log-probs.
    """
    return torch.cat(_over_chunks(_chunk_logprobs, hidden, head, targets, chunk_size, temperature), dim=1)


def chunked_logprobs_entropy(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    targets: torch.Tensor,
    chunk_size: int = 512,
    temperature: float = 1.0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(targets), entropy of the whole next-token distribution), both (b, t) fp32, chunk by chunk.

    Arguments as in `chunked_logprobs`; the log-probs are bit-identical to its. The entropy is
    -sum_v p_v log p_v of softmax(head(hidden) / temperature) at every position: the exact value whose
    gradient an entropy bonus needs (the sampled token's -log p has zero expected gradient on-policy).
    `entropy_grad=False` returns it without a graph (for logging), at no extra backward memory.
    """
    if entropy_grad:
        chunks = _over_chunks(
            _chunk_logprobs_trained_entropy, hidden, head, targets, chunk_size, temperature, checkpointed=True
        )
    else:
        chunks = _over_chunks(_chunk_logprobs_logged_entropy, hidden, head, targets, chunk_size, temperature)
    return torch.cat([lp for lp, _ in chunks], dim=1), torch.cat([h for _, h in chunks], dim=1)
