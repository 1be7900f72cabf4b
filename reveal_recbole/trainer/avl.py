"""AVL, Adaptive Visual Learning: per-step re-weighting of the visual branch's gradients.

Two variants (``avl_variant``), both read from the authors' code (YutongLi2024/REVEAL):

- ``reveal``: :func:`visual_weight`, the paper's K_v on the image gradients only
  (REVEAL/AVL/trainers.py, ``M3SRecTrainer._avl_compute_Kv``, clamp ``avl_kappa_min/max``
  0.1 / 10);
- ``agm``: :func:`agm_weights`, the AGM-style trainer their entry point M3SRec/main.py runs
  (M3SRec/trainers.py, ``FinetuneTrainer._agm_compute_kappas``): kappa for the image *and* the
  text gradients, clamp ``agm_kappa_min/max`` 0.2 / 2.0, ``agm_alpha`` 1.0.

Both trainers keep *cumulative* means, updated with the step's value before use
(``t += 1; bar = bar * (t - 1) / t + L / t``), which is ``avl_momentum: ~`` here.

At every training step (every ``avl_interval``-th step; K_v is held in between):

1. ``L`` is the backbone's own loss; without gradient, ``L_v`` is the same loss with the text
   input masked (image only) and ``L_t`` with the image input masked (text only). The two
   masked passes run in eval mode (no dropout): they measure each modality, not dropout noise,
   and cost less than a training forward.
2. Running means: ``L̄ <- m L̄ + (1 - m) L`` (exponential, ``avl_momentum`` = m) or the cumulative
   mean of all values so far (``avl_momentum: ~``); the first value initialises them. They are
   updated with the step's values *before* use, so the first step gives K_v = 1.
3. ``r_v = exp(L_v - L_t)``, ``r̄_v = exp(L̄_v - L̄_t)``.
4. ``K_v = clamp(exp(alpha (r_v - r̄_v)), k_min, k_max)`` (``agm``: see :func:`agm_weights`).
5. During backward, tensor hooks multiply the gradient of every visual parameter (image
   feature table, image projection, image gate head or experts) by K_v (``agm``: and every text
   parameter by K_t), so clipping and the optimiser step see the re-weighted gradients; other
   gradients are untouched. The hooks exist only while the trainer runs a training epoch, so a
   later trainer (or any backward outside training) on the same model never meets a stale K_v.

The running means live in the model buffer ``avl_running_losses`` (mean_v, mean_t, count), so
RecBole's checkpoints save them and ``resume_checkpoint`` restores them. Under DDP every rank folds
in the same cross-rank means, so the buffer agrees across ranks without DDP broadcasting it.

Under AMP, RecBole backpropagates ``GradScaler.scale(L)``: the hooks see gradients times the
scale, which K_v multiplies as it would the true ones (the scaler divides it out before the
optimiser step); the logged gradient norms are divided by it (:meth:`AdaptiveVisualLearning._record_loss_scale`).
"""
from __future__ import annotations

import contextlib
import csv
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from reveal_recbole.errors import ConfigError

CSV_COLUMNS = (
    "epoch", "step", "loss", "loss_v", "loss_t", "mean_v", "mean_t", "k_v", "k_t", "grad_norm_image", "grad_norm_text",
)
AVL_VARIANTS = ("reveal", "agm")
# what ``auto`` resolves to: each trainer's own constants and its running mean (None = cumulative)
VARIANT_DEFAULTS = {
    "reveal": {"k_min": 0.1, "k_max": 10.0, "momentum": 0.9},  # clamp of REVEAL/AVL/trainers.py; EMA: this project's
    "agm": {"k_min": 0.2, "k_max": 2.0, "momentum": None},  # agm_kappa_min/max of M3SRec/main.py, cumulative means
}


def visual_weight(loss_v, loss_t, mean_v, mean_t, alpha: float = 1.0, k_min: float = 0.1, k_max: float = 10.0):
    """K_v = clamp(exp(alpha (r_v - r̄_v)), k_min, k_max), for floats or tensors, without overflow."""
    loss_v, loss_t, mean_v, mean_t = (torch.as_tensor(x, dtype=torch.float64) for x in (loss_v, loss_t, mean_v, mean_t))
    r_v = torch.exp(torch.clamp(loss_v - loss_t, max=50.0))
    r_bar = torch.exp(torch.clamp(mean_v - mean_t, max=50.0))
    exponent = torch.clamp(alpha * (r_v - r_bar), min=math.log(k_min), max=math.log(k_max))
    return torch.exp(exponent)


def _safe_exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(torch.clamp(x, max=50.0))


