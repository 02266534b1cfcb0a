"""Row-sparse optimizers and their optimizer groups: lazy Adam with per-row steps, row-wise
Adagrad, only touched rows change, no dense table-sized tensor is ever allocated in backward
and step, state_dict round trips, and the trainer clips sparse gradients like dense ones."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from memstack.backbone.model import build_model
from memstack.config import BackboneConfig, ModelConfig
from memstack.errors import ConfigError
from memstack.memory.sparse.config import EngramConfig, PKMConfig
from memstack.ops.gather import gather_rows
from memstack.train.config import GroupConfig, TrainConfig
from memstack.train.optim import build_optimizer
from memstack.memory.sparse.row_optim import MultiOptimizer, RowSparseOptimizer, grad_norm_and_clip
from tolerances import assert_close

BB = BackboneConfig(vocab_size=97, d_model=32, n_layers=2, n_heads=4, seg_len=16)


def _sparse_step(opt, w, idx, gout):
    opt.zero_grad()
    (gather_rows(w, idx) * gout).sum().backward()
    opt.step()


def test_lazy_adam_row_equals_torch_adam_on_that_row():
    """A row updated at steps 1 and 3 (skipped at 2) moves exactly as torch Adam would with
    that row's own two gradients: per-row bias correction, no decay of untouched moments."""
    w = torch.nn.Parameter(torch.randn(6, 4))
    ref = torch.nn.Parameter(w.detach()[2:3].clone())
    opt = RowSparseOptimizer([w], lr=0.1, betas=(0.9, 0.99), eps=1e-8, optimizer="adam")
    ropt = torch.optim.Adam([ref], lr=0.1, betas=(0.9, 0.99), eps=1e-8)
    before = w.detach().clone()
    g1, g3 = torch.randn(1, 4), torch.randn(1, 4)
    _sparse_step(opt, w, torch.tensor([2]), g1)
    _sparse_step(opt, w, torch.tensor([4]), torch.randn(1, 4))      # row 2 untouched here
    _sparse_step(opt, w, torch.tensor([2]), g3)
    for g in (g1, g3):
        ropt.zero_grad()
        ref.grad = g.clone()
        ropt.step()
    assert_close(w.detach()[2:3], ref.detach())
    untouched = [0, 1, 3, 5]
    assert torch.equal(w.detach()[untouched], before[untouched])
    st = opt.state[w]
    assert st["row_step"].tolist() == [0, 0, 2, 0, 1, 0]
    assert torch.equal(st["exp_avg"][untouched], torch.zeros(4, 4))


def test_rowwise_adagrad_keeps_one_scalar_per_row():
    w = torch.nn.Parameter(torch.randn(5, 3))
    opt = RowSparseOptimizer([w], lr=0.5, eps=1e-10, optimizer="rowwise_adagrad")
    w0 = w.detach().clone()
    g = torch.tensor([[1.0, 2.0, 2.0], [0.5, 0.5, 0.5]])
    _sparse_step(opt, w, torch.tensor([1, 1, 3])[[0, 2]], g)        # rows 1, 3
    acc = opt.state[w]["sum"]
    assert acc.shape == (5,)
    assert_close(acc, torch.tensor([0.0, 3.0, 0.0, 0.25, 0.0]))     # mean(g^2) per row
    assert_close(w.detach()[1], w0[1] - 0.5 * g[0] / 3 ** 0.5)
    assert_close(w.detach()[3], w0[3] - 0.5 * g[1] / 0.5)
    # duplicates are summed before the update ("exact")
    opt2 = RowSparseOptimizer([w2 := torch.nn.Parameter(w0.clone())], lr=0.5, eps=1e-10, optimizer="rowwise_adagrad")
    _sparse_step(opt2, w2, torch.tensor([1, 1]), torch.ones(2, 3))
    assert_close(opt2.state[w2]["sum"][1], torch.tensor(4.0))


class _Sizes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        from torch.utils._pytree import tree_flatten

        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and not t.is_sparse}
        for t in (out if isinstance(out, (tuple, list)) else [out]):   # new storages only (not in-place results, views)
            if isinstance(t, torch.Tensor) and not t.is_sparse and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("algo", ["adam", "rowwise_adagrad"])
