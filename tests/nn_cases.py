"""The torch.nn walk's cases, as data: name -> (model, loss_fn, (inputs, targets)),
small and float64, each with a double backward (a dense reference exists)."""

from __future__ import annotations

import torch
from torch import nn

DT = torch.float64


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _reg(n=6, d=3, out=2, seed=0):
    g = _g(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randn(n, out, generator=g, dtype=DT)


def _cls(n=6, d=3, classes=3, seed=0):
    g = _g(seed)
    return torch.randn(n, d, generator=g, dtype=DT), torch.randint(0, classes, (n,), generator=g)


class LastStep(nn.Module):
    """A recurrent layer's last output, through a linear head."""

    def __init__(self, rnn, hidden, out):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class _Packed(nn.Module):
    """A recurrent layer on a PackedSequence (sequences of different lengths): its final
    hidden state, through a linear head."""

    def __init__(self, rnn, hidden, out):
        super().__init__()
        self.rnn, self.head = rnn, nn.Linear(hidden, out)

    def forward(self, packed):
        h = self.rnn(packed)[1]
        return self.head((h[0] if isinstance(h, tuple) else h)[-1])


def packed_batch(seed: int):
    """Four sequences of lengths 5, 4, 3, 2 (features 3), packed, and class labels."""
    g = _g(seed)
    seq = torch.randn(4, 5, 3, generator=g, dtype=DT)
    packed = nn.utils.rnn.pack_padded_sequence(seq, torch.tensor([5, 4, 3, 2]), batch_first=True)
    return packed, torch.randint(0, 2, (4,), generator=g)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.att = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


class _Embed(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.emb = nn.Embedding(6, 3, **kwargs)
        self.head = nn.Linear(3, 2)

    def forward(self, idx):
        return self.head(torch.tanh(self.emb(idx)).mean(1))


def _mlp(act, d=3, out=2):
    return nn.Sequential(nn.Linear(d, 4), act, nn.Linear(4, out))


class _Bilinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.bilinear = nn.Linear(3, 3), nn.Linear(3, 2), nn.Bilinear(3, 2, 3)

    def forward(self, x):
        return self.bilinear(torch.tanh(self.a(x)), torch.tanh(self.b(x)))


class _Cell(nn.Module):
    """A recurrent cell applied twice (the second step from the first's state)."""

    def __init__(self, cell):
        super().__init__()
        self.cell, self.head = cell, nn.Linear(4, 2)

    def forward(self, x):
        h = self.cell(x, self.cell(x))
        return self.head(h[0] if isinstance(h, tuple) else h)


class _Bag(nn.Module):
    def __init__(self, mode):
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(6, 3, mode=mode), nn.Linear(3, 2)

    def forward(self, idx):
        return self.head(torch.tanh(self.bag(idx)))


class _SequenceToSequence(nn.Module):
    """A layer of two sequences (a decoder layer, a Transformer) on the tokens and their
    reversal, averaged, through a linear head."""

    def __init__(self, layer):
        super().__init__()
        self.layer, self.head = layer, nn.Linear(4, 2)

    def forward(self, t):
        return self.head(self.layer(t, t.flip(1)).mean(1))


class _Similarity(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x):
        u, v = torch.tanh(self.a(x)), torch.tanh(self.b(x))
        return torch.stack([nn.CosineSimilarity()(u, v), nn.PairwiseDistance()(u, v), (u * v).sum(1)], 1)


class _Unpool(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.pool, self.unpool = nn.Conv2d(2, 2, 3), nn.MaxPool2d(2, return_indices=True), nn.MaxUnpool2d(2)
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        y, where = self.pool(torch.tanh(self.conv(x)))
        return self.head(torch.tanh(self.unpool(y, where)).flatten(1))


class _AdaptiveSoftmax(nn.Module):
    """AdaptiveLogSoftmaxWithLoss' log-probabilities (its clusters' parameters are the model's)."""

    def __init__(self):
        super().__init__()
        self.lin, self.adaptive = nn.Linear(3, 4), nn.AdaptiveLogSoftmaxWithLoss(4, 6, [3])

    def forward(self, x):
        return self.adaptive.log_prob(torch.tanh(self.lin(x)))


def _head(d):
    return [nn.Tanh(), nn.Flatten(), nn.Linear(d, 2)]


def cases():
    out = {}
    losses = {
        "MSELoss": (lambda r: nn.MSELoss(reduction=r), _reg),
        "L1Loss": (lambda r: nn.L1Loss(reduction=r), _reg),
        "SmoothL1Loss": (lambda r: nn.SmoothL1Loss(reduction=r), _reg),
        "HuberLoss": (lambda r: nn.HuberLoss(reduction=r), _reg),
        "CrossEntropyLoss": (lambda r: nn.CrossEntropyLoss(reduction=r), lambda: _cls()),
        "BCEWithLogitsLoss": (lambda r: nn.BCEWithLogitsLoss(reduction=r),
                              lambda: (_reg()[0], torch.rand(6, 2, generator=_g(1), dtype=DT))),
        "SoftMarginLoss": (lambda r: nn.SoftMarginLoss(reduction=r), lambda: (_reg()[0], torch.sign(_reg()[1]))),
        "PoissonNLLLoss": (lambda r: nn.PoissonNLLLoss(reduction=r),
                           lambda: (_reg()[0], torch.rand(6, 2, generator=_g(1), dtype=DT))),
        "KLDivLoss": (lambda r: nn.KLDivLoss(reduction="batchmean" if r == "mean" else r),
                      lambda: (_reg()[0], torch.softmax(torch.randn(6, 2, generator=_g(1), dtype=DT), 1))),
    }
    for name, (make, data) in losses.items():
        for r in ("mean", "sum"):
            model = _mlp(nn.Tanh(), out=3 if name == "CrossEntropyLoss" else 2)
            out[f"loss:{name}:{r}"] = (model, make(r), data())
    for act in (nn.ReLU(), nn.GELU(), nn.SiLU(), nn.Sigmoid(), nn.Softplus(), nn.ELU(), nn.LeakyReLU(0.1),
                nn.Mish(), nn.Hardswish(), nn.Tanh()):
        out[f"act:{type(act).__name__}"] = (_mlp(act, out=3), nn.CrossEntropyLoss(), _cls())
    for train in (True, False):
        mode = "train" if train else "eval"
        for norm in (nn.BatchNorm1d(4), nn.LayerNorm(4), nn.GroupNorm(2, 4)):
            model = nn.Sequential(nn.Linear(3, 4), norm, nn.Tanh(), nn.Linear(4, 3)).train(train)
            out[f"norm:{type(norm).__name__}:{mode}"] = (model, nn.CrossEntropyLoss(), _cls())
    g = _g(2)
    seq = torch.randn(4, 5, 3, generator=g, dtype=DT)
    y = torch.randint(0, 2, (4,), generator=g)
    for cls in (nn.RNN, nn.GRU, nn.LSTM):
        out[f"rnn:{cls.__name__}"] = (LastStep(cls(3, 4, batch_first=True), 4, 2), nn.CrossEntropyLoss(), (seq, y))
        out[f"rnn:{cls.__name__}(PackedSequence)"] = (_Packed(cls(3, 4, batch_first=True), 4, 2),
                                                      nn.CrossEntropyLoss(), packed_batch(3))
    tokens = torch.randn(4, 5, 4, generator=g, dtype=DT)
    out["attention:MultiheadAttention"] = (_Attention(), nn.CrossEntropyLoss(), (tokens, y))
    layer = nn.TransformerEncoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    out["attention:TransformerEncoderLayer"] = (nn.Sequential(layer, nn.Flatten(), nn.Linear(20, 2)).eval(),
                                                nn.CrossEntropyLoss(), (tokens, y))
    idx = torch.randint(0, 6, (4, 5), generator=g)
    idx[0, 0] = 0
    out["embedding:Embedding"] = (_Embed(), nn.CrossEntropyLoss(), (idx, y))
    out["embedding:Embedding(padding_idx)"] = (_Embed(padding_idx=0), nn.CrossEntropyLoss(), (idx, y))
    images = torch.randn(3, 2, 6, 6, generator=g, dtype=DT)
    yi = torch.randint(0, 2, (3,), generator=g)
    convs = {
        "Conv2d+MaxPool2d": nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 2)),
        "Conv2d+AvgPool2d": nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(),
                                          nn.Linear(12, 2)),
        "ConvTranspose2d": nn.Sequential(nn.ConvTranspose2d(2, 1, 2, stride=2), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
                                         nn.Flatten(), nn.Linear(4, 2)),
        "Conv2d+GroupNorm": nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Tanh(), nn.AvgPool2d(2),
                                          nn.Flatten(), nn.Linear(16, 2)),
        "Conv1d": nn.Sequential(nn.Flatten(2), nn.Conv1d(2, 2, 5), nn.Tanh(), nn.Flatten(), nn.Linear(64, 2)),
    }
    for name, model in convs.items():
        out[f"conv:{name}"] = (model, nn.CrossEntropyLoss(), (images, yi))
    out.update(_more())
    return _initialized(out)


