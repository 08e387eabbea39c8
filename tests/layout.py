"""The RolloutBatch layout every engine must produce (shared by the local and vLLM engine tests)."""


def assert_batch_layout(batch, prompts: list[list[int]], is_eos, max_new_tokens: int, pad_token_id: int) -> list[int]:
    """Left-padded prompts; responses a contiguous prefix that ends at the first EOS (included)
    or at ``max_new_tokens``; pad ids and log-prob 0 after it. Returns each response's length."""
    P = batch.prompt_width
    assert P == max(len(p) for p in prompts)
    lengths = []
    for i, p in enumerate(prompts):
        assert batch.input_ids[i, P - len(p) : P].tolist() == p
        assert batch.attention_mask[i, :P].tolist() == [0] * (P - len(p)) + [1] * len(p)
        m = batch.response_mask[i]
        n = int(m.sum())
        assert m.tolist() == [True] * n + [False] * (len(m) - n)  # a contiguous prefix
        eos_at = [j for j, t in enumerate(batch.response_ids[i, :n].tolist()) if is_eos(t)]
        if batch.finished[i]:
            assert eos_at == [n - 1]  # stopped at its first EOS, which is part of the response
        else:
            assert eos_at == [] and n == max_new_tokens
        assert bool((batch.response_ids[i, n:] == pad_token_id).all())
        assert bool((batch.rollout_logp[i, n:] == 0).all())
        lengths.append(n)
    assert bool(batch.finished.any())
    return lengths