def test_no_dense_table_sized_tensor_in_backward_and_step(algo):
    """A 200k-row table: after the first step created the optimizer state, backward + step of
    a batch touching <= 64 rows allocates nothing larger than a few touched rows x dim."""
    R, D = 200_000, 8
    w = torch.nn.Parameter(torch.randn(R, D))
    opt = RowSparseOptimizer([w], lr=1e-2, optimizer=algo)
    _sparse_step(opt, w, torch.randint(0, R, (64,)), torch.randn(64, D))   # creates the state
    idx = torch.randint(0, R, (64,))
    before = w.detach().clone()
    with _Sizes() as sizes:
        _sparse_step(opt, w, idx, torch.randn(64, D))
    assert sizes.largest <= 64 * D * 4, sizes.largest                  # vs R * D = 1.6M for a dense gradient
    changed = (w.detach() != before).any(1).nonzero().flatten()
    assert set(changed.tolist()) <= set(idx.tolist())


def test_tables_get_their_groups_defaults_and_adamw_is_refused():
    model = build_model(ModelConfig(BB, (EngramConfig(rows_per_head=13, heads=2, head_dim=4),)))
    opt = build_optimizer(model, TrainConfig(lr=1e-3))
    assert isinstance(opt, MultiOptimizer)
    g = {x["group"]: x for x in opt.param_groups}
    assert g["engram_tables"]["optimizer"] == "adam" and g["engram_tables"]["lr"] == pytest.approx(5e-3)
    assert g["engram_tables"]["weight_decay"] == 0.0
    assert g["engram_tables"]["params"] == [model.memory.memories[0].table.weight]
    opt = build_optimizer(model, TrainConfig(lr=1e-3, groups={"engram_tables": GroupConfig(optimizer="rowwise_adagrad", lr_scale=2)}))
    g = {x["group"]: x for x in opt.param_groups}
    assert g["engram_tables"]["optimizer"] == "rowwise_adagrad" and g["engram_tables"]["lr"] == pytest.approx(2e-3)
    with pytest.raises(ConfigError, match="sparse .row. gradients; set train.groups.engram_tables.optimizer"):
        build_optimizer(model, TrainConfig(groups={"engram_tables": GroupConfig(optimizer="adamw")}))


def test_multi_optimizer_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = ModelConfig(BB, (PKMConfig(n_keys=6, k_dim=8, heads=2, knn=3),))
    a, b = build_model(cfg), build_model(cfg)
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 97, (2, 16))

    def step(model, opt):
        opt.zero_grad()
        model(x)[0].logits.square().mean().backward()
        grad_norm_and_clip([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()

    oa = build_optimizer(a, TrainConfig(lr=1e-2))
    step(a, oa)
    sd = oa.state_dict()
    assert sorted(sd["state"]) == list(range(len(sd["state"])))       # one flat numbering
    ob = build_optimizer(b, TrainConfig(lr=1e-2))
    step(b, ob)
    ob.load_state_dict(copy.deepcopy(sd))   # torch keeps the loaded tensors themselves as state
    step(a, oa)
    step(b, ob)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n


def test_grad_norm_and_clip_matches_torch_on_the_dense_equivalent():
    w = torch.nn.Parameter(torch.randn(10, 3))
    d = torch.nn.Parameter(torch.randn(4))
    (gather_rows(w, torch.tensor([1, 1, 7])).sum() * 3 + d.square().sum()).backward()
    w2, d2 = torch.nn.Parameter(w.detach().clone()), torch.nn.Parameter(d.detach().clone())
    w2.grad, d2.grad = w.grad.to_dense(), d.grad.clone()
    want = torch.nn.utils.clip_grad_norm_([w2, d2], 0.5)
    got = grad_norm_and_clip([w, d], 0.5)
    assert_close(got, want)
    assert_close(w.grad.to_dense(), w2.grad)
    assert_close(d.grad, d2.grad)


def test_trainer_trains_engram_tables_with_sparse_rows_and_resumes_exactly(tmp_path):
    from memstack.data.packing import ExampleSource
    from memstack.train.distributed import DistInfo
    from memstack.train.trainer import Trainer

    x = torch.randint(0, 97, (64, 32)).numpy()
    cfg = ModelConfig(BB, (EngramConfig(rows_per_head=13, heads=2, head_dim=4),))
    tc = TrainConfig(lr=3e-3, warmup_steps=1, max_steps=4, batch_size=4, progress=False, ckpt_every=2, log_every=1)

    def trainer(out):
        torch.manual_seed(0)
        m = build_model(cfg)
        return Trainer(m, tc, ExampleSource(x[:, :-1], x[:, 1:], 4, 16, seed=0), out_dir=out, dist=DistInfo())

    full = trainer(tmp_path / "a")
    t0 = full.model.memory.memories[0].table.weight.detach().clone()
    full.fit(progress=False)
    assert not torch.equal(t0, full.model.memory.memories[0].table.weight.detach())
    resumed = trainer(tmp_path / "b")
    resumed.resume(tmp_path / "a" / "ckpt" / "step-0000002")
    resumed.fit(progress=False)
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p, q), n
