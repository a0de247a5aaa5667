"""ops: chunked log-probs equal full-logits log-probs; masked statistics by hand."""

import math

import pytest
import torch

from lowmem_rlhf.ops import chunked_logprobs, chunked_logprobs_entropy, masked_mean


def _reference(hidden, weight, targets, temperature=1.0):
    logits = (hidden @ weight.T).float() / temperature
    return torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 7, 16, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_match_full_logits(chunk, temperature):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 16, 8, generator=g)
    weight = torch.randn(50, 8, generator=g)
    targets = torch.randint(50, (3, 16), generator=g)
    head = lambda h: h @ weight.T  # noqa: E731
    got = chunked_logprobs(hidden, head, targets, chunk, temperature)
    assert got.shape == (3, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(hidden, weight, targets, temperature), atol=1e-5, rtol=0)


def test_chunked_logprobs_chunk_counts_tokens_over_the_batch():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(3, 16, 8, generator=g), torch.randn(50, 8, generator=g)
    targets = torch.randint(50, (3, 16), generator=g)
    seen = []

    def head(h):
        # the chunk's rows as one (tokens, d) matrix: one plain matrix product on every device
        assert h.dim() == 2 and h.stride(-1) == 1
        seen.append(h.shape[0])
        return h @ weight.T

    got = chunked_logprobs(hidden, head, targets, 7)
    assert max(seen) == 6 and sum(seen) == 48  # 7 // 3 = 2 positions of each of the 3 rows per chunk
    torch.testing.assert_close(got, _reference(hidden, weight, targets, 1.0), atol=1e-5, rtol=0)
    seen.clear()
    chunked_logprobs(hidden, head, targets, 2)  # fewer tokens than rows: still one position per chunk
    assert seen == [3] * 16


def test_chunked_logprobs_gradients_match_full_logits():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g)
    targets = torch.randint(30, (2, 9), generator=g)
    chunked_logprobs(hidden, lambda h: h @ weight.T, targets, 4).sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    _reference(hidden, weight, targets).sum().backward()
    torch.testing.assert_close(got, hidden.grad, atol=1e-5, rtol=0)


def test_chunked_logprobs_low_precision_hidden_computes_in_fp32():
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 5, 8, generator=g).bfloat16()
    weight = torch.randn(20, 8, generator=g).bfloat16()
    targets = torch.randint(20, (2, 5), generator=g)
    got = chunked_logprobs(hidden, lambda h: h @ weight.T, targets, 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, _reference(hidden, weight, targets), atol=1e-5, rtol=0)


def test_chunked_logprobs_rejects_bad_chunk():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(torch.zeros(1, 2, 3), lambda h: h, torch.zeros(1, 2, dtype=torch.long), 0)


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[True, False, True], [False, False, False]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    torch.testing.assert_close(masked_mean(x, mask, dim=1), torch.tensor([2.0, 0.0]))
    # plain-loop reference on random data
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 7, generator=g)
    mask = torch.rand(4, 7, generator=g) > 0.4
    vals = [x[i, j].item() for i in range(4) for j in range(7) if mask[i, j]]
    assert masked_mean(x, mask).item() == pytest.approx(sum(vals) / len(vals), abs=1e-6)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_entropy_matches_full_softmax_values_and_gradients(chunk, temperature):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    weight = (2 * torch.randn(50, 8, generator=g)).requires_grad_()
    targets = torch.randint(50, (3, 16), generator=g)
    cot = torch.randn(3, 16, generator=g)  # arbitrary per-token weights, so every position's gradient counts
    logp, entropy = chunked_logprobs_entropy(hidden, lambda h: h @ weight.T, targets, chunk, temperature)
    (entropy * cot).sum().backward()
    got_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    full = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    want = -(full.exp() * full).sum(-1)
    (want * cot).sum().backward()
    torch.testing.assert_close(entropy, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_grads[0], hidden.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_grads[1], weight.grad, atol=1e-4, rtol=1e-4)
    assert float(entropy.detach().min()) > 0 and float(entropy.detach().max()) <= math.log(50) + 1e-5
    # the log-probs are exactly chunked_logprobs', so PPO's first-minibatch ratio stays exactly 1
    assert torch.equal(logp.detach(), chunked_logprobs(hidden, lambda h: h @ weight.T, targets, chunk, temperature))


def test_entropy_for_logging_only_has_no_graph_and_leaves_logprob_gradients_alone():
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(30, 8, generator=g)
    targets = torch.randint(30, (2, 6), generator=g)
    head = lambda h: h @ weight.T  # noqa: E731
    logp, entropy = chunked_logprobs_entropy(hidden, head, targets, 4, entropy_grad=False)
    assert logp.requires_grad and not entropy.requires_grad
    logp.sum().backward()
    got = hidden.grad.clone()
    hidden.grad = None
    chunked_logprobs(hidden, head, targets, 4).sum().backward()
    assert torch.equal(got, hidden.grad)


def _plain(hidden, head, targets, temperature=1.0, entropy=False):
    """The log-prob expression autograd differentiates by itself: four fp32 (t, v) tensors at its backward.
    The head runs on the chunk's rows as one matrix, as chunked_logprobs runs it."""
    logits = head(hidden.reshape(-1, hidden.shape[-1])).view(*hidden.shape[:-1], -1).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = torch.logsumexp(logits, dim=-1)
    logprobs = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not entropy:
        return logprobs
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)
        return logprobs, lse - (probs.unsqueeze(-2) @ logits.unsqueeze(-1)).squeeze(-1).squeeze(-1)


