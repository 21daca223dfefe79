"""OccamNets (Shrestha, Kafle & Kanan, ECCV 2022): a ResNet-18 with an early exit after each of its
four stages, trained to answer from the earliest exit that can and to look at few places.

Architecture
- Trunk: `tasks.models.vision.SmallImageResNet` (the small-image ResNet-18: 3x3 stride-1 stem, no
  max-pool, stages of width w, 2w, 4w, 8w), without its pooling and `fc`. Its parameter names are
  resnet18's, and at one seed its initial trunk weights are too.
- Exit i (after stage i, C = C_i channels): Conv3x3 (C -> C/4), BN, ReLU, Conv3x3 (C/4 -> C), ReLU:
  `cam_in` (B, C, H_i, W_i). The class activation map is a Conv1x1 (C -> K) of it, the exit's logits
  its spatial mean. Exit 0 reads a detached copy of stage 1, so it never trains the trunk.
- Gate i: Linear(C, 16), BN1d, ReLU, Linear(16, 1) on the spatially pooled `cam_in.detach()`; the
  raw output is the gate logit, sigmoid of it the probability of exiting.
- Inference: per example, the first exit from 1 on whose gate probability is >= 0.5, else the last
  (exit 3). Exit 0 is never used at inference. A training-mode forward without targets returns the
  same gated choice (with the gates' batch statistics), so `model(x)` means one thing in both modes.

Training loss (`model(x, targets=y)` returns `(loss, measurements)`; `own_loss = True` tells the
default objective, `methods.training.cross_entropy`, to use it), summed over the four exits:
1. CAM suppression, weight `cam_suppression` (0.1): on the true class's map, the cells at or below
   that map's spatial mean get KL(uniform || softmax over classes of the map at that cell); averaged
   over those cells per example, then over the batch.
2. Gate BCE, weight `gate_loss` (1.0), against "this exit's argmax is correct", on the raw gate
   logit (`binary_cross_entropy_with_logits`: finite when a gate saturates), class-balanced: the
   positives' mean and the negatives' mean count half each (a batch with one kind only: its mean).
   Targets are frozen as the paper's: while exit i's running training accuracy (an exponential
   average over training batches, momentum `ACC_MOMENTUM`) is under `gate_thresholds[i]` ([0.5,
   0.6, 0.7, 0.8]), the target is the exit's current correctness; once it has passed, each training
   example's target is fixed at its correctness the first time the example is seen from then on
   (examples are told apart by a hash of their pixels: the loop passes no example ids).
3. Main CE, per example weighted by p_true^gamma0 (exit 0; gamma0 = 3; p_true the exit's own
   softmax probability of the true class, detached) or by 1 - the previous exit's gate probability
   (detached) for exits 1-3, each exit's weights divided by their maximum over the batch plus the
   paper's offset `weight_offset` (0.1); mean over the batch.

Computation
- Exit logits are the Conv1x1 applied to the pooled `cam_in` (`F.linear` with the conv's weight): the
  conv is linear, so this equals the spatial mean of the map, and it gives the head a vector to read.
  The full maps are computed only for the suppression term.
- Gate BN1d with a one-row training batch (the last batch of an epoch can be one row) normalises
  with its running statistics instead of failing; it does not update them.

Departures from the paper's code (erobic/occam-nets-v1)
- The running accuracy that freezes gate targets is an exponential average over batches (momentum
  0.9), not the epoch's accuracy (a model does not see epochs); examples are identified by a hash
  of their pixels, not by ids.
- Class balancing: each kind counts half (the brief's choice); theirs weights by
  (1 / normalised count) ** 0.5.
- Main-CE weights are divided by their maximum over the batch, not the running maximum of the epoch,
  before the +0.1 offset.
- CAM suppression is averaged over the suppressed cells; theirs averages over all cells (so a map
  with fewer suppressed cells weighs less there).
- The gate BCE uses raw logits, theirs `binary_cross_entropy` of the sigmoid (which saturates).
- The exits' first conv (followed by BN) has no bias; theirs has one, which BN cancels.
- Default width 58, the paper's: about resnet18's parameter count at width 64.

Features (`forward(x, intermediates=True)`): `stem`, `layer1`..`layer4` as in resnet18 (so guidance
pairs and analyses line up with it), and `pool`: what the head reads, the pooled `cam_in` of exits
1-3 and their three gate logits, concatenated (B, 2w + 4w + 8w + 3). `head` (the exits' class-map
convs and the inference rule) maps it to the logits, bit for bit. The class-map convs form the head,
like resnet18's `fc`: masks leave them out unless `selection.head`; the exits' other convs and the
gates' linears are ordinary maskable weights, their norms norms.
"""

