import warnings

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
        split, _ = hf.model_hvp_fn(model, nn.MSELoss(), batches, mode=mode)
        assert torch.allclose(flat(split(v)), want, rtol=1e-10, atol=1e-12), mode
    # streamed: a DataLoader over the same data, read once per product
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=10)
    split, _ = hf.model_hvp_fn(model, nn.MSELoss(), loader)
    assert torch.allclose(flat(split(v)), want, rtol=1e-10, atol=1e-12)
    # an iterator (a generator) can be read only once: refused when given, where it was
    # read and then found empty at the first product
    with pytest.raises(ValueError, match="iterator.*read only once.*DataLoader"):
        hf.model_hvp_fn(model, nn.MSELoss(), iter([[a, b] for a, b in batches]))
    with pytest.raises(ValueError, match="iterator"):
        hf.model_hvp_fn(model, nn.MSELoss(), ((a, b) for a, b in batches))
    # mse_loss lacks a working forward-mode derivative, so the memory-light choice is:
    assert split.mode == "reverse-over-reverse-recomputed"
    batched = torch.func.vmap(split)(T.stack([v, v]))
    assert torch.allclose(flat(T.index(batched, 1)), want, rtol=1e-10, atol=1e-12)


def test_batchnorm_train_mode_with_batches_matches_per_batch_average():
    model = _bn_model().train()
    x, y = _data(12)
    batches = [(x[:8], y[:8]), (x[8:], y[8:])]
    matvec, params = hf.model_hvp_fn(model, nn.functional.mse_loss, batches, reduction="mean")
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
    matvec, params = hf.model_hvp_fn(model.eval(), nn.CrossEntropyLoss(), [(x[:5], y[:5]), (x[5:], y[5:])])
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
    split, _ = hf.model_hvp_fn(model, nn.functional.mse_loss, batches, mode="compiled", reduction="mean")
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
    monkeypatch.setattr(auto, "_FIRST_TRACE_IMPORT_SECONDS", 0.0)
    model, x, y = _gru_problem()
    mv, params = hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y))
    H = _dense(model.eval(), x, y, params)
    v = random_tree(params, 3)
    for _ in range(4):
        assert torch.allclose(flat(mv(v)), H @ flat(v), rtol=1e-9, atol=1e-11)
    assert mv.mode == "reverse-over-reverse" and "linearize rejected" in mv.switches[-1].reason
    with pytest.raises(RuntimeError, match="not trustworthy|disagrees"):
        hf.model_hvp_fn(model, nn.functional.cross_entropy, (x, y), mode="linearize")


class _ConvLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.rnn, self.out = nn.Conv1d(2, 3, 3, padding=1), nn.LSTM(3, 4, batch_first=True), nn.Linear(4, 1)

    def forward(self, x):
        hidden, _ = self.rnn(torch.tanh(self.conv(x)).transpose(1, 2))
        return self.out(hidden[:, -1])


@pytest.mark.parametrize("mode", ["auto", "reverse-over-reverse", "reverse-over-reverse-recomputed",
                                  "forward-over-reverse", "gradient-difference"])
def test_recurrent_layers_run_off_cudnn_and_convolutions_keep_it(monkeypatch, mode):
    # cuDNN's RNN kernels have no double backward (pytorch#5261) and their backward refuses
    # eval mode, so on CUDA hvpfunc runs RNN/LSTM/GRU calls with cuDNN off, and only those.
    # This CPU build has no cuDNN: pretend it has, and watch the flag every operation of
    # the forward pass runs under (the LSTM's gates are its only sigmoids).
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    seen = {}

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.setdefault(func._schema.name, set()).add(torch.backends.cudnn.enabled)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = _ConvLSTM().to(DT).eval()
    x, y = torch.randn(5, 2, 6, dtype=DT), torch.randn(5, 1, dtype=DT)
    loss = lambda out, t: ((out - t) ** 2).mean()  # noqa: E731  (F.mse_loss + forward AD + a dispatch mode segfaults)
    with Watch():
        mv, params = hf.model_hvp_fn(model, loss, (x, y), mode=mode)
        hv = mv(random_tree(params, 1))
    assert seen["aten::sigmoid_"] == {False} and seen["aten::convolution"] == {True}
    assert torch.backends.cudnn.enabled  # restored
    reference = dense_hessian(lambda p: loss(torch.func.functional_call(model, p, (x,)), y), params)
    tol = 1e-5 if mode == "gradient-difference" else 1e-9
    assert torch.allclose(flat(hv), reference @ flat(random_tree(params, 1)), rtol=tol, atol=tol)


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


