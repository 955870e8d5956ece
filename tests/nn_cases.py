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


class _Pick(nn.Module):
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
        out[f"rnn:{cls.__name__}"] = (_Pick(cls(3, 4, batch_first=True), 4, 2), nn.CrossEntropyLoss(), (seq, y))
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
    for name, (model, loss, data) in out.items():
        torch.manual_seed(0)
        for p in model.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape) * 0.5)
        out[name] = (model.double(), loss, data)
    return out