def _grads(fn, hidden, head, targets, weights):
    hidden = hidden.detach().requires_grad_(True)
    head.weight.grad = None
    out = fn(hidden, head, targets)
    out = out[0] if isinstance(out, tuple) else out
    (out * weights).sum().backward()
    return out.detach(), hidden.grad, head.weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [False, True])
def test_lean_chunk_backward_equals_plain_autograd_to_the_bit(dtype, temperature, entropy):
    """The custom backward (logits recomputed into one buffer, gradient made in place) runs autograd's own
    operations on the same values: log-probs, logged entropy and the gradients of the hidden states and
    of a trainable linear head equal plain autograd's bit for bit, in fp32 and with a bf16 head."""
    g = torch.Generator().manual_seed(4)
    head = torch.nn.Linear(16, 300, bias=True).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.randn(300, 16, generator=g))
        head.bias.copy_(torch.randn(300, generator=g))
    hidden = torch.randn(3, 11, 16, generator=g).to(dtype)[:, 1:]  # a strided slice, as the callers pass
    targets = torch.randint(300, (3, 10), generator=g)
    weights = torch.randn(3, 10, generator=g)  # a non-uniform upstream gradient

    def lean(h, hd, y):
        if entropy:
            return chunked_logprobs_entropy(h, hd, y, 7, temperature, entropy_grad=False)
        return chunked_logprobs(h, hd, y, 7, temperature)

    def plain(h, hd, y):  # the same chunks (7 // 3 = 2 positions), each by plain autograd
        parts = [_plain(h[:, s : s + 2], hd, y[:, s : s + 2], temperature, entropy) for s in range(0, 10, 2)]
        if entropy:
            return torch.cat([p[0] for p in parts], 1), torch.cat([p[1] for p in parts], 1)
        return torch.cat(parts, 1)

    for got, want in zip(
        _grads(lean, hidden, head, targets, weights), _grads(plain, hidden, head, targets, weights), strict=True
    ):
        assert got.dtype == want.dtype and torch.equal(got, want), (got - want).abs().max()
    if entropy:
        got_h, want_h = lean(hidden, head, targets)[1], plain(hidden, head, targets)[1]
        assert not got_h.requires_grad and torch.equal(got_h, want_h)
    # against fp32 log-softmax of fp32 logits: a bf16 head rounds each logit twice to 8 significant bits
    # (the matmul's output, then plus the bias: relative error 2^-9 each), which moves a log-prob by at most
    # twice the largest logit error
    logits = (hidden.float() @ head.weight.float().T + head.bias.float()) / temperature
    ref = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    atol = 1e-5 if dtype == torch.float32 else 4 * 2**-9 * logits.abs().max().item()
    torch.testing.assert_close(_grads(lean, hidden, head, targets, weights)[0], ref, atol=atol, rtol=0)


def test_lean_chunk_backward_keeps_an_eighth_of_a_chunk_in_fp32():
    """At its backward a chunk of c positions x v logits holds at most 2.5 bytes per logit with a bf16 head
    (the bf16 logits, whose storage takes the bf16 gradient, and the fp32 copy of an eighth of the rows at
    a time, turned into their gradient in place), against 16 + 2 by plain autograd."""
    from benchmarks.memory import MemoryTracer

    g = torch.Generator().manual_seed(5)
    c, v, d = 64, 8192, 32
    head = torch.nn.Linear(d, v, bias=False).bfloat16().requires_grad_(False)
    targets = torch.randint(v, (1, c), generator=g)
    peaks = {}
    for name, fn in [
        ("lean", lambda h: chunked_logprobs(h, head, targets, c)),
        ("plain", lambda h: _plain(h, head, targets)),
    ]:
        hidden = torch.randn(1, c, d, generator=g).bfloat16().requires_grad_(True)
        out = fn(hidden)
        with MemoryTracer(round_to=1, gemm_transient=False, fake=False) as tracer:
            out.sum().backward()
        # the tracer also counts the head's weight, which it first sees in the backward's matmul
        peaks[name] = tracer.peak - (head.weight.nbytes if name == "lean" else 0)
    per_logit = {k: n / (c * v) for k, n in peaks.items()}
    assert 2.5 <= per_logit["lean"] < 2.55, per_logit  # bf16 logits/gradient + 1/8 fp32, plus (c, d) and (c,)
    assert per_logit["plain"] >= 16.0, per_logit


def test_logged_entropy_made_in_row_pieces_equals_the_whole_softmax_to_the_bit():
    """The logged entropy's softmax is made for an eighth of a chunk's rows at a time: every row's value is
    the whole-chunk expression's (40 rows in pieces of 5)."""
    g = torch.Generator().manual_seed(6)
    head = torch.nn.Linear(16, 300, bias=False)
    hidden, targets = torch.randn(4, 10, 16, generator=g), torch.randint(300, (4, 10), generator=g)
    got = chunked_logprobs_entropy(hidden, head, targets, 40, 0.7, entropy_grad=False)
    want = _plain(hidden, head, targets, 0.7, entropy=True)
    assert torch.equal(got[0], want[0].detach()) and torch.equal(got[1], want[1])
