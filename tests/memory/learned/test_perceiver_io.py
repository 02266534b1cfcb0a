"""Perceiver IO output queries: the decoder against its per-head reference, the query array's
properties (any number of outputs, order follows the queries, reads only the latents), and the
record-extraction data it is benchmarked on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memstack.data.synthetic.records import records, records_vocab
from memstack.memory.learned.perceiver_io import OutputQueries, output_queries_reference
from tolerances import assert_close


def decoder(**kw) -> OutputQueries:
    torch.manual_seed(0)
    return OutputQueries(32, 4, 48, init_std=0.3, **kw).double()


@pytest.mark.parametrize("residual", [False, True])
def test_decoder_matches_the_per_head_reference(residual):
    dec = decoder(query_residual=residual).float()             # RMSNorm computes in fp32: compare at fp32
    z, q = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    assert_close(dec(z, q), output_queries_reference(dec, z, q).float())


def test_output_size_and_order_follow_the_queries_and_only_latents_matter():
    dec = decoder()
    z, q = torch.randn(1, 6, 32, dtype=torch.float64), torch.randn(1, 7, 32, dtype=torch.float64)
    out = dec(z, q)
    assert out.shape == (1, 7, 32)
    perm = torch.tensor([3, 0, 6, 1, 5, 2, 4])
    assert_close(dec(z, q[:, perm]), out[:, perm])              # queries are independent of each other
    assert_close(dec(z, q[:, :2]), out[:, :2])                  # any subset, any count
    assert_close(dec(z[:, torch.randperm(6)], q), out)          # the latent array is a set (no positions)
    assert not torch.allclose(dec(z + 0.5, q), out)


def test_learned_query_array():
    dec = decoder(n_queries=4)
    z = torch.randn(3, 5, 32, dtype=torch.float64)
    out = dec(z)
    assert out.shape == (3, 4, 32)
    assert_close(out, dec(z, dec.queries.expand(3, -1, -1)))
    with pytest.raises(ValueError, match="no learned queries"):
        decoder()(z)


def test_records_are_what_they_say():
    F, V = 5, 7
    r = records(20, n_fields=F, n_values=V, n_noise=6, n_noise_ids=3, length=20, seed=4)
    assert r.inputs.shape == (20, 20) and r.targets.shape == (20, F) and r.queries.shape == (20, F)
    assert (r.queries == np.arange(2, 2 + F)).all()
    assert records_vocab(F, V, 3) == 2 + F + V + 3 and r.inputs.max() < 2 + F + V + 3
    for x, y in zip(r.inputs, r.targets):
        body = x[x != 0]
        assert len(body) == 2 * F + 6 and (x[2 * F + 6:] == 0).all()
        pos = {int(t): i for i, t in enumerate(body) if 2 <= t < 2 + F}
        assert sorted(pos) == list(range(2, 2 + F))                       # every field exactly once
        for f, i in pos.items():
            assert body[i + 1] == y[f - 2] and 2 + F <= body[i + 1] < 2 + F + V   # followed by its value
    again = records(20, n_fields=F, n_values=V, n_noise=6, n_noise_ids=3, length=20, seed=4)
    assert (again.inputs == r.inputs).all() and (again.targets == r.targets).all()
    assert not (records(20, n_fields=F, n_values=V, n_noise=6, n_noise_ids=3, length=20, seed=5).inputs
                == r.inputs).all()
    with pytest.raises(ValueError, match="length >= 2 \\* n_fields"):
        records(2, n_fields=5, n_noise=6, length=12)


def test_decoder_learns_to_read_a_field_from_latents():
    """A tiny version of the benchmark's claim: given latents holding (key, value) vectors, the
    queries decoder learns to return the value stored under each key, far above chance."""
    torch.manual_seed(0)
    D, N, K = 32, 6, 6
    keys = torch.randn(K, D)
    vals = torch.randn(8, D)
    dec = OutputQueries(D, 4, 64, init_std=0.1)
    head = torch.nn.Linear(D, 8)
    opt = torch.optim.Adam([*dec.parameters(), *head.parameters()], lr=3e-3)

    def data(n, g):
        v = torch.randint(0, 8, (n, K), generator=g)
        z = keys + vals[v]                                                # latent k holds key k + value
        return z[:, torch.randperm(N, generator=g)] if N == K else z, v

    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        z, v = data(32, g)
        # query key k -> value of latent whose key is k (the latents are shuffled: content, not position)
        loss = torch.nn.functional.cross_entropy(head(dec(z, keys.expand(32, -1, -1))).reshape(-1, 8), v.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    z, v = data(500, torch.Generator().manual_seed(2))
    with torch.no_grad():
        acc = (head(dec(z, keys.expand(500, -1, -1))).argmax(-1) == v).float().mean()
    assert acc > 0.9                                                      # chance 1/8