from __future__ import annotations

import hashlib
import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from tasks.base import register_model, require_rgb
from tasks.models.vision import SmallImageResNet

N_EXITS = 4
FIRST_INFERENCE_EXIT = 1
GATE_HIDDEN = 16
ACC_MOMENTUM = 0.9  # of the exits' running training accuracy (gate-target freezing)


class OccamResNet18Config(Frozen):
    name: Literal["occam_resnet18"] = "occam_resnet18"
    width: int = Field(58, ge=4, description="channels of the first stage; 58 is the paper's OccamResNet-18")
    cam_suppression: float = Field(0.1, ge=0, description="weight of the CAM suppression term")
    gate_loss: float = Field(1.0, ge=0, description="weight of the gates' BCE term")
    gamma0: float = Field(3.0, ge=0, description="exit 0's CE weight is p_true ** gamma0")
    gate_thresholds: tuple[float, float, float, float] = Field(
        (0.5, 0.6, 0.7, 0.8), description="per exit: running training accuracy above which its gate targets freeze"
    )
    weight_offset: float = Field(0.1, ge=0, description="added to each exit's main-CE weights after max-normalising")


class Exit(nn.Module):
    """Stage output (B, C, H, W) -> `cam_in` (B, C, H, W)."""

    def __init__(self, channels: int):
        super().__init__()
        hidden = max(1, channels // 4)
        self.conv1 = nn.Conv2d(channels, hidden, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.bn(self.conv1(x)))))


class Gate(nn.Module):
    """Pooled `cam_in` (B, C) -> gate logit (B,)."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc1 = nn.Linear(channels, GATE_HIDDEN)
        self.bn = nn.BatchNorm1d(GATE_HIDDEN)
        self.fc2 = nn.Linear(GATE_HIDDEN, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if self.training and h.shape[0] == 1:  # batch statistics of one row are undefined
            bn = self.bn
            h = F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        else:
            h = self.bn(h)
        return self.fc2(F.relu(h)).squeeze(1)


class ExitHeads(nn.Module):
    """The exits' class-map convs (1x1, C_i -> K) and the inference rule.

    `forward(pool)` reads the `pool` feature (pooled `cam_in` of exits 1-3, then their gate logits)
    and returns each example's logits from the exit `route` picks.
    """

    def __init__(self, widths: tuple[int, ...], n_classes: int):
        super().__init__()
        self.widths = widths
        self.cams = nn.ModuleList(nn.Conv2d(c, n_classes, kernel_size=1) for c in widths)

    def logits(self, i: int, pooled: torch.Tensor) -> torch.Tensor:
        """Exit i's logits (B, K) from its pooled `cam_in` (B, C_i): the spatial mean of its map."""
        cam = self.cams[i]
        return F.linear(pooled, cam.weight.flatten(1), cam.bias)

    def maps(self, i: int, cam_in: torch.Tensor) -> torch.Tensor:
        """Exit i's class activation maps (B, K, H, W)."""
        return self.cams[i](cam_in)

    def forward(self, pool: torch.Tensor) -> torch.Tensor:
        used = self.widths[FIRST_INFERENCE_EXIT:]
        *pooled, gate_logits = pool.split([*used, len(used)], dim=1)
        logits = torch.stack([self.logits(FIRST_INFERENCE_EXIT + j, p) for j, p in enumerate(pooled)], 1)
        choice = route(gate_logits)  # (B,) index into the used exits
        return logits[torch.arange(len(logits), device=logits.device), choice]


def route(gate_logits: torch.Tensor) -> torch.Tensor:
    """(B, E) gate logits of the inference exits -> (B,) index of the first with sigmoid >= 0.5,
    else the last."""
    take = torch.sigmoid(gate_logits) >= 0.5
    take[:, -1] = True
    return take.to(torch.uint8).argmax(1)  # argmax returns the first of equal maxima


