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
        seen.append(h.shape[0] * h.shape[1])
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
