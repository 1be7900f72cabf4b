"""AVL, Adaptive Visual Learning: per-step re-weighting of the visual branch's gradients.

At every training step (every ``avl_interval``-th step; K_v is held in between):

1. ``L`` is the backbone's own loss; without gradient, ``L_v`` is the same loss with the text
   input masked (image only) and ``L_t`` with the image input masked (text only). The two
   masked passes run in eval mode (no dropout): they measure each modality, not dropout noise,
   and cost less than a training forward.
2. Running means: ``L̄ <- m L̄ + (1 - m) L`` (exponential, ``avl_momentum`` = m) or the cumulative
   mean of all values so far (``avl_momentum: ~``); the first value initialises them. They are
   updated with the step's values *before* use, so the first step gives K_v = 1.
3. ``r_v = exp(L_v - L_t)``, ``r̄_v = exp(L̄_v - L̄_t)``.
4. ``K_v = clamp(exp(alpha (r_v - r̄_v)), k_min, k_max)``.
5. During backward, tensor hooks multiply the gradient of every visual parameter (image
   feature table, image projection, image gate head) by K_v, so clipping and the optimiser
   step see the re-weighted gradients; other gradients are untouched.

The running means live in the model buffer ``avl_running_losses`` (mean_v, mean_t, count), so
RecBole's checkpoints save them and ``resume_checkpoint`` restores them.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from reveal_recbole.errors import ConfigError

CSV_COLUMNS = (
    "epoch", "step", "loss", "loss_v", "loss_t", "mean_v", "mean_t", "k_v", "grad_norm_image", "grad_norm_text",
)


def visual_weight(loss_v, loss_t, mean_v, mean_t, alpha: float = 1.0, k_min: float = 0.1, k_max: float = 10.0):
    """K_v = clamp(exp(alpha (r_v - r̄_v)), k_min, k_max), for floats or tensors, without overflow."""
    loss_v, loss_t, mean_v, mean_t = (torch.as_tensor(x, dtype=torch.float64) for x in (loss_v, loss_t, mean_v, mean_t))
    r_v = torch.exp(torch.clamp(loss_v - loss_t, max=50.0))
    r_bar = torch.exp(torch.clamp(mean_v - mean_t, max=50.0))
    exponent = torch.clamp(alpha * (r_v - r_bar), min=math.log(k_min), max=math.log(k_max))
    return torch.exp(exponent)


def update_running_mean(mean, value, count, momentum: Optional[float]) -> torch.Tensor:
    """The running mean after ``count`` earlier values: exponential with ``momentum``, else cumulative.

    Branch-free on tensors (no device sync): the first value initialises either mean.
    """
    mean, value, count = (torch.as_tensor(x, dtype=torch.float64) for x in (mean, value, count))
    if momentum is None:
        return mean + (value - mean) / (count + 1)
    return torch.where(count == 0, value, momentum * mean + (1.0 - momentum) * value)


def total_loss(losses) -> torch.Tensor:
    return sum(losses) if isinstance(losses, tuple) else losses


@torch.no_grad()
def masked_losses(model, interaction, visual: str = "image", text: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
    """(L_v, L_t): the model's loss on the batch with text masked, then with the image masked."""
    encoder = model.item_embedding
    was_training = model.training
    model.eval()
    try:
        with encoder.masking([text]):
            loss_v = total_loss(model.calculate_loss(interaction)).float()
        with encoder.masking([visual]):
            loss_t = total_loss(model.calculate_loss(interaction)).float()
    finally:
        model.train(was_training)
    return loss_v, loss_t