# ---- the loss the user wrote, over data of any size (reductions, inputs, streaming) ----


def _concatenated_hessian(model, loss_fn, batches, params):
    """The reference: torch.autograd.functional.hessian of loss_fn over all the data at once."""
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    return dense_hessian(lambda p: loss_fn(torch.func.functional_call(model, p, (xs,)), ys), params)


def test_sum_reduction_over_batches_adds_the_batch_hessians():
    # the example: it gave ¼H₁ + ¾H₂ instead of H₁ + H₂
    torch.manual_seed(0)
    model = nn.Linear(2, 1, bias=False).double()
    x1, x2 = torch.randn(1, 2, dtype=DT), torch.randn(3, 2, dtype=DT)
    y1, y2 = torch.randn(1, 1, dtype=DT), torch.randn(3, 1, dtype=DT)
    mv, p = hf.model_hvp_fn(model, nn.MSELoss(reduction="sum"), [(x1, y1), (x2, y2)])
    X = torch.cat([x1, x2])
    assert torch.allclose(mv({"weight": torch.eye(2, dtype=DT)[:1]})["weight"][0], (2 * X.T @ X)[0])


class _SeqModel(nn.Module):
    """Token-level classifier: (N, T, 3) -> (N, 4, T) logits, as CrossEntropyLoss takes them."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        return torch.tanh(self.lin(x)).transpose(1, 2)


def _case(name, gen):
    """(model, loss class kwargs, batches): unequal batches for each loss."""
    if name in ("cross_entropy", "nll", "weighted_ce"):
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
        sizes = [2, 5, 3]
        batches = [(torch.randn(n, 3, generator=gen), torch.randint(0, 4, (n,), generator=gen)) for n in sizes]
    elif name == "tokens":  # sequences: the mean is over tokens, and ignored targets do not count
        model = _SeqModel()
        shapes = [(2, 3), (3, 1)]
        batches = []
        for n, t in shapes:
            y = torch.randint(0, 4, (n, t), generator=gen)
            y[0, 0] = -100  # CrossEntropyLoss's ignore_index
            batches.append((torch.randn(n, t, 3, generator=gen), y))
    else:  # mse, bce_logits: elementwise losses with 2 outputs
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
        sizes = [1, 4, 2]
        batches = [(torch.randn(n, 3, generator=gen), torch.rand(n, 2, generator=gen)) for n in sizes]
    model = model.double()
    batches = [(x.double(), y.double() if y.is_floating_point() else y) for x, y in batches]
    return model, batches


_LOSSES = {
    "mse": lambda r: nn.MSELoss(reduction=r),
    "bce_logits": lambda r: nn.BCEWithLogitsLoss(reduction=r),
    "cross_entropy": lambda r: nn.CrossEntropyLoss(reduction=r),
    "weighted_ce": lambda r: nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=DT), reduction=r),
    "nll": lambda r: _LogSoftmaxNLL(reduction=r),
    "tokens": lambda r: nn.CrossEntropyLoss(reduction=r),
}


class _LogSoftmaxNLL(nn.NLLLoss):
    def forward(self, input, target):
        return super().forward(torch.log_softmax(input, dim=1), target)


@pytest.mark.parametrize("name", list(_LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_losses_and_reductions_over_unequal_batches_match_the_concatenated_data(name, reduction):
    gen = torch.Generator().manual_seed(3)
    model, batches = _case(name, gen)
    loss_fn = _LOSSES[name](reduction)
    mv, params = hf.model_hvp_fn(model, loss_fn, batches)
    if name == "tokens":  # sequences of different lengths: compare with the flattened tokens
        tokens = [(x.reshape(-1, 1, 3), y.reshape(-1, 1)) for x, y in batches]
        want = _concatenated_hessian(model, loss_fn, tokens, params)
    else:
        want = _concatenated_hessian(model, loss_fn, batches, params)
    assert torch.allclose(dense_matrix(mv, params), want, rtol=1e-9, atol=1e-11)


def test_plain_callables_over_several_batches_must_say_how_they_reduce():
    model = mlp([3, 4, 1])
    x, y = _data(9)
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    with pytest.raises(ValueError, match="cannot know.*reduction='mean'.*reduction='sum'"):
        hf.model_hvp_fn(model, lambda out, t: ((out - t) ** 2).mean(), batches)
    with pytest.raises(ValueError, match="contradicts loss_fn.reduction='sum'"):
        hf.model_hvp_fn(model, nn.MSELoss(reduction="sum"), batches, reduction="mean")
    _, params = hf.model_hvp_fn(model, nn.MSELoss(), (x, y))
    mean, _ = hf.model_hvp_fn(model, lambda out, t: ((out - t) ** 2).mean(), batches, reduction="mean")
    total, _ = hf.model_hvp_fn(model, lambda out, t: ((out - t) ** 2).sum(), batches, reduction="sum")
    assert torch.allclose(dense_matrix(mean, params), _concatenated_hessian(model, nn.MSELoss(), batches, params))
    assert torch.allclose(dense_matrix(total, params),
                          _concatenated_hessian(model, nn.MSELoss(reduction="sum"), batches, params))
    # inputs whose batch size is not len(targets): say it with batch_size=
    paired = [((x[:2], x[:2]), y[:2]), ((x[2:], x[2:]), y[2:])]

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, a, b):
            return self.inner(a) + self.inner(b)

    weights = []
    hf.model_hvp_fn(Sum(), lambda o, t: ((o - t) ** 2).mean(), paired, reduction="mean",
                    batch_size=lambda batch: weights.append(len(batch[0][0])) or len(batch[0][0]))
    assert weights == [2, 7]


def test_every_mapping_is_passed_as_keywords_or_whole_as_chosen():
    from collections import UserDict

    class Keywords(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 1).double()

        def forward(self, u=None, w=None, batch=None):
            if batch is not None:
                u, w = batch["u"], batch["w"]
            return torch.tanh(self.lin(u)) * w

    model = Keywords()
    u, w, y = torch.randn(5, 2, dtype=DT), torch.randn(5, 1, dtype=DT), torch.randn(5, 1, dtype=DT)
    ref, params = hf.model_hvp_fn(model, nn.MSELoss(), ({"u": u, "w": w}, y))
    H = dense_matrix(ref, params)
    user, _ = hf.model_hvp_fn(model, nn.MSELoss(), (UserDict(u=u, w=w), y))  # a Mapping that is not a dict
    assert torch.allclose(dense_matrix(user, params), H)

    class Whole(Keywords):
        def forward(self, batch):
            return super().forward(batch=batch)

    whole = Whole()
    whole.load_state_dict(model.state_dict())
    one, _ = hf.model_hvp_fn(whole, nn.MSELoss(), (UserDict(u=u, w=w), y), unpack_inputs=False)
    assert torch.allclose(dense_matrix(one, params), H)


class _Counted(torch.utils.data.IterableDataset):
    """Yields fresh batches on every pass and counts how many are alive at once."""

    def __init__(self, x, y, size, shuffle=False):
        self.x, self.y, self.size, self.shuffle = x, y, size, shuffle
        self.alive = 0
        self.most_alive = 0
        self.passes = 0

    def _born(self):
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)

    def _died(self):
        self.alive -= 1

    def __iter__(self):
        import weakref

        self.passes += 1
        order = torch.randperm(len(self.x)) if self.shuffle else torch.arange(len(self.x))
        for start in range(0, len(self.x), self.size):
            idx = order[start : start + self.size]
            x = self.x[idx].clone()
            self._born()
            weakref.finalize(x, self._died)
            yield x, self.y[idx]
            del x


def test_streamed_data_holds_one_batch_at_a_time_and_is_checked_on_every_pass():
    import gc

    model = mlp([3, 6, 1])
    x, y = _data(40)
    full, params = hf.model_hvp_fn(model, nn.MSELoss(), (x, y))
    v = T.random_like(params, generator=torch.Generator().manual_seed(1), kind="gaussian")
    data = _Counted(x, y, 8)
    mv, _ = hf.model_hvp_fn(model, nn.MSELoss(), data)
    gc.collect()
    for _ in range(2):
        assert torch.allclose(flat(mv(v)), flat(full(v)), rtol=1e-10, atol=1e-12)
    assert data.passes == 3 and data.most_alive <= 2  # 5 batches, never more than 2 alive
    batched = torch.func.vmap(mv)(T.stack([v, v]))
    assert torch.allclose(flat(T.index(batched, 0)), flat(full(v)), rtol=1e-10, atol=1e-12)

    shuffled = _Counted(x, y, 8, shuffle=True)
    mv, _ = hf.model_hvp_fn(model, nn.MSELoss(), shuffled)
    with pytest.raises(RuntimeError, match="differs from the one read first.*shuffle"):
        mv(v)
    unchecked, _ = hf.model_hvp_fn(model, nn.MSELoss(), shuffled, check_data=False)
    assert torch.allclose(flat(unchecked(v)), flat(full(v)), rtol=1e-10, atol=1e-12)  # a mean over the same set
    with pytest.raises(ValueError, match="streamed data"):
        hf.model_hvp_fn(model, nn.MSELoss(), data, mode="reverse-over-reverse")


def test_at_given_parameters_tied_weights_frozen_parameters_and_buffers():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(3, 3, bias=False)
            self.dec = nn.Linear(3, 3, bias=False)
            self.dec.weight = self.enc.weight  # one Parameter used twice
            self.frozen = nn.Linear(3, 3)
            self.frozen.requires_grad_(False)
            self.register_buffer("scale", torch.tensor(0.7))

        def forward(self, x):
            return self.frozen(self.dec(torch.tanh(self.enc(x)))) * self.scale

    torch.manual_seed(0)
    model = Tied().double()
    x, y = torch.randn(7, 3, dtype=DT), torch.randn(7, 3, dtype=DT)
    point = {"enc.weight": torch.randn(3, 3, dtype=DT)}
    before = {k: t.clone() for k, t in model.state_dict().items()}
    mv, params = hf.model_hvp_fn(model, nn.MSELoss(), (x, y), at=point)
    assert list(params) == ["enc.weight"]  # tied: one entry; frozen: a constant

    def f(p):
        w = p["enc.weight"]
        hidden = torch.tanh(x @ w.T) @ w.T  # both uses of the tied weight
        out = (hidden @ model.frozen.weight.T + model.frozen.bias) * model.scale
        return ((out - y) ** 2).mean()

    assert torch.allclose(dense_matrix(mv, params), dense_hessian(f, point), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before.items())  # the module is untouched
    with pytest.raises(ValueError, match=r"at names no parameter or buffer of the model: \['nope'\]"):
        hf.model_hvp_fn(model, nn.MSELoss(), (x, y), at={"nope": torch.zeros(1)})


@pytest.mark.parametrize("mode", ["auto", "forward-over-reverse", "gradient-difference"])
def test_at_a_checkpoints_state_dict_with_batchnorm_statistics(mode):
    # a state dict holds buffers too: at=other.state_dict() raised "at names no parameter
    # of the model: ['1.running_mean', ...]", though eval-mode BatchNorm's statistics
    # are part of the point
    def make(seed):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().eval()

    model, checkpoint = make(0), make(1)
    with torch.no_grad():
        checkpoint[1].running_mean.add_(0.5)
        checkpoint[1].running_var.mul_(2.0)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen, dtype=DT), torch.randint(0, 3, (16,), generator=gen)
    matvec, params = hf.model_hvp_fn(checkpoint, nn.CrossEntropyLoss(), (x, y))
    want = dense_matrix(matvec, params)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    for data in ((x, y), [(x[:8], y[:8]), (x[8:], y[8:])]):
        matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data, at=checkpoint.state_dict(), mode=mode)
        tol = 1e-8 if mode == "gradient-difference" else 1e-12
        torch.testing.assert_close(dense_matrix(matvec, params, chunk_size=1), want, rtol=tol, atol=tol)
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before.items())


def test_a_forward_that_writes_in_place_never_touches_the_module():
    class Renormed(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3, max_norm=1.0)  # renormalizes rows in place when read
            self.head = nn.Linear(3, 1)

        def forward(self, idx):
            return self.head(self.emb(idx).mean(1))

    torch.manual_seed(0)
    model = Renormed().double()
    with torch.no_grad():
        model.emb.weight.mul_(3.0)  # rows longer than max_norm
    before = {k: t.clone() for k, t in model.state_dict().items()}
    idx, y = torch.tensor([[0, 1], [2, 3]]), torch.randn(2, 1, dtype=DT)
    with pytest.raises(ValueError, match="writes to 'emb.weight' in place.*not modified"):
        hf.model_hvp_fn(model, nn.MSELoss(), (idx, y))
    assert all(torch.equal(model.state_dict()[k], t) for k, t in before.items())  # bit for bit


@pytest.mark.parametrize("batches", [False, True])
def test_spectral_norm_in_training_mode_is_refused_for_its_writes_not_called_random(batches):
    # its power iteration updates u and v in every forward pass, so two evaluations
    # differ: the error blamed randomness (dropout, sampling) instead of the writes
    torch.manual_seed(0)
    model = mlp([4, 6, 3])
    nn.utils.parametrizations.spectral_norm(model[0])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen, dtype=DT), torch.randint(0, 3, (16,), generator=gen)
    data = [(x[:8], y[:8]), (x[8:], y[8:])] if batches else (x, y)
    with pytest.raises(ValueError, match="writes to '0.parametrizations.weight.0._u' in place.*model.eval()"):
        hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data)
    model.eval()  # u and v then stay fixed
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data)
    H = dense_matrix(matvec, params)
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM])
def test_packed_sequences_over_several_batches_in_the_default_mode(cls):
    # Kernels on a PackedSequence read their inputs' data pointers, which torch.func's
    # transforms do not have: the default mode crashed ("Cannot access data pointer of
    # Tensor that doesn't have storage") where plain autograd works.
    from nn_cases import _Packed, packed_batch

    torch.manual_seed(0)
    model = _Packed(cls(3, 4, batch_first=True), 4, 2).double()
    batches = [packed_batch(0), packed_batch(1)]
    loss = nn.CrossEntropyLoss()
    matvec, params = hf.model_hvp_fn(model, loss, batches)
    H = dense_hessian(lambda q: sum(loss(torch.func.functional_call(model, q, (x,)), y) for x, y in batches) / 2,
                      params)
    v = hf.tree.random_like(params, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(flat(matvec(v)), H @ flat(v), rtol=1e-9, atol=1e-12)
    # batched probes fall back to a loop (these kernels cannot run under vmap): the same numbers
    tr = hf.trace(matvec, params, num_probes=8, method="hutchinson", generator=torch.Generator().manual_seed(1))
    looped = hf.trace(matvec, params, num_probes=8, method="hutchinson", generator=torch.Generator().manual_seed(1),
                      chunk_size=1)
    assert float(tr.estimate) == pytest.approx(float(looped.estimate), rel=1e-12)
    assert abs(float(tr.estimate) - float(torch.trace(H))) <= 4 * float(tr.stderr)


def test_a_first_answer_imports_neither_dynamo_nor_dtensor_nor_sympy():
    """A process's first matvec once paid 1 s of imports (7x the build of a small CNN's
    double-backward graph): torch._dynamo, which torch imports on the first call of a
    TorchDispatchMode's __torch_dispatch__ (the operation recorder opts out), and
    torch.distributed.tensor, imported only to ask whether parameters are DTensors (none
    can be before it is imported). Then 0.3 s more: torch.autograd.grad's check of
    grad_outputs imports torch's symbolic shapes and sympy on its first call (the product
    goes to autograd's engine directly). Fresh interpreter: the modules must stay out of
    a whole first job."""
    import subprocess
    import sys

    script = (
        "import sys, torch\n"
        "from torch import nn\n"
        "import hvpfunc as hf\n"
        "m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 3)).eval()\n"
        "x, y = torch.randn(5, 3, 8, 8), torch.randint(0, 3, (5,))\n"
        "mv, p = hf.model_hvp_fn(m, nn.CrossEntropyLoss(), (x, y))\n"
        "res = hf.lanczos(mv, hf.tree.random_like(p, generator=torch.Generator().manual_seed(0)), k=1, tol=1e-3,\n"
        "                 stop='eigenvalue')\n"
        "assert res.status == 'converged', res\n"
        "print(sorted(k for k in ('torch._dynamo', 'torch.distributed.tensor', 'sympy') if k in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_autos_memory_tells_models_apart_by_their_modules_not_their_parameter_shapes():
    # model_hvp_fn's loss closure is one function for every model: two Sequentials with the
    # same parameter shapes but different activations must not share auto's remembered
    # decisions, while the same model at another batch of the same shapes does
    torch.manual_seed(0)
    x, y = torch.randn(16, 4, dtype=DT), torch.randint(0, 3, (16,))
    tanh = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    relu = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    relu.load_state_dict(tanh.state_dict())
    first, _ = hf.model_hvp_fn(tanh, nn.CrossEntropyLoss(), (x, y))
    again, _ = hf.model_hvp_fn(tanh, nn.CrossEntropyLoss(), (x + 1, y))
    other, _ = hf.model_hvp_fn(relu, nn.CrossEntropyLoss(), (x, y))
    assert again.chunk_trials is first.chunk_trials
    assert other.chunk_trials is not first.chunk_trials


@pytest.mark.parametrize("data", ["one batch", "batches", "loader"])
def test_built_inside_inference_mode_gives_the_same_products(data):
    # an evaluation loop under torch.inference_mode(): the parameters' copies were
    # inference tensors and model_hvp_fn raised "Inference tensors do not track version
    # counter"; data made there too
    from torch.utils.data import DataLoader, TensorDataset

    model = mlp([4, 6, 2])
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen, dtype=DT), torch.randint(0, 2, (16,), generator=gen)
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), (x, y))
    want = dense_matrix(matvec, params)
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        source = {"one batch": (xi, yi), "batches": [(xi[:8], yi[:8]), (xi[8:], yi[8:])],
                  "loader": DataLoader(TensorDataset(xi, yi), batch_size=8)}[data]
        inside, inside_params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), source)
        got = dense_matrix(inside, inside_params)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


class _Checkpointed(nn.Module):
    """A Linear-tanh segment under activation checkpointing between two layers."""

    def __init__(self, reentrant: bool):
        super().__init__()
        self.pre, self.mid, self.out = nn.Linear(4, 5), nn.Linear(5, 6), nn.Linear(6, 3)
        self.reentrant = reentrant

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(lambda z: torch.tanh(self.mid(z)), torch.tanh(self.pre(x)), use_reentrant=self.reentrant)
        return self.out(h)


def _checkpoint_case(reentrant: bool, batches: bool):
    """A checkpointed model, its data (one batch or two) and, as the reference, the dense
    Hessian of the same network without checkpointing."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 4, generator=gen, dtype=DT), torch.randint(0, 3, (16,), generator=gen)
    torch.manual_seed(0)
    plain = _Checkpointed(False).double()
    plain.forward = lambda x: plain.out(torch.tanh(plain.mid(torch.tanh(plain.pre(x)))))  # no checkpoint
    matvec, params = hf.model_hvp_fn(plain, nn.CrossEntropyLoss(), (x, y))
    model = _Checkpointed(reentrant).double()
    model.load_state_dict(plain.state_dict())
    data = [(x[:8], y[:8]), (x[8:], y[8:])] if batches else (x, y)
    return model, data, dense_matrix(matvec, params)