def _initialized(out):
    """Every case's parameters drawn from one seed (N(0, 0.25)), in float64."""
    for name, (model, loss, data) in out.items():
        torch.manual_seed(0)
        for p in model.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape) * 0.5)
        out[name] = (model.double(), loss, data)
    return out


def _more():
    """The rest of torch.nn that has a double backward: losses of several inputs (a
    plain callable splits the output), the other activations, RMS/instance/local response
    norms, 1d/3d convolutions, pools and unpooling, padding, resampling, fold, cells, a
    decoder layer and a whole Transformer, adaptive softmax, similarities, a lazy layer."""
    out = {}
    g = _g(3)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    sign = torch.where(torch.rand(6, generator=g) > 0.5, 1.0, -1.0).to(DT)
    labels = torch.randint(0, 3, (6,), generator=g)
    probabilities = torch.softmax(torch.randn(6, 3, generator=g, dtype=DT), 1)
    losses = {
        "NLLLoss": (lambda r: nn.NLLLoss(reduction=r), nn.LogSoftmax(1), 3, labels),
        "BCELoss": (lambda r: nn.BCELoss(reduction=r), nn.Sigmoid(), 2, torch.rand(6, 2, generator=g, dtype=DT)),
        "GaussianNLLLoss": (lambda r: lambda o, t: nn.GaussianNLLLoss(reduction=r)(o[:, :1], t, o[:, 1:].exp()),
                            nn.Identity(), 2, torch.randn(6, 1, generator=g, dtype=DT)),
        "CosineEmbeddingLoss": (lambda r: lambda o, t: nn.CosineEmbeddingLoss(-0.5, reduction=r)(o[:, :2], o[:, 2:], t),
                                nn.Identity(), 4, sign),
        "MarginRankingLoss": (lambda r: lambda o, t: nn.MarginRankingLoss(2.0, reduction=r)(o[:, 0], o[:, 1], t),
                              nn.Identity(), 2, sign),
        "HingeEmbeddingLoss": (lambda r: nn.HingeEmbeddingLoss(3.0, reduction=r), nn.Identity(), 1, sign[:, None]),
        "MultiLabelSoftMarginLoss": (lambda r: nn.MultiLabelSoftMarginLoss(reduction=r), nn.Identity(), 3,
                                     (probabilities > 0.3).to(DT)),
        "TripletMarginLoss": (lambda r: lambda o, t: nn.TripletMarginLoss(5.0, reduction=r)(*o.chunk(3, dim=1)),
                              nn.Identity(), 6, labels),
        "TripletMarginWithDistanceLoss": (lambda r: lambda o, t: nn.TripletMarginWithDistanceLoss(
            distance_function=nn.PairwiseDistance(), margin=5.0, reduction=r)(*o.chunk(3, dim=1)), nn.Identity(), 6, labels),
        "CrossEntropyLoss(weight, label_smoothing)": (lambda r: nn.CrossEntropyLoss(
            torch.tensor([1.0, 2.0, 0.5], dtype=DT), label_smoothing=0.1, reduction=r), nn.Identity(), 3, labels),
        "CrossEntropyLoss(probabilities)": (lambda r: nn.CrossEntropyLoss(reduction=r), nn.Identity(), 3, probabilities),
    }
    if hasattr(nn, "LinearCrossEntropyLoss"):  # torch >= 2.13; its own weight a constant here
        losses["LinearCrossEntropyLoss"] = (
            lambda r: _constant(nn.LinearCrossEntropyLoss(4, 3, reduction=r, dtype=DT)), nn.Identity(), 4, labels)
    for name, (make, last, width, target) in losses.items():
        for r in ("mean", "sum"):
            out[f"loss:{name}:{r}"] = (nn.Sequential(_mlp(nn.Tanh(), out=width), last), make(r), (x, target))
    for act in (nn.CELU(), nn.SELU(), nn.Hardtanh(-0.5, 0.5), nn.ReLU6(), nn.LogSigmoid(), nn.Softsign(),
                nn.Tanhshrink(), nn.Softshrink(0.2), nn.Hardshrink(0.2), nn.PReLU(4), nn.RReLU().eval(),
                nn.Threshold(0.1, 0.0), nn.Softmax(1), nn.Softmin(1), nn.LogSoftmax(1), nn.Dropout(0.5).eval()):
        out[f"act:{type(act).__name__}"] = (_mlp(act, out=3), nn.CrossEntropyLoss(), (x, labels))
    out["act:GLU"] = (nn.Sequential(nn.Linear(3, 4), nn.GLU(), nn.Linear(2, 3)), nn.CrossEntropyLoss(), (x, labels))
    out["layer:Bilinear"] = (_Bilinear(), nn.CrossEntropyLoss(), (x, labels))
    out["layer:CosineSimilarity+PairwiseDistance"] = (_Similarity(), nn.CrossEntropyLoss(), (x, labels))
    for train in (True, False):
        mode = "train" if train else "eval"
        norms = {
            "InstanceNorm1d": [nn.Linear(3, 8), nn.Unflatten(1, (2, 4)), nn.InstanceNorm1d(2, affine=True), nn.Flatten()],
            "RMSNorm": [nn.Linear(3, 8), nn.RMSNorm(8)],
            "LocalResponseNorm": [nn.Linear(3, 8), nn.Unflatten(1, (4, 2)), nn.LocalResponseNorm(2), nn.Flatten()],
        }
        for name, layers in norms.items():
            model = nn.Sequential(*layers, nn.Tanh(), nn.Linear(8, 3)).train(train)
            out[f"norm:{name}:{mode}"] = (model, nn.CrossEntropyLoss(), (x, labels))
    images = torch.randn(3, 2, 6, 6, generator=g, dtype=DT)
    yi = torch.randint(0, 2, (3,), generator=g)
    convs = {
        "Conv2d+BatchNorm2d:train": nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), *_head(48)).train(),
        "Conv2d+BatchNorm2d:eval": nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), *_head(48)).eval(),
        "Conv2d+InstanceNorm2d": nn.Sequential(nn.Conv2d(2, 3, 3), nn.InstanceNorm2d(3, affine=True), *_head(48)),
        "Conv2d(stride, dilation, groups)": nn.Sequential(nn.Conv2d(2, 4, 3, stride=2, padding=2, dilation=2, groups=2),
                                                          *_head(36)),
        "Conv2d(padding_mode=reflect)": nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), *_head(72)),
        "Conv2d(padding_mode=circular)": nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular"), *_head(72)),
        "ConvTranspose1d": nn.Sequential(nn.Flatten(2), nn.ConvTranspose1d(2, 1, 3, stride=2), *_head(73)),
        "MaxPool1d+AvgPool1d": nn.Sequential(nn.Flatten(2), nn.Conv1d(2, 2, 3), nn.Tanh(), nn.MaxPool1d(2), nn.AvgPool1d(2),
                                             *_head(16)),
        "LPPool1d": nn.Sequential(nn.Flatten(2), nn.Conv1d(2, 2, 3), nn.Softplus(), nn.LPPool1d(2, 2), *_head(34)),
        "LPPool2d": nn.Sequential(nn.Conv2d(2, 2, 3), nn.Softplus(), nn.LPPool2d(2, 2), *_head(8)),
        "AdaptiveMaxPool2d": nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.AdaptiveMaxPool2d(2), *_head(12)),
        "AdaptiveMaxPool1d+AdaptiveAvgPool1d": nn.Sequential(nn.Flatten(2), nn.Conv1d(2, 2, 3), nn.Tanh(),
                                                             nn.AdaptiveMaxPool1d(8), nn.AdaptiveAvgPool1d(3), *_head(6)),
        "Unfold+Fold": nn.Sequential(nn.Unfold(2, stride=2), nn.Tanh(), nn.Fold((6, 6), 2, stride=2), nn.Conv2d(2, 2, 3),
                                     *_head(32)),
        "PixelShuffle+PixelUnshuffle": nn.Sequential(nn.Conv2d(2, 4, 3), nn.PixelShuffle(2), nn.Tanh(),
                                                     nn.PixelUnshuffle(2), *_head(64)),
        "Upsample(nearest)": nn.Sequential(nn.Conv2d(2, 2, 3), nn.Upsample(scale_factor=2), nn.Tanh(), nn.Conv2d(2, 1, 3),
                                           *_head(36)),
        "Upsample(bilinear)": nn.Sequential(nn.Conv2d(2, 2, 3), nn.Upsample(scale_factor=2, mode="bilinear"), nn.Tanh(),
                                            nn.Conv2d(2, 1, 3), *_head(36)),
        "ReflectionPad2d+ReplicationPad2d": nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(2, 2, 3), nn.Tanh(),
                                                          nn.ReplicationPad2d(1), nn.Conv2d(2, 1, 3), *_head(36)),
        "CircularPad2d+ZeroPad2d+ConstantPad2d": nn.Sequential(nn.CircularPad2d(1), nn.Conv2d(2, 2, 3), nn.Tanh(),
                                                               nn.ZeroPad2d(1), nn.ConstantPad2d(1, 0.5),
                                                               nn.Conv2d(2, 1, 3), *_head(64)),
        "ChannelShuffle": nn.Sequential(nn.Conv2d(2, 4, 3), nn.ChannelShuffle(2), nn.Tanh(), nn.Conv2d(4, 1, 3), *_head(4)),
        "Softmax2d": nn.Sequential(nn.Conv2d(2, 3, 3), nn.Softmax2d(), nn.Flatten(), nn.Linear(48, 2)),
    }
    for name, model in convs.items():
        out[f"conv:{name}"] = (model, nn.CrossEntropyLoss(), (images, yi))
    volumes = torch.randn(2, 1, 4, 4, 4, generator=g, dtype=DT)
    yv = torch.randint(0, 2, (2,), generator=g)
    out["conv:Conv3d+MaxPool3d+AvgPool3d"] = (nn.Sequential(nn.Conv3d(1, 2, 2), nn.Tanh(), nn.MaxPool3d(1), nn.AvgPool3d(3),
                                                            nn.Flatten(), nn.Linear(2, 2)), nn.CrossEntropyLoss(), (volumes, yv))
    out["conv:ConvTranspose3d+AdaptiveAvgPool3d"] = (nn.Sequential(nn.ConvTranspose3d(1, 1, 2), nn.Tanh(),
                                                                   nn.AdaptiveAvgPool3d(2), nn.Flatten(), nn.Linear(8, 2)),
                                                     nn.CrossEntropyLoss(), (volumes, yv))
    steps = torch.randn(4, 3, generator=g, dtype=DT)
    ys = torch.randint(0, 2, (4,), generator=g)
    for cell in (nn.RNNCell(3, 4), nn.GRUCell(3, 4), nn.LSTMCell(3, 4)):
        out[f"rnn:{type(cell).__name__}"] = (_Cell(cell), nn.CrossEntropyLoss(), (steps, ys))
    layers = {"TransformerDecoderLayer": nn.TransformerDecoderLayer(4, 2, dim_feedforward=8, dropout=0.0, batch_first=True),
              "Transformer": nn.Transformer(4, 2, 1, 1, 8, dropout=0.0, batch_first=True)}
    for name, layer in layers.items():
        out[f"attention:{name}"] = (_SequenceToSequence(layer).eval(), nn.CrossEntropyLoss(),
                                    (torch.randn(4, 5, 4, generator=g, dtype=DT), ys))
    out["conv:MaxPool2d+MaxUnpool2d"] = (_Unpool(), nn.CrossEntropyLoss(), (images, yi))
    out["loss:AdaptiveLogSoftmaxWithLoss"] = (_AdaptiveSoftmax(), nn.NLLLoss(),
                                              (x, torch.randint(0, 6, (6,), generator=g)))
    out["act:AlphaDropout(eval)"] = (_mlp(nn.AlphaDropout(0.3), out=3).eval(), nn.CrossEntropyLoss(), (x, labels))
    lazy = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)).double()
    lazy(x)  # materialized by its first call, as in training
    out["layer:LazyLinear"] = (lazy, nn.CrossEntropyLoss(), (x, labels))
    return out


