"""The benchmark models: an MLP, a small CNN and a small transformer, with one batch each."""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor, nn

SIZES = {
    # name: (mlp widths, cnn channels, transformer (d_model, layers), batch)
    "tiny": ((32, 64, 64, 10), (4, 8), (16, 1), 16),
    "small": ((256, 512, 512, 10), (16, 32), (64, 2), 128),
    "large": ((1024, 2048, 2048, 10), (64, 128), (256, 4), 256),
}


class _Transformer(nn.Module):
    def __init__(self, d_model: int, layers: int, seq: int = 32, vocab: int = 10):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).mean(dim=1))


def build(size: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Dict[str, Tuple[nn.Module, Tensor, Tensor]]:
    """{name: (model in eval mode, inputs, integer class targets)} for cross-entropy."""
    widths, (c1, c2), (d_model, layers), batch = SIZES[size]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp_layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mlp_layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            mlp_layers.append(nn.Tanh())
    models = {
        "MLP": (nn.Sequential(*mlp_layers), torch.randn(batch, widths[0], generator=gen)),
        "CNN": (
            nn.Sequential(
                nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                nn.Flatten(), nn.Linear(16 * c2, 10),
            ),
            torch.randn(batch, 3, 32, 32, generator=gen),
        ),
        "transformer": (_Transformer(d_model, layers), torch.randn(batch, 32, d_model, generator=gen)),
    }
    out = {}
    for name, (model, x) in models.items():
        y = torch.randint(0, 10, (x.shape[0],), generator=gen)
        out[name] = (model.to(device, dtype).eval(), x.to(device, dtype), y.to(device))
    return out


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