@pytest.mark.parametrize("batches", [False, True])
def test_activation_checkpointing_without_reentrancy_gives_the_hessian(batches):
    # torch.func refuses its saved-tensor hooks: several batches raised that error from
    # auto's memory-light probe; they now take plain double backward per product
    model, data, want = _checkpoint_case(False, batches)
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data)
    # (plain double backward per product: vmap cannot batch it)
    torch.testing.assert_close(dense_matrix(matvec, params, chunk_size=1), want, rtol=1e-9, atol=1e-12)
    assert hf.trace(matvec, params, num_probes=4).status == "converged"  # chunk_size="auto" finds a loop


@pytest.mark.parametrize("batches", [False, True])
def test_reentrant_activation_checkpointing_is_refused_not_differentiated_wrongly(batches):
    # its backward recomputes the segment in a graph of its own: the double backward
    # of mode "auto" dropped the checkpointed layer's second-order terms (0.19 off)
    model, data, want = _checkpoint_case(True, batches)
    with pytest.raises(ValueError, match="use_reentrant=False"):
        matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data)
        matvec(random_tree(params, 0))  # several batches: their first product finds it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data, mode="gradient-difference")
    # hvpfunc's own no-grad evaluations made the checkpoint warn about training
    assert not [w for w in caught if "requires_grad" in str(w.message)]
    torch.testing.assert_close(dense_matrix(matvec, params, chunk_size=1), want, rtol=1e-6, atol=1e-7)


