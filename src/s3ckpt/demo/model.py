"""The demo's model: a small MLP regressor on synthetic data, deterministic for a given seed."""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class DemoRegressor(LightningModule):
    """A few-million-parameter MLP (tens of MB of checkpoint with Adam state): big enough for multipart
    uploads, small enough to train for a minute on two CPU cores."""

    def __init__(self, width: int = 768, depth: int = 4, lr: float = 1e-3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(64, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(width, width), nn.ReLU()]
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def freeze_backbone(self) -> list[str]:
        """Freeze every layer but the last (fine-tuning the head); returns the frozen parameters' names.

        The optimizer keeps every parameter (so a checkpoint of the full run still loads into it): Adam skips
        those without a gradient, so their weights and optimizer state stay the same bytes from save to save.
        """
        head = len(self.net) - 1
        self.net[:head].requires_grad_(False)
        return [name for name, p in self.named_parameters() if not p.requires_grad]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, prog_bar=False)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def demo_data(samples: int = 4096, batch_size: int = 64, seed: int = 0) -> DataLoader[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 64, generator=g)
    y = (x[:, :8].sum(dim=1, keepdim=True) + 0.1 * torch.randn(samples, 1, generator=g)).tanh()
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