def agm_weights(loss_v, loss_t, mean_v, mean_t, alpha: float = 1.0, k_min: float = 0.2, k_max: float = 2.0):
    """(kappa_v, kappa_t), the authors' AGM-style weights, for floats or tensors, without overflow.

    M3SRec/trainers.py, ``FinetuneTrainer._agm_compute_kappas``, on scores ``s = -L``::

        r_img = exp(s_img - s_txt);  tau_img = exp(hat_s_img - hat_s_txt)   (hat_s: running means of s)
        kappa_img = clamp(exp(-alpha (r_img - tau_img)), agm_kappa_min, agm_kappa_max)   and the same for text

    The means of ``-L`` are minus the means of ``L`` (for either running mean), so ``r_img =
    exp(L_t - L_v)`` and ``tau_img = exp(L̄_t - L̄_v)``. Images doing worse than usual against text
    give kappa_v > 1 (and kappa_t < 1), as K_v does, but through ``exp(-(e^-d - e^-d̄))`` in
    place of ``exp(e^d - e^d̄)``, d = L_v - L_t, and with the text gradients damped as well.
    """
    loss_v, loss_t, mean_v, mean_t = (torch.as_tensor(x, dtype=torch.float64) for x in (loss_v, loss_t, mean_v, mean_t))
    low, high = math.log(k_min), math.log(k_max)
    r_v, tau_v = _safe_exp(loss_t - loss_v), _safe_exp(mean_t - mean_v)
    r_t, tau_t = _safe_exp(loss_v - loss_t), _safe_exp(mean_v - mean_t)
    kappa_v = torch.exp(torch.clamp(-alpha * (r_v - tau_v), min=low, max=high))
    kappa_t = torch.exp(torch.clamp(-alpha * (r_t - tau_t), min=low, max=high))
    return kappa_v, kappa_t


def modality_weights(variant: str, loss_v, loss_t, mean_v, mean_t, alpha: float, k_min: float, k_max: float):
    """(K_v, K_t): the gradient weights of the visual and text parameters under ``variant``."""
    if variant == "agm":
        return agm_weights(loss_v, loss_t, mean_v, mean_t, alpha, k_min, k_max)
    k_v = visual_weight(loss_v, loss_t, mean_v, mean_t, alpha, k_min, k_max)
    return k_v, torch.ones_like(k_v)


def update_running_mean(mean, value, count, momentum: Optional[float]) -> torch.Tensor:
    """The running mean after ``count`` earlier values: exponential with ``momentum``, else cumulative.

    Branch-free on tensors (no device sync): the first value initialises either mean. The
    cumulative form ``mean + (value - mean) / (count + 1)`` is the authors'
    ``bar * (t - 1) / t + value / t`` with ``t = count + 1``, rearranged.
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


AUTO = "auto"  # a setting that follows the variant (VARIANT_DEFAULTS)


@dataclass
class AVLConfig:
    """AVL settings; ``auto`` clamps and momentum take the variant's defaults."""

    alpha: float = 1.0
    k_min: float | str = AUTO
    k_max: float | str = AUTO
    momentum: Optional[float] | str = AUTO
    interval: int = 1
    visual: str = "image"
    text: str = "text"
    variant: str = "reveal"

    def __post_init__(self):
        if self.variant not in AVL_VARIANTS:
            raise ConfigError(f"avl_variant must be one of {AVL_VARIANTS}, got {self.variant!r}")
        for name, value in VARIANT_DEFAULTS[self.variant].items():
            if getattr(self, name) == AUTO:
                setattr(self, name, value)
        if not 0 < self.k_min <= 1 <= self.k_max:
            raise ConfigError(f"AVL needs 0 < avl_min <= 1 <= avl_max, got {self.k_min}, {self.k_max}")
        if self.interval < 1:
            raise ConfigError(f"avl_interval must be >= 1, got {self.interval}")
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ConfigError(f"avl_momentum must be in [0, 1), null (cumulative) or auto, got {self.momentum}")

    @classmethod
    def from_config(cls, config) -> "AVLConfig":
        def number_or_auto(key: str):
            return AUTO if config[key] == AUTO else config_number(config, key, float)

        return cls(
            alpha=config_number(config, "avl_alpha", float), k_min=number_or_auto("avl_min"),
            k_max=number_or_auto("avl_max"),
            momentum=None if config["avl_momentum"] is None else number_or_auto("avl_momentum"),
            interval=config_number(config, "avl_interval", int),
            variant=config["avl_variant"] or "reveal",  # a config saved before avl_variant existed
        )


