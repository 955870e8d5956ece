import pytest
import torch
from references import DT, flat, mlp, random_tree
from torch import nn

import hvpfunc as hf
from hvpfunc import tree as T
from hvpfunc.testing import dense_hessian, dense_matrix


def _bn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def _data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen, dtype=DT), torch.randn(n, 1, generator=gen, dtype=DT)


def _reference_hessian(model, x, y):
    """Dense Hessian of the mean-squared loss with the model's own forward, buffers copied
    so the reference cannot be influenced by what hvpfunc does to them."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = {k: b.clone() for k, b in model.named_buffers()}

    def f(p):
        return nn.functional.mse_loss(torch.func.functional_call(model, (p, buffers), (x,)), y)

    return dense_hessian(f, params)


@pytest.mark.parametrize("mode", ["auto", "reverse-over-reverse", "reverse-over-reverse-recomputed"])
def test_batchnorm_train_mode_products_use_batch_statistics_and_leave_buffers_alone(mode):
    model = _bn_model().train()
    x, y = _data(16)
    before = {k: b.clone() for k, b in model.named_buffers()}
    matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), mode=mode)
    H = dense_matrix(matvec, params)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, before[name]), name
    # batch statistics: the reference in train mode with running stats removed
    ref_model = _bn_model().train()
    ref_model[1].track_running_stats = False
    ref_model[1].running_mean = ref_model[1].running_var = ref_model[1].num_batches_tracked = None
    assert torch.allclose(H, _reference_hessian(ref_model, x, y), rtol=1e-8, atol=1e-10)
    assert torch.allclose(H, H.T, atol=1e-10)


def test_batchnorm_eval_mode_uses_running_statistics():
    model = _bn_model()
    model[1].running_mean.fill_(0.3)
    model[1].running_var.fill_(2.0)
    model.eval()
    x, y = _data(8)
    matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
    assert torch.allclose(dense_matrix(matvec, params), _reference_hessian(model, x, y), rtol=1e-8, atol=1e-10)


def test_uneven_batches_give_the_full_batch_hessian():
    model = mlp([3, 6, 1])
    x, y = _data(23)
    full, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    v = T.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    want = flat(full(v))
    for mode in ["auto", "reverse-over-reverse"]:
        split, _ = hf.model_hvp_fn(model, nn.functional.mse_loss, batches, mode=mode)
        assert torch.allclose(flat(split(v)), want, rtol=1e-10, atol=1e-12), mode
    # an iterator (read once) and a list of lists, as a DataLoader yields them
    split, _ = hf.model_hvp_fn(model, nn.functional.mse_loss, iter([[a, b] for a, b in batches]))
    assert torch.allclose(flat(split(v)), want, rtol=1e-10, atol=1e-12)
    # mse_loss lacks a working forward-mode derivative, so the memory-light choice is:
    assert split.mode == "reverse-over-reverse-recomputed"
    batched = torch.func.vmap(split)(T.stack([v, v]))
    assert torch.allclose(flat(T.index(batched, 1)), want, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_mode_with_batches_matches_per_batch_average():
    model = _bn_model().train()
    x, y = _data(12)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, batches)
    parts = [hf.model_hvp_fn(model, nn.functional.mse_loss, b)[0] for b in batches]
    H = dense_matrix(matvec, params)
    want = (8 * dense_matrix(parts[0], params) + 4 * dense_matrix(parts[1], params)) / 12
    assert torch.allclose(H, want, rtol=1e-10, atol=1e-12)


def test_inputs_as_tuple_or_dict_and_frozen_parameters():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 1).to(DT)
            self.b = nn.Linear(2, 1).to(DT)

        def forward(self, u, w):
            return torch.tanh(self.a(u)) * self.b(w)

    model = Two()
    model.b.weight.requires_grad_(False)
    u, w = torch.randn(5, 2, dtype=DT), torch.randn(5, 2, dtype=DT)
    y = torch.randn(5, 1, dtype=DT)
    mv_tuple, params = hf.model_hvp_fn(model, nn.functional.mse_loss, ((u, w), y))
    assert set(params) == {"a.weight", "a.bias", "b.bias"}
    mv_dict, _ = hf.model_hvp_fn(model, nn.functional.mse_loss, ({"u": u, "w": w}, y))
    frozen = model.b.weight.detach()

    def f(p):
        out = torch.func.functional_call(model, {**p, "b.weight": frozen}, (u, w))
        return nn.functional.mse_loss(out, y)

    H = dense_hessian(f, params)
    assert torch.allclose(dense_matrix(mv_tuple, params), H, rtol=1e-9, atol=1e-12)
    assert torch.allclose(dense_matrix(mv_dict, params), H, rtol=1e-9, atol=1e-12)


def test_active_dropout_is_an_error_naming_modules_and_off_switches_it_off():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1)).to(DT)
    x, y = _data(10)
    with pytest.raises(ValueError, match=r"active dropout at '1' \(p=0.5\).*model.eval\(\).*dropout='off'"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
    matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), dropout="off", mode="reverse-over-reverse-recomputed")
    assert model[1].training  # restored
    v = T.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    first, second = flat(matvec(v)), flat(matvec(v))
    assert torch.equal(first, second)
    model.eval()
    ref, _ = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
    assert torch.allclose(first, flat(ref(v)), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dropout must be"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), dropout="keep")


def test_transformer_layer_in_training_mode_with_dropout_off():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    x, y = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="self_attn"):
        hf.model_hvp_fn(layer, nn.functional.mse_loss, (x, y))
    matvec, params = hf.model_hvp_fn(layer, nn.functional.mse_loss, (x, y), dropout="off")
    layer.eval()
    ref, _ = hf.model_hvp_fn(layer, nn.functional.mse_loss, (x, y), mode="reverse-over-reverse-recomputed")
    v = T.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    assert torch.allclose(flat(matvec(v)), flat(ref(v)), rtol=1e-4, atol=1e-5)
    assert layer.self_attn.dropout == 0.1


def test_bad_data_is_a_clear_error():
    model = mlp([3, 2, 1])
    with pytest.raises(ValueError, match="holds no batches"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, [])
    with pytest.raises(ValueError, match=r"data\[1\] is not an \(inputs, targets\) pair"):
        x, y = _data(4)
        hf.model_hvp_fn(model, nn.functional.mse_loss, [(x, y), (x,)])
    with pytest.raises(ValueError, match="must be an"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, 3)


def _cross_entropy_model_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(DT).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, generator=gen, dtype=DT)
    y = torch.randint(0, 3, (12,), generator=gen)
    return model, x, y


@pytest.mark.parametrize("mode", ["forward-over-reverse", "linearize"])
def test_forward_mode_modes_with_batchnorm_train_and_cross_entropy(mode):
    model, x, y = _cross_entropy_model_data()
    before = {k: b.clone() for k, b in model.named_buffers()}
    matvec, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y), mode=mode)
    ref, _ = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y), mode="reverse-over-reverse")
    assert torch.allclose(dense_matrix(matvec, params), dense_matrix(ref, params), rtol=1e-8, atol=1e-10)
    for name, buf in model.named_buffers():
        assert torch.equal(buf, before[name]), name


def test_several_batches_use_forward_over_reverse_when_the_loss_allows():
    model, x, y = _cross_entropy_model_data()
    matvec, params = hf.model_hvp_fn(model.eval(), nn.functional.cross_entropy, [(x[:5], y[:5]), (x[5:], y[5:])])
    assert matvec.mode == "forward-over-reverse"
    full, _ = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))
    assert torch.allclose(dense_matrix(matvec, params), dense_matrix(full, params), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("chunk_size", [1, None])
def test_batchnorm_train_mode_against_a_hand_written_batch_norm(chunk_size):
    # Independent of F.batch_norm's derivative formulas, some of which PyTorch gets wrong
    # under nested transforms (torch.func.hessian through it is off by O(1) in 2.13;
    # pytorch/pytorch#196699 reports a wrong second-order JVP).
    model, x, y = _cross_entropy_model_data()
    params = {k: p.detach() for k, p in model.named_parameters()}

    def manual(p):
        h = x @ p["0.weight"].T + p["0.bias"]
        h = (h - h.mean(0)) / torch.sqrt(h.var(0, unbiased=False) + model[1].eps) * p["1.weight"] + p["1.bias"]
        return nn.functional.cross_entropy(torch.tanh(h) @ p["3.weight"].T + p["3.bias"], y)

    want = dense_hessian(manual, params)
    for mode in ["forward-over-reverse", "reverse-over-reverse", "reverse-over-reverse-recomputed", "linearize"]:
        matvec, _ = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y), mode=mode)
        assert torch.allclose(dense_matrix(matvec, params, chunk_size=chunk_size), want, rtol=1e-9, atol=1e-12), mode


def test_select_gives_the_diagonal_block_of_the_chosen_parameters():
    model = mlp([3, 4, 2])
    x, _ = _data(10)
    y = torch.randn(10, 2, dtype=DT)
    full, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
    block, sub = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), select=lambda n: n.startswith("2."))
    assert list(sub) == ["2.weight", "2.bias"]
    H = dense_matrix(full, params)
    start = params["0.weight"].numel() + params["0.bias"].numel()
    assert torch.allclose(dense_matrix(block, sub), H[start:, start:], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="select chose none"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), select=lambda n: False)


def test_compiled_mode_compiles_once_for_all_batches(monkeypatch):
    model = mlp([3, 6, 1])
    x, y = _data(30)
    full, params = hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), mode="reverse-over-reverse")
    compiles = []
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn: compiles.append(fn) or real_compile(fn))
    batches = [(x[:10], y[:10]), (x[10:20], y[10:20]), (x[20:], y[20:])]
    split, _ = hf.model_hvp_fn(model, nn.functional.mse_loss, batches, mode="compiled")
    assert split.mode == "compiled" and len(compiles) == 1
    v = T.random_like(params, generator=torch.Generator().manual_seed(0), kind="gaussian")
    assert torch.allclose(flat(split(v)), flat(full(v)), rtol=1e-10, atol=1e-12)


class _GRUClassifier(nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        self.rnn = nn.GRU(3, 5, num_layers=2, batch_first=True, dropout=dropout)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def _gru_problem(dropout=0.0):
    torch.manual_seed(0)
    model = _GRUClassifier(dropout).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 4, 3, generator=gen, dtype=DT), torch.randint(0, 2, (6,), generator=gen)
    return model, x, y


def _dense(model, x, y, params):
    return dense_hessian(lambda p: nn.functional.cross_entropy(torch.func.functional_call(model, p, (x,)), y), params)


def test_recurrent_layers_are_exact_under_auto_and_their_drifting_traced_map_is_refused(monkeypatch):
    # torch.func.linearize over GRU/LSTM/RNN: the first replay is right, later ones drift
    from hvpfunc._products import auto

    monkeypatch.setattr(auto, "_TRACE_COST_IN_BUILDS", 0.0)
    model, x, y = _gru_problem()
    mv, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))
    H = _dense(model.eval(), x, y, params)
    v = random_tree(params, 3)
    for _ in range(4):
        assert torch.allclose(flat(mv(v)), H @ flat(v), rtol=1e-9, atol=1e-11)
    assert mv.mode == "reverse-over-reverse" and "linearize rejected" in mv.switches[-1].reason
    with pytest.raises(RuntimeError, match="not trustworthy|disagrees"):
        hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y), mode="linearize")


def test_dropout_inside_recurrent_layers_is_found_and_switched_off():
    model, x, y = _gru_problem(dropout=0.5)
    model.train()
    with pytest.raises(ValueError, match="active dropout at 'rnn' \\(p=0.5\\)"):
        hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))
    mv, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y), dropout="off")
    assert model.rnn.dropout == 0.5  # restored
    reference, _, _ = _gru_problem(dropout=0.0)
    H = _dense(reference.train(), x, y, params)
    v = random_tree(params, 4)
    assert torch.allclose(flat(mv(v)), H @ flat(v), rtol=1e-9, atol=1e-11)


def test_functional_dropout_in_forward_is_named_as_what_dropout_off_cannot_reach():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(nn.functional.dropout(x, 0.5, training=self.training))

    model = Noisy().double().train()
    x, y = torch.randn(50, 3, dtype=DT), torch.randn(50, 1, dtype=DT)
    with pytest.raises(ValueError, match="cannot switch off.*functional.dropout.*model.eval"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y), dropout="off")


def test_messages_name_the_real_cause():
    model = nn.Linear(2, 1).double()
    x, y = torch.randn(4, 2, dtype=DT), torch.randn(4, 1, dtype=DT)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the model has requires_grad=False"):
        hf.model_hvp_fn(model, nn.functional.mse_loss, (x, y))
    for p in model.parameters():
        p.requires_grad_(True)
    # one example with a 0-dim target: one batch needs no batch dimension
    mv, params = hf.model_hvp_fn(model, lambda out, t: (out.sum() - t) ** 2, (x[0], y[0, 0]))
    assert torch.allclose(mv({"weight": torch.ones(1, 2, dtype=DT), "bias": torch.zeros(1, dtype=DT)})["bias"],
                          2 * x[0].sum().reshape(1))
    with pytest.raises(ValueError, match="same keys in another order"):
        mv({"bias": torch.zeros(1, dtype=DT), "weight": torch.ones(1, 2, dtype=DT)})
