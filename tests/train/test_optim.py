"""TouchedRowsAdamW against torch's dense AdamW, the reference it must equal bit for bit."""
import io

import pytest
import torch
from torch import nn

from clipforge.train.optim import TouchedRowsAdamW, build_optimizer, vocabulary_tables


class TwoTables(nn.Module):
    """A vocabulary table (few rows ever used) plus a dense layer, like a text tower's ends."""

    def __init__(self, vocab=2000, width=24):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Linear(width, 8)

    def forward(self, tokens):
        return self.proj(self.embed(tokens).mean(1))


def _batches(n, vocab, used, seed=0):
    g = torch.Generator().manual_seed(seed)
    pool = torch.randperm(vocab, generator=g)[:used]  # the corpus's tokens: a small part of the vocabulary
    return [pool[torch.randint(0, used, (6, 5), generator=g)] for _ in range(n)]


def _train(model, opt, batches, sched=None):
    for tokens in batches:
        opt.zero_grad(set_to_none=True)
        model(tokens).square().sum().backward()
        opt.step()
        if sched is not None:
            sched.step()


def _groups(model):
    return [{"params": [model.proj.weight], "weight_decay": 0.1},
            {"params": [model.embed.weight, model.proj.bias], "weight_decay": 0.0}]


@pytest.mark.parametrize("impl", ["fused", "foreach", "loop"])
def test_touched_rows_step_equals_dense_adamw_bit_for_bit(impl):
    flags = {"fused": impl == "fused", "foreach": impl == "foreach"}
    torch.manual_seed(0)
    ref = TwoTables()
    lazy = TwoTables()
    lazy.load_state_dict(ref.state_dict())
    kw = dict(lr=3e-2, betas=(0.9, 0.98), eps=1e-6, **flags)
    dense_opt = torch.optim.AdamW(_groups(ref), **kw)
    lazy_opt = TouchedRowsAdamW(_groups(lazy), row_params=[lazy.embed.weight], **kw)
    # a schedule changes lr every step, as in training
    s1 = torch.optim.lr_scheduler.LambdaLR(dense_opt, lambda s: 1 / (1 + s))
    s2 = torch.optim.lr_scheduler.LambdaLR(lazy_opt, lambda s: 1 / (1 + s))
    batches = _batches(40, 2000, 60)
    before = lazy.embed.weight.detach().clone()
    _train(ref, dense_opt, batches, s1)
    _train(lazy, lazy_opt, batches, s2)
    for a, b in zip(ref.parameters(), lazy.parameters()):
        assert torch.equal(a, b)
    for p_ref, p_lazy in zip(ref.parameters(), lazy.parameters()):
        a, b = dense_opt.state[p_ref], lazy_opt.state[p_lazy]
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    # the check is not vacuous: rows the batches used moved, the other rows stayed bit for bit
    used = torch.zeros(2000, dtype=torch.bool)
    used[torch.cat(batches).unique()] = True
    assert not torch.equal(lazy.embed.weight[used], before[used])
    assert torch.equal(lazy.embed.weight[~used], before[~used])
    assert lazy_opt._touched[id(lazy.embed.weight)].sum() == used.sum()


def test_a_table_touched_past_the_dense_fraction_takes_the_dense_step_with_the_same_result():
    torch.manual_seed(1)
    ref, lazy = TwoTables(vocab=1500), TwoTables(vocab=1500)
    lazy.load_state_dict(ref.state_dict())
    dense_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, fused=True)
    lazy_opt = TouchedRowsAdamW(_groups(lazy), row_params=[lazy.embed.weight], lr=1e-2, fused=True,
                                dense_fraction=0.01)
    batches = _batches(10, 1500, 1000, seed=3)  # 30 tokens a step over 1500 rows: past 1% after one step
    _train(ref, dense_opt, batches)
    _train(lazy, lazy_opt, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), lazy.parameters()))
    assert lazy_opt._dense == {id(lazy.embed.weight)} and not lazy_opt._touched  # no more scans