@dataclass
class AdaptiveVisualLearning:
    """AVL state for one model: the running means, the current K_v (and K_t), hooks and per-step records.

    The gradient hooks are attached by :meth:`gradient_hooks` (the trainer wraps each training
    epoch in it) or :meth:`attach_hooks`, never at construction.
    """

    model: torch.nn.Module
    settings: AVLConfig = field(default_factory=AVLConfig)
    step: int = 0

    def __post_init__(self):
        device = self.model.avl_running_losses.device
        self.k_v = torch.ones((), device=device)
        self.k_t = torch.ones((), device=device)
        self._grad_sq = {}
        self._records: list[dict] = []
        self._pending: Optional[dict] = None
        self._loss_scale: Optional[torch.Tensor] = None
        self._hooks = []

    def _record_loss_scale(self, grad: torch.Tensor) -> None:
        """Keep the gradient reaching the loss: 1, or the GradScaler's scale under AMP.

        RecBole's GradScaler is local to its epoch loop; the loss's own gradient is that scale
        whichever scaler (or none) ran the backward, and it arrives before any parameter's.
        """
        self._loss_scale = grad.detach().float()

    def _gradient_hook(self, modality: str, weight: str | None):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if weight is not None:
                grad = grad * getattr(self, weight).to(grad.dtype)
            norm_sq = grad.detach().float().pow(2).sum()
            self._grad_sq[modality] = self._grad_sq.get(modality, 0.0) + norm_sq
            return grad

        return hook

    def attach_hooks(self) -> None:
        """Scale the visual (``agm``: and text) gradients by the current weights; record each modality's norm."""
        if self._hooks:
            return
        encoder = self.model.item_embedding
        text_weight = "k_t" if self.settings.variant == "agm" else None  # reveal leaves text gradients bit-identical
        for modality, weight in ((self.settings.visual, "k_v"), (self.settings.text, text_weight)):
            for param in encoder.modality_parameters(modality):
                self._hooks.append(param.register_hook(self._gradient_hook(modality, weight)))

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    @contextlib.contextmanager
    def gradient_hooks(self):
        """The hooks for the block only: removed when it ends or raises."""
        self.attach_hooks()
        try:
            yield
        finally:
            self.remove_hooks()

    def update(self, loss_v: torch.Tensor, loss_t: torch.Tensor) -> torch.Tensor:
        """Fold one step's masked losses into the running means (before use), set K_v and K_t, return K_v."""
        state = self.model.avl_running_losses
        loss_v, loss_t = all_reduce_mean(loss_v.detach().to(state), loss_t.detach().to(state))
        state[0] = update_running_mean(state[0], loss_v, state[2], self.settings.momentum)
        state[1] = update_running_mean(state[1], loss_t, state[2], self.settings.momentum)
        state[2] += 1
        s = self.settings
        k_v, k_t = modality_weights(s.variant, loss_v, loss_t, state[0], state[1], s.alpha, s.k_min, s.k_max)
        self.k_v, self.k_t = k_v.to(state), k_t.to(state)
        return self.k_v

    def training_loss(self, interaction) -> torch.Tensor:
        """The loss function handed to RecBole's training loop: L, after updating K_v for this step."""
        self._flush_step()
        loss = total_loss(self.model.calculate_loss(interaction))
        if loss.requires_grad:
            loss.register_hook(self._record_loss_scale)
        loss_v = loss_t = None
        if self.step % self.settings.interval == 0:
            loss_v, loss_t = masked_losses(self.model, interaction, self.settings.visual, self.settings.text)
            self.update(loss_v, loss_t)
        state = self.model.avl_running_losses
        self._pending = {
            "step": self.step, "loss": loss.detach(), "loss_v": loss_v, "loss_t": loss_t,
            "mean_v": state[0].clone(), "mean_t": state[1].clone(), "k_v": self.k_v.clone(), "k_t": self.k_t.clone(),
        }
        self.step += 1
        return loss

    def _flush_step(self) -> None:
        """Record the previous step once its backward has run (its gradient norms are then known)."""
        if self._pending is None:
            return
        row = self._pending
        scale = 1.0 if self._loss_scale is None else self._loss_scale
        for modality, column in ((self.settings.visual, "grad_norm_image"), (self.settings.text, "grad_norm_text")):
            row[column] = torch.as_tensor(self._grad_sq.get(modality, 0.0)).sqrt() / scale
        self._records.append(row)
        self._pending = None
        self._grad_sq = {}
        self._loss_scale = None

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
        summary = {"k_v": mean("k_v")} | ({"k_t": mean("k_t")} if self.settings.variant == "agm" else {})
        return summary | {
            "mean_v": rows[-1]["mean_v"],
            "mean_t": rows[-1]["mean_t"],
            "grad_norm_image": mean("grad_norm_image"),
            "grad_norm_text": mean("grad_norm_text"),
        }