def test_a_failed_compile_over_checkpointing_leaves_later_products_working():
    # torch 2.13: a failed torch.compile of torch.func over saved-tensor hooks left them
    # disabled for the process; every later product through a checkpoint then raised
    model, data, want = _checkpoint_case(False, False)
    with pytest.raises(RuntimeError, match="mode='compiled'"):
        hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data, mode="compiled")
    matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data, mode="reverse-over-reverse")
    torch.testing.assert_close(dense_matrix(matvec, params), want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["auto", "reverse-over-reverse", "forward-over-reverse", "gradient-difference"])
def test_sparse_embeddings_give_the_dense_embeddings_hessian_and_stay_sparse(mode):
    # a sparse weight gradient has no double backward: products raised "Could not run
    # 'aten::view' with arguments from the 'SparseCPU' backend"
    def make(sparse):
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(10, 4, sparse=sparse), nn.Flatten(), nn.Tanh(), nn.Linear(8, 3)).double()

    gen = torch.Generator().manual_seed(0)
    tokens, y = torch.randint(0, 10, (16, 2), generator=gen), torch.randint(0, 3, (16,), generator=gen)
    matvec, params = hf.model_hvp_fn(make(False), nn.CrossEntropyLoss(), (tokens, y))
    want = dense_matrix(matvec, params)
    model = make(True)
    for data in ((tokens, y), [(tokens[:8], y[:8]), (tokens[8:], y[8:])]):
        matvec, params = hf.model_hvp_fn(model, nn.CrossEntropyLoss(), data, mode=mode)
        tol = 1e-7 if mode == "gradient-difference" else 1e-12
        torch.testing.assert_close(dense_matrix(matvec, params, chunk_size=1), want, rtol=tol, atol=tol)
    assert model[0].sparse  # the module is as it was