def test_checkpoints_move_between_dense_and_touched_rows_adamw():
    torch.manual_seed(2)
    a, b = TwoTables(), TwoTables()
    b.load_state_dict(a.state_dict())
    batches = _batches(30, 2000, 80, seed=5)
    opt_a = TouchedRowsAdamW(_groups(a), row_params=[a.embed.weight], lr=1e-2, fused=True)
    opt_b = torch.optim.AdamW(_groups(b), lr=1e-2, fused=True)
    _train(a, opt_a, batches[:15])
    _train(b, opt_b, batches[:15])
    # each resumes from the other's checkpoint (optimizer state dicts through torch.save, as train does)
    buf_a, buf_b = io.BytesIO(), io.BytesIO()
    torch.save(opt_a.state_dict(), buf_a)
    torch.save(opt_b.state_dict(), buf_b)
    resumed_dense = torch.optim.AdamW(_groups(a), lr=1e-2, fused=True)
    resumed_dense.load_state_dict(torch.load(io.BytesIO(buf_a.getvalue())))
    resumed_rows = TouchedRowsAdamW(_groups(b), row_params=[b.embed.weight], lr=1e-2, fused=True)
    resumed_rows.load_state_dict(torch.load(io.BytesIO(buf_b.getvalue())))
    assert not resumed_rows._touched  # found again from the restored moments at the next step
    _train(a, resumed_dense, batches[15:])
    _train(b, resumed_rows, batches[15:])
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_decayed_tables_and_bad_row_params_are_handled():
    model = TwoTables()
    with pytest.raises(ValueError, match="2-D tables"):
        TouchedRowsAdamW(model.parameters(), row_params=[model.proj.bias])
    with pytest.raises(ValueError, match="not in any parameter group"):
        TouchedRowsAdamW([model.proj.weight], row_params=[model.embed.weight])
    # weight decay moves every row each step: the table then takes the dense step, still equal to AdamW
    torch.manual_seed(3)
    ref = TwoTables()
    model.load_state_dict(ref.state_dict())
    dense_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    opt = TouchedRowsAdamW(model.parameters(), row_params=[model.embed.weight], lr=1e-2, weight_decay=0.1,
                           fused=True)
    batches = _batches(5, 2000, 40)
    _train(ref, dense_opt, batches)
    _train(model, opt, batches)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))
    assert not opt._touched


def test_build_optimizer_updates_the_token_table_by_rows():
    from clipforge.models import create_model

    model = create_model("tiny")
    opt = build_optimizer(model, 1e-3, 0.2, (0.9, 0.98), 1e-6)
    assert isinstance(opt, TouchedRowsAdamW)
    assert vocabulary_tables(model) == [model.text.token_embedding.weight]
    assert opt._row_params == {id(model.text.token_embedding.weight)}


def test_a_gradient_scaler_step_takes_the_dense_path_and_its_skip():
    """GradScaler hands fused optimizers ``grad_scale``/``found_inf``: the step must honour them (skip on inf)."""
    torch.manual_seed(4)
    ref, model = TwoTables(), TwoTables()
    model.load_state_dict(ref.state_dict())
    dense_opt = torch.optim.AdamW(_groups(ref), lr=1e-2, fused=True)
    opt = TouchedRowsAdamW(_groups(model), row_params=[model.embed.weight], lr=1e-2, fused=True)
    batches = _batches(4, 2000, 40)
    for i, tokens in enumerate(batches):
        for m, o in ((ref, dense_opt), (model, opt)):
            o.zero_grad(set_to_none=True)
            m(tokens).square().sum().backward()
            o.grad_scale, o.found_inf = None, torch.tensor(float(i == 2))  # as GradScaler.step sets them
            before = [p.detach().clone() for p in m.parameters()]
            o.step()
            del o.grad_scale, o.found_inf
            if i == 2:  # an inf was found: no parameter moves
                assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), model.parameters()))


def test_step_hooks_run_once_per_step_even_after_torch_patched_adams_step():
    torch.optim.AdamW([nn.Parameter(torch.zeros(2))]).step()  # any AdamW instance wraps Adam.step for hooks
    model = TwoTables()
    opt = TouchedRowsAdamW(_groups(model), row_params=[model.embed.weight], lr=1e-2, fused=True)
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    _train(model, opt, _batches(3, 2000, 40))
    assert calls == ["pre", "post"] * 3