def all_reduce_mean(*values: torch.Tensor) -> list[torch.Tensor]:
    """Average across processes so every rank computes the same K_v (no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    stacked = torch.stack(values)
    dist.all_reduce(stacked)
    return list(stacked / dist.get_world_size())


def config_number(config, key: str, kind: type):
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise ConfigError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


@dataclass
class AVLConfig:
    alpha: float = 1.0
    k_min: float = 0.1
    k_max: float = 10.0
    momentum: Optional[float] = 0.9
    interval: int = 1
    visual: str = "image"
    text: str = "text"

    @classmethod
    def from_config(cls, config) -> "AVLConfig":
        values = dict(
            alpha=config_number(config, "avl_alpha", float), k_min=config_number(config, "avl_min", float),
            k_max=config_number(config, "avl_max", float),
            momentum=None if config["avl_momentum"] is None else config_number(config, "avl_momentum", float),
            interval=config_number(config, "avl_interval", int),
        )
        if not 0 < values["k_min"] <= 1 <= values["k_max"]:
            raise ConfigError(f"AVL needs 0 < avl_min <= 1 <= avl_max, got {values['k_min']}, {values['k_max']}")
        if values["interval"] < 1:
            raise ConfigError(f"avl_interval must be >= 1, got {values['interval']}")
        if values["momentum"] is not None and not 0 <= values["momentum"] < 1:
            raise ConfigError(f"avl_momentum must be in [0, 1) or null, got {values['momentum']}")
        return cls(**values)


@dataclass
class AdaptiveVisualLearning:
    """AVL state for one model: the running means, the current K_v, hooks and per-step records."""

    model: torch.nn.Module
    settings: AVLConfig = field(default_factory=AVLConfig)
    step: int = 0

    def __post_init__(self):
        encoder = self.model.item_embedding
        self.k_v = torch.ones((), device=self.model.avl_running_losses.device)
        self._grad_sq = {}
        self._records: list[dict] = []
        self._pending: Optional[dict] = None
        self._hooks = []
        for modality, scale in ((self.settings.visual, True), (self.settings.text, False)):
            for param in encoder.modality_parameters(modality):
                self._hooks.append(param.register_hook(self._gradient_hook(modality, scale)))

    def _gradient_hook(self, modality: str, scale: bool):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if scale:
                grad = grad * self.k_v.to(grad.dtype)
            norm_sq = grad.detach().float().pow(2).sum()
            self._grad_sq[modality] = self._grad_sq.get(modality, 0.0) + norm_sq
            return grad

        return hook

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def update(self, loss_v: torch.Tensor, loss_t: torch.Tensor) -> torch.Tensor:
        """Fold one step's masked losses into the running means and return the new K_v."""
        state = self.model.avl_running_losses
        loss_v, loss_t = all_reduce_mean(loss_v.detach().to(state), loss_t.detach().to(state))
        state[0] = update_running_mean(state[0], loss_v, state[2], self.settings.momentum)
        state[1] = update_running_mean(state[1], loss_t, state[2], self.settings.momentum)
        state[2] += 1
        s = self.settings
        self.k_v = visual_weight(loss_v, loss_t, state[0], state[1], s.alpha, s.k_min, s.k_max).to(state)
        return self.k_v

    def training_loss(self, interaction) -> torch.Tensor:
        """The loss function handed to RecBole's training loop: L, after updating K_v for this step."""
        self._flush_step()
        loss = total_loss(self.model.calculate_loss(interaction))
        loss_v = loss_t = None
        if self.step % self.settings.interval == 0:
            loss_v, loss_t = masked_losses(self.model, interaction, self.settings.visual, self.settings.text)
            self.update(loss_v, loss_t)
        state = self.model.avl_running_losses
        self._pending = {
            "step": self.step, "loss": loss.detach(), "loss_v": loss_v, "loss_t": loss_t,
            "mean_v": state[0].clone(), "mean_t": state[1].clone(), "k_v": self.k_v.clone(),
        }
        self.step += 1
        return loss

    def _flush_step(self) -> None:
        """Record the previous step once its backward has run (its gradient norms are then known)."""
        if self._pending is None:
            return
        row = self._pending
        for modality, column in ((self.settings.visual, "grad_norm_image"), (self.settings.text, "grad_norm_text")):
            row[column] = torch.as_tensor(self._grad_sq.get(modality, 0.0)).sqrt()
        self._records.append(row)
        self._pending = None
        self._grad_sq = {}

    def end_epoch(self, epoch: int, csv_path: Optional[str] = None) -> dict[str, float]:
        """Write the epoch's per-step rows to ``csv_path`` and return epoch means for logging."""
        self._flush_step()
        rows = []
        for record in self._records:
            row = {k: (float(v) if v is not None else float("nan")) for k, v in record.items()}
            rows.append(row | {"epoch": epoch, "step": record["step"]})
        self._records = []
        if csv_path is not None and rows:
            new_file = not os.path.exists(csv_path)
            with open(csv_path, "a", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
                if new_file:
                    writer.writeheader()
                writer.writerows({k: row[k] for k in CSV_COLUMNS} for row in rows)
        if not rows:
            return {}
        mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
        return {
            "k_v": mean("k_v"),
            "mean_v": rows[-1]["mean_v"],
            "mean_t": rows[-1]["mean_t"],
            "grad_norm_image": mean("grad_norm_image"),
            "grad_norm_text": mean("grad_norm_text"),
        }