def _constant(loss):
    """``loss`` with its own parameters drawn once and fixed."""
    torch.manual_seed(1)
    for p in loss.parameters():
        p.requires_grad_(False).copy_(torch.randn(p.shape, dtype=p.dtype) * 0.5)
    return loss


def without_second_derivative():
    """Layers and losses whose backward PyTorch cannot differentiate (torch 2.13): the
    exact modes refuse them, ``mode="gradient-difference"`` does not need it."""
    g = _g(4)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    labels = torch.randint(0, 3, (6,), generator=g)
    several = torch.full((6, 3), -1, dtype=torch.long)
    several[:, 0], several[::2, 1] = labels, (labels[::2] + 1) % 3
    idx = torch.randint(0, 6, (4, 5), generator=g)
    ys = torch.randint(0, 2, (4,), generator=g)
    return _initialized({
        "MultiMarginLoss": (_mlp(nn.Tanh(), out=3), nn.MultiMarginLoss(margin=3.0), (x, labels)),
        "MultiLabelMarginLoss": (_mlp(nn.Tanh(), out=3), nn.MultiLabelMarginLoss(reduction="sum"), (x, several)),
        "Hardsigmoid": (_mlp(nn.Hardsigmoid(), out=3), nn.CrossEntropyLoss(), (x, labels)),
        "EmbeddingBag": (_Bag("mean"), nn.CrossEntropyLoss(), (idx, ys)),
        "CTCLoss": (nn.Sequential(nn.Linear(3, 4), nn.LogSoftmax(-1)),  # (time, batch, classes) log-probabilities
                    lambda o, t: nn.CTCLoss()(o, t, torch.tensor([5, 5]), torch.tensor([2, 2])),
                    (torch.randn(5, 2, 3, generator=g, dtype=DT), torch.tensor([[1, 2], [3, 1]]))),
    })
