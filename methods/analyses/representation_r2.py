"""`representation_r2`: how much of a layer's activation variance each input feature explains.

Lampinen, Chan & Hermann (TMLR 2024, "Learned feature representations are biased by complexity,
learning order, position, and more", arXiv 2405.05847). For every probed layer φ (each named
feature of `model(x, intermediates=True)`, flattened per example) and every categorical feature f
of the input (the task's `probe_features(seed, on)`; `on` names a probe set of the task's
`PROBE_SETS`, by default `in_distribution`: images or inputs of the training distribution, labelled
with the features the models are trained to compute and others that vary there -- shape and colour
for `shapes`, whose `cue_conflict` set also separates texture from shape on out-of-distribution
images; a, b, the residues and the base answer for arithmetic):

- centre φ with its mean on the *fit* split;
- fit a linear map W from one-hot f to centred φ by least squares on the fit split;
- on the *eval* split (centred with the fit split's mean),
  R² = 1 − Σ_i ‖W f_i − φ_i‖² / Σ_i ‖φ_i‖²,
  total variance explained over all units together (not a mean of per-unit R²).

Math choices:
- With one-hot features (no separate intercept: the one-hot columns span the constant), the
  least-squares row of class c is exactly the mean of the centred φ over the fit examples of class
  c (XᵀX = diag(class counts)): that closed form, in float64, is exact and O(N·D). A class absent
  from fit gets the minimum-norm row 0 (the prediction is the fit mean), as `torch.linalg.lstsq` would.
- R² is held out, so it can be negative (a feature with many classes and few examples per class
  overfits the fit split: e.g. `a` with operand_range 1000 and ~1 example per value). Compare
  features with similar numbers of classes, or raise `n`.
- A layer with no variance on the eval split gives NaN (0/0).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from common.config import Frozen
from methods.analysis import Column, Profile, register_analysis
from methods.reports import Figure, ReportContext, Table, pyplot, register_report
from tasks.base import Split


class R2Config(Frozen):
    n: int = Field(1000, ge=20, description="examples per split (fit and eval), at most the task's split sizes")
    layers: tuple[str, ...] = Field((), description="features of the model to probe; empty = every one it returns")
    on: str = Field(
        "in_distribution",
        description="the task's probe set (its PROBE_SETS): in_distribution, the training distribution's "
        "inputs; shapes also has cue_conflict (shape and texture apart, out of distribution)",
    )


def _layer_and_feature(column: str) -> tuple[str, str]:
    """`representation_r2_<layer>_<feature>` -> (layer, feature); layer labels hold no underscore."""
    layer, _, feature = column.removeprefix(f"{NAME}_").partition("_")
    return layer, feature


NAME = "representation_r2"


@register_analysis(
    NAME,
    config=R2Config,
    columns={
        f"{NAME}_layers": Column(
            "string", summarise=False, description="the probed layers' labels in the model's order, comma-separated"
        ),
        f"{NAME}_*": Column(
            "float64",
            summarise=True,
            description="held-out variance of layer <layer> explained by one-hot feature <feature> "
            "(representation_r2_<layer>_<feature>; '_' and '.' in a layer's name become '-')",
            profile=Profile(
                split=_layer_and_feature,
                order=f"{NAME}_layers",
                xlabel="layer (input to output)",
                ylabel="held-out R² (variance explained)",
            ),
        ),
    },
    description="variance of each layer explained by each input feature (Lampinen, Chan & Hermann 2024)",
)
def representation_r2(ctx, model: nn.Module, config: R2Config | None) -> dict[str, float]:
    config = config or R2Config()
    probe = getattr(ctx.task, "probe_features", None)
    if probe is None:
        raise ValueError(
            f"representation_r2 needs a task with probe_features(seed); {type(ctx.task).__name__} has none"
        )
    fit, held = probe(ctx.seed, config.on)  # the trial's seed: probe data of the same split as the trial's
    fit, held = _head(fit, config.n), _head(held, config.n)
    phi_fit = activations(model, fit.x, ctx.device, ctx.eval_batch_size)
    phi_eval = activations(model, held.x, ctx.device, ctx.eval_batch_size)
    layers = config.layers or tuple(phi_fit)
    missing = [name for name in layers if name not in phi_fit]
    if missing:
        raise ValueError(f"representation_r2: the model has no feature {missing}; it has {sorted(phi_fit)}")
    out = {f"{NAME}_layers": ",".join(_label(layer) for layer in layers)}
    for layer in layers:
        for feature in fit.labels:
            out[f"{NAME}_{_label(layer)}_{feature}"] = r2(
                fit.labels[feature], phi_fit[layer], held.labels[feature], phi_eval[layer]
            )
    return out


def r2(features_fit: torch.Tensor, phi_fit: torch.Tensor, features_eval: torch.Tensor, phi_eval: torch.Tensor) -> float:
    """Held-out R² of activations `phi_*` [N, ...] (flattened per example) regressed on the one-hot
    of integer labels `features_*` [N] (see the module doc)."""
    phi_fit = phi_fit.reshape(len(phi_fit), -1).double()
    phi_eval = phi_eval.reshape(len(phi_eval), -1).double()
    f_fit, f_eval = features_fit.long().cpu(), features_eval.long().cpu()
    if len(f_fit) != len(phi_fit) or len(f_eval) != len(phi_eval):
        raise ValueError("representation_r2: features and activations differ in length")
    mean = phi_fit.mean(0)
    centred_fit, centred_eval = phi_fit - mean, phi_eval - mean
    classes, inverse = torch.unique(torch.cat([f_fit, f_eval]), return_inverse=True)
    idx_fit, idx_eval = inverse[: len(f_fit)], inverse[len(f_fit) :]
    sums = torch.zeros(len(classes), phi_fit.shape[1], dtype=torch.float64).index_add_(0, idx_fit, centred_fit)
    counts = torch.bincount(idx_fit, minlength=len(classes)).double()
    w = sums / counts.clamp(min=1).unsqueeze(1)  # class means; 0 for classes absent from fit
    residual = (w[idx_eval] - centred_eval).pow(2).sum()
    total = centred_eval.pow(2).sum()
    if total == 0:
        return math.nan
    return float(1 - residual / total)


@torch.no_grad()
def activations(model: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int) -> dict[str, torch.Tensor]:
    """Every named feature of `model(x, intermediates=True)`, flattened per example, on the CPU
    (float64), in eval mode; the model's train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        parts: dict[str, list[torch.Tensor]] = {}
        for start in range(0, len(x), batch_size):
            _, feats = model(x[start : start + batch_size].to(device), intermediates=True)
            for name, value in feats.items():
                parts.setdefault(name, []).append(value.reshape(len(value), -1).double().cpu())
    finally:
        model.train(was_training)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _label(layer: str) -> str:
    """A layer's label in column names: without '_' (it separates layer from feature) or '.'."""
    return layer.replace("_", "-").replace(".", "-")