class OccamResNet(SmallImageResNet):
    """OccamResNet-18 for small images. See the module doc."""

    head_name = "head"
    penultimate = "pool"
    own_loss = True  # forward(x, targets=y) -> (loss, measurements)

    def __init__(self, cfg: OccamResNet18Config, n_classes: int):
        super().__init__(cfg.width, n_classes)
        del self.fc, self.avgpool  # the exits classify
        self.cfg = cfg
        widths = tuple(cfg.width * 2**i for i in range(N_EXITS))
        self.exits = nn.ModuleList(Exit(c) for c in widths)
        self.gates = nn.ModuleList(Gate(c) for c in widths)
        self.head = ExitHeads(widths, n_classes)
        for m in [*self.exits.modules(), *self.head.modules()]:  # the trunk's (and paper's) conv init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        # Training state of the gate targets (not parameters, not in the state dict): each exit's
        # running training accuracy, and per exit the frozen target of each example seen since it passed
        # its threshold, keyed by a hash of the example's pixels.
        # Python state read and written per example: the vmapped engine cannot hold one per model,
        # so OccamNets train alone (`methods.packing` refuses a module with `python_state`).
        self.python_state = True
        self.exit_accuracy: list[float | None] = [None] * N_EXITS
        self.frozen_targets: list[dict[bytes, float]] = [{} for _ in range(N_EXITS)]

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("stem", "layer1", "layer2", "layer3", "layer4", "pool")

    def run(self, x: torch.Tensor):
        """Trunk features, every exit's `cam_in`, pooled `cam_in` (B, C_i) and gate logit (B,)."""
        features: dict[str, torch.Tensor] = {}
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        features["stem"] = x
        cam_ins, pooled, gates = [], [], []
        for i, name in enumerate(("layer1", "layer2", "layer3", "layer4")):
            x = getattr(self, name)(x)
            features[name] = x
            cam_in = self.exits[i](x.detach() if i == 0 else x)  # exit 0 never trains the trunk
            p = cam_in.mean((2, 3))
            cam_ins.append(cam_in)
            pooled.append(p)
            gates.append(self.gates[i](p.detach()))
        return features, cam_ins, pooled, gates

    def forward(
        self, x: torch.Tensor, intermediates: bool = False, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits (B, n_classes) of the gated exits; with `intermediates`, `(logits, features)`;
        with `targets` (B,), `(loss, measurements)`: the OccamNets training loss."""
        features, cam_ins, pooled, gates = self.run(x)
        if targets is not None:
            if intermediates:
                raise ValueError("forward: pass either targets (for the loss) or intermediates, not both")
            return self.loss(cam_ins, pooled, gates, targets, x)
        used = slice(FIRST_INFERENCE_EXIT, None)
        features["pool"] = torch.cat([*pooled[used], torch.stack(gates[used], 1)], 1)
        logits = self.head(features["pool"])
        return (logits, features) if intermediates else logits

    def exit_choice(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) the exit (1-3) inference takes for each image of `x` (the model's current mode)."""
        _, _, _, gates = self.run(x)
        return FIRST_INFERENCE_EXIT + route(torch.stack(gates[FIRST_INFERENCE_EXIT:], 1))

    def gate_targets(self, i: int, correct: torch.Tensor, keys: list[bytes] | None) -> tuple[torch.Tensor, float]:
        """Exit i's gate targets (B,) for a batch whose current correctness is `correct`, and the
        share of them that are frozen. In training mode this also updates the exit's running
        accuracy and freezes the targets of examples first seen after it passed its threshold;
        in eval mode it only reads frozen targets."""
        frozen = self.frozen_targets[i]
        acc = self.exit_accuracy[i]
        passed = acc is not None and acc >= self.cfg.gate_thresholds[i]
        targets, n_frozen = correct.clone(), 0
        if keys is not None and (passed or frozen):
            values = correct.tolist()
            for j, key in enumerate(keys):
                if key in frozen:
                    values[j], n_frozen = frozen[key], n_frozen + 1
                elif passed and self.training:
                    frozen[key], n_frozen = values[j], n_frozen + 1
            targets = torch.tensor(values, dtype=correct.dtype, device=correct.device)
        if self.training:
            batch_acc = float(correct.mean())
            self.exit_accuracy[i] = batch_acc if acc is None else ACC_MOMENTUM * acc + (1 - ACC_MOMENTUM) * batch_acc
        return targets, n_frozen / max(1, len(correct))

    def loss(
        self, cam_ins, pooled, gates, y: torch.Tensor, x: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed per-exit loss and its parts (detached), per exit. `x` (the batch's images)
        identifies examples for gate-target freezing (None: targets are the current correctness)."""
        cfg = self.cfg
        total = torch.zeros((), device=y.device)
        measured: dict[str, torch.Tensor] = {}
        keys = example_keys(x) if x is not None else None
        for i in range(N_EXITS):
            logits = self.head.logits(i, pooled[i]).float()
            gate = gates[i].float()
            with torch.no_grad():
                correct = (logits.argmax(1) == y).float()
                if i == 0:
                    weight = ce_weight_first(logits, y, cfg.gamma0)
                else:
                    weight = 1 - torch.sigmoid(gates[i - 1].float())
                weight = normalised_weights(weight, cfg.weight_offset)
                target, share_frozen = self.gate_targets(i, correct, keys)
            main = (weight * F.cross_entropy(logits, y, reduction="none")).mean()
            gate_bce = balanced_gate_bce(gate, target)
            supp = cam_suppression(self.head.maps(i, cam_ins[i]).float(), y)
            total = total + main + cfg.gate_loss * gate_bce + cfg.cam_suppression * supp
            measured |= {
                f"exit{i}_ce": main.detach(),
                f"exit{i}_gate": gate_bce.detach(),
                f"exit{i}_supp": supp.detach(),
                f"exit{i}_acc": correct.mean(),
                f"exit{i}_frozen": torch.tensor(share_frozen, device=y.device),
            }
        with torch.no_grad():
            choice = route(torch.stack(gates[FIRST_INFERENCE_EXIT:], 1))
            for j in range(N_EXITS - FIRST_INFERENCE_EXIT):
                measured[f"exit{FIRST_INFERENCE_EXIT + j}_taken"] = (choice == j).float().mean()
        measured["loss"] = total.detach()
        return total, measured


# --- the loss terms ------------------------------------------------------------------------------


def cam_suppression(cams: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of: over the cells where the true class's map (B, K, H, W) is at or below
    its spatial mean, the mean of KL(uniform || softmax over classes at that cell)."""
    b, k = cams.shape[:2]
    flat = cams.flatten(2)  # (B, K, HW)
    true = flat.gather(1, y.view(b, 1, 1).expand(b, 1, flat.shape[2])).squeeze(1)  # (B, HW)
    below = (true <= true.mean(1, keepdim=True)).to(flat.dtype).detach()
    # KL(u || p) = sum_k (1/K) (log(1/K) - log p_k) = -log K - mean_k log p_k
    kl = -math.log(k) - F.log_softmax(flat, dim=1).mean(1)  # (B, HW)
    return ((below * kl).sum(1) / below.sum(1).clamp(min=1)).mean()


def balanced_gate_bce(gate_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE of the raw gate logits (B,) against 0/1 targets (B,); positives and negatives each count
    half (when a batch has only one kind, its mean)."""
    bce = F.binary_cross_entropy_with_logits(gate_logits, target, reduction="none")
    pos = target.sum()
    neg = target.numel() - pos
    kinds = (pos > 0).to(bce.dtype) + (neg > 0).to(bce.dtype)
    weight = torch.where(target > 0, 1 / pos.clamp(min=1), 1 / neg.clamp(min=1)) / kinds
    return (weight * bce).sum()


def normalised_weights(weight: torch.Tensor, offset: float) -> torch.Tensor:
    """Per-example CE weights (B,) divided by their maximum over the batch, plus `offset`."""
    return weight / weight.max().clamp(min=torch.finfo(weight.dtype).tiny) + offset


def example_keys(x: torch.Tensor) -> list[bytes]:
    """One key per example of `x` (B, ...): a 16-byte BLAKE2 digest of its pixels' bytes, the same
    for the same image whatever batch it comes in."""
    rows = x.detach().float().cpu().contiguous().flatten(1).numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def ce_weight_first(logits: torch.Tensor, y: torch.Tensor, gamma0: float) -> torch.Tensor:
    """Exit 0's per-example CE weight: its softmax probability of the true class ** gamma0."""
    return F.softmax(logits, dim=1).gather(1, y.view(-1, 1)).squeeze(1) ** gamma0


@register_model("occam_resnet18", OccamResNet18Config, accepts=("images",))
def build_occam_resnet18(
    cfg: OccamResNet18Config, *, n_classes: int, image_size: int, channels: int = 3, **_
) -> nn.Module:
    require_rgb("occam_resnet18", channels)
    return OccamResNet(cfg, n_classes)
