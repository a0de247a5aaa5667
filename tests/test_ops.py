"""ops: chunked log-probs equal full-logits log-probs; masked statistics by hand."""

import pytest
import torch

from lowmem_rlhf.ops import chunked_logprobs, masked_mean


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