def _head(split: Split, n: int) -> Split:
    return split.take(torch.arange(min(n, len(split))))


# --- the report extra: variance explained beside accuracy ---------------------------------------

ACCURACY = "test_acc"  # the trial's accuracy column (the report's metric)


def beside_accuracy(summary, table):
    """Per series, budget and feature: test accuracy and held-out R² at the series' last probed layer
    (mean [95% CI] over seeds, from `summary`), and the other series of the same task and budget whose
    accuracy interval overlaps this one's: R² differences between series are read only among those
    (accuracy-matched), since a representation follows from how well a model learnt its task."""
    import pandas as pd

    if f"{NAME}_layers" not in table or ACCURACY + "_mean" not in summary:
        return pd.DataFrame()
    layers = table.dropna(subset=[f"{NAME}_layers"]).groupby("series")[f"{NAME}_layers"].first()
    rows = []
    for _, at in summary.groupby(["task", "n_train"], sort=True):
        at = at.dropna(subset=[f"{ACCURACY}_mean"])
        for _, r in at.iterrows():
            if r["series"] not in layers:
                continue
            last = layers[r["series"]].split(",")[-1]
            lo, hi = r[f"{ACCURACY}_ci_lo"], r[f"{ACCURACY}_ci_hi"]
            if pd.isna(lo):  # one seed: its mean is its interval
                lo = hi = r[f"{ACCURACY}_mean"]
            others = at[at["series"] != r["series"]]
            o_lo = others[f"{ACCURACY}_ci_lo"].fillna(others[f"{ACCURACY}_mean"])
            o_hi = others[f"{ACCURACY}_ci_hi"].fillna(others[f"{ACCURACY}_mean"])
            matched = sorted(others.loc[(o_lo <= hi) & (o_hi >= lo), "label"].astype(str))
            prefix = f"{NAME}_{last}_"
            for column in (c for c in summary.columns if c.startswith(prefix) and c.endswith("_mean")):
                feature = column.removeprefix(prefix).removesuffix("_mean")
                if pd.isna(r[column]):
                    continue
                rows.append({"series": r["label"], "n": int(r["n_train"]), "accuracy": _cell(r, ACCURACY),
                             "layer": last, "feature": feature, "R²": _cell(r, column.removesuffix("_mean")),
                             "accuracy-matched with": ", ".join(matched) or "none",
                             "r2_mean": r[column], "accuracy_mean": r[f"{ACCURACY}_mean"]})  # fmt: skip
    return pd.DataFrame(rows)


def _cell(row, column: str) -> str:
    mean, lo, hi = row[f"{column}_mean"], row.get(f"{column}_ci_lo"), row.get(f"{column}_ci_hi")
    return f"{mean:.3f}" if lo is None or lo != lo else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


@register_report(f"{NAME}_vs_accuracy")
def _beside_accuracy_extra(ctx: ReportContext) -> list:
    frame = beside_accuracy(ctx.summary, ctx.table)
    if frame.empty:
        return []
    shown = frame.drop(columns=["r2_mean", "accuracy_mean"])
    note = (
        "Held-out R² (variance of the last probed layer explained by each feature) beside test accuracy, mean "
        "[95% CI] over seeds. Compare R² between series only among those accuracy-matched (accuracy intervals "
        "overlapping at the same budget): a model that learnt its task better represents its features differently."
    )
    figures = [Table(f"{NAME}_vs_accuracy", "Representation R² beside accuracy", frame, shown, note)]
    plt = pyplot()
    features = list(dict.fromkeys(frame["feature"]))
    fig, axes = plt.subplots(1, len(features), figsize=(4.2 * len(features), 3.6), squeeze=False, sharey=True)
    for ax, feature in zip(axes[0], features, strict=True):
        part = frame[frame["feature"] == feature]
        for series, group in part.groupby("series", sort=True):
            ax.plot(group["accuracy_mean"], group["r2_mean"], marker="o", ms=3, lw=1, label=series)
        ax.set_title(feature)
        ax.set_xlabel("test accuracy (mean over seeds)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out R², last probed layer")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(3, len(labels)), frameon=False,
               bbox_to_anchor=(0.5, -0.05 - 0.04 * (len(labels) // 3)))  # fmt: skip
    fig.tight_layout()
    caption = "Held-out R² at the last probed layer against test accuracy, one point per series and budget"
    figures.append(Figure(f"{NAME}_vs_accuracy", caption, fig))
    return figures
