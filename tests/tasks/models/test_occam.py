"""occam_resnet18 (OccamNets): exits, gates, the inference rule, each loss term, and its use through
the default objective, masks and whole trials."""

import json
import math

import pytest
import torch
from torch.nn import functional as F

from methods.masking import MaskedModel, MaskSelection, effective_state_dict, maskable_names, parameter_roles
from methods.training import cross_entropy
from methods.transfer import TransferConfig, transfer
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks import MODELS
from tasks.base import Split, StageData
from tasks.models.occam import balanced_gate_bce, cam_suppression, ce_weight_first, route
from tests.tasks.test_shapes import vision_raw

B, K, SIZE = 6, 5, 16
TRUNK = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")


def build(seed=0, **fields):
    spec = MODELS.get("occam_resnet18")
    torch.manual_seed(seed)
    return spec.build(spec.Config(name="occam_resnet18", width=4, **fields), n_classes=K, image_size=SIZE)


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, SIZE, SIZE, generator=gen), torch.randint(0, K, (B,), generator=gen)


def set_gates(model, logits):
    """Make gate i output the constant logit logits[i] for every input."""
    with torch.no_grad():
        for gate, value in zip(model.gates, logits, strict=True):
            gate.fc2.weight.zero_()
            gate.fc2.bias.fill_(value)


# --- architecture ------------------------------------------------------------------------------


def test_exits_and_gates_are_shaped_per_stage():
    model = build()
    x, _ = batch()
    _, cam_ins, pooled, gates = model.run(x)
    for i, (c, s) in enumerate([(4, 16), (8, 8), (16, 4), (32, 2)]):
        assert cam_ins[i].shape == (B, c, s, s)
        assert pooled[i].shape == (B, c)
        assert gates[i].shape == (B,)
        assert model.head.maps(i, cam_ins[i]).shape == (B, K, s, s)
        assert model.head.logits(i, pooled[i]).shape == (B, K)
        # The logits are the spatial mean of the class activation map.
        torch.testing.assert_close(model.head.logits(i, pooled[i]), model.head.maps(i, cam_ins[i]).mean((2, 3)))
    assert model.exits[1].conv1.out_channels == 2 and model.exits[1].conv2.out_channels == 8  # C -> C/4 -> C
    assert model.gates[2].fc1.out_features == 16 and model.gates[2].fc2.out_features == 1
    assert model(x).shape == (B, K)


def test_the_trunk_is_resnet18s():
    occam = build(seed=3)
    spec = MODELS.get("resnet18")
    torch.manual_seed(3)
    plain = spec.build(spec.Config(name="resnet18", width=4), n_classes=K, image_size=SIZE)
    trunk = {k: v for k, v in occam.state_dict().items() if k.startswith(TRUNK)}
    assert trunk.keys() == {k for k in plain.state_dict() if not k.startswith("fc.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in trunk.items())
    assert not hasattr(occam, "fc")


def test_config_defaults_to_the_papers_width_and_refuses_unknown_keys():
    spec = MODELS.get("occam_resnet18")
    assert spec.Config(name="occam_resnet18").width == 58
    with pytest.raises(ValueError, match="widht"):
        spec.Config(name="occam_resnet18", widht=8)


def test_exit_zero_does_not_train_the_trunk():
    x, _ = batch()
    for i, reaches_trunk in [(0, False), (1, True)]:
        model = build()
        _, cam_ins, pooled, _ = model.run(x)
        (model.head.logits(i, pooled[i]).square().sum() + model.head.maps(i, cam_ins[i]).square().sum()).backward()
        trunk = [p.grad for n, p in model.named_parameters() if n.startswith(("conv1", "layer1"))]
        assert any(g is not None and g.abs().sum() > 0 for g in trunk) == reaches_trunk, i
        assert model.exits[i].conv1.weight.grad.abs().sum() > 0


def test_the_full_loss_sends_no_gradient_from_exit_zero_into_the_trunk():
    model = build()
    x, y = batch()
    _, cam_ins, pooled, gates = model.run(x)
    # Zero the later exits' contributions: only exit 0's terms remain, and they reach no trunk weight.
    loss = model.head.logits(0, pooled[0]).sum() + model.head.maps(0, cam_ins[0]).sum() + gates[0].sum()
    loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if n.startswith(TRUNK))


def test_gates_read_a_detached_cam_in():
    model = build()
    x, _ = batch()
    _, _, _, gates = model.run(x)
    gates[2].sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("gates.2."))
    assert model.gates[2].fc1.weight.grad.abs().sum() > 0


# --- inference ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "gate_logits, chosen",
    [
        ((-50, 50, 50, 50), 1),
        ((50, 50, -50, -50), 1),  # exit 0's gate is never consulted
        ((50, -50, 50, -50), 2),
        ((50, -50, -50, 50), 3),
        ((50, -50, -50, -50), 3),  # no gate opens: the last exit
        ((-50, -50, 0, 50), 2),  # logit 0 is probability 0.5: open
    ],
)
def test_inference_takes_the_first_exit_from_one_whose_gate_is_open(gate_logits, chosen):
    model = build().eval()
    set_gates(model, gate_logits)
    x, _ = batch()
    with torch.no_grad():
        _, _, pooled, _ = model.run(x)
        expected = model.head.logits(chosen, pooled[chosen])
        others = [model.head.logits(i, pooled[i]) for i in range(4) if i != chosen]
        out = model(x)
    torch.testing.assert_close(out, expected)
    assert not any(torch.allclose(out, o, atol=1e-3) for o in others)


def test_route_decides_per_example():
    logits = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, -1], [-1, 1, 1], [0, -1, -1], [-1e-3, -1, 5]])
    assert route(logits).tolist() == [0, 1, 2, 1, 0, 2]


def test_training_mode_forward_returns_the_gated_choice_too():
    model = build().train()
    set_gates(model, (-50, -50, 50, -50))
    x, _ = batch()
    _, _, pooled, _ = model.run(x)
    torch.testing.assert_close(model(x), model.head.logits(2, pooled[2]))


# --- the loss terms ----------------------------------------------------------------------------


def _suppression_by_hand(cams, y):
    b, k, h, w = cams.shape
    per_example = []
    for n in range(b):
        true = cams[n, y[n]].flatten().tolist()
        mean = sum(true) / len(true)
        kls = []
        for cell, value in enumerate(true):
            if value <= mean:
                logits = cams[n, :, cell // w, cell % w].tolist()
                log_z = math.log(sum(math.exp(v) for v in logits))
                kls.append(sum((1 / k) * (math.log(1 / k) - (v - log_z)) for v in logits))
        per_example.append(sum(kls) / len(kls))
    return sum(per_example) / b


def test_cam_suppression_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    cams = torch.randn(3, 4, 2, 3, generator=gen, dtype=torch.float64)
    y = torch.tensor([0, 3, 1])
    assert float(cam_suppression(cams, y)) == pytest.approx(_suppression_by_hand(cams, y), rel=1e-10)


def test_cam_suppression_is_zero_when_every_suppressed_cell_is_uniform():
    cams = torch.zeros(2, 3, 2, 2)
    y = torch.tensor([1, 2])
    # True-class maps: one high cell each (above the mean); every other cell is 0 in every class.
    cams[0, :, 0, 0] = torch.tensor([7.0, 9.0, -2.0])
    cams[1, :, 1, 1] = torch.tensor([3.0, 1.0, 4.0])
    assert float(cam_suppression(cams, y)) == pytest.approx(0.0, abs=1e-6)
    # Cells above the mean are never suppressed, however peaked.
    cams[0, :, 0, 0] = torch.tensor([-30.0, 40.0, 0.0])
    assert float(cam_suppression(cams, y)) == pytest.approx(0.0, abs=1e-6)
    # A suppressed cell that favours a class costs.
    cams[1, 0, 0, 1] = 2.0
    assert float(cam_suppression(cams, y)) > 1e-3
    assert float(cam_suppression(cams, y)) == pytest.approx(_suppression_by_hand(cams, y), rel=1e-5)


def test_gate_bce_is_class_balanced():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0])
    target = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    expected = 0.5 * bce[target == 1].mean() + 0.5 * bce[target == 0].mean()
    torch.testing.assert_close(balanced_gate_bce(logits, target), expected)
    ones = torch.ones(5)
    torch.testing.assert_close(balanced_gate_bce(logits, ones), F.binary_cross_entropy_with_logits(logits, ones))


def test_gate_loss_stays_finite_when_gates_saturate():
    model = build()
    set_gates(model, (1e4, -1e4, 1e4, -1e4))
    x, y = batch()
    loss, measured = model(x, targets=y)
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in measured.values())
    assert measured["exit0_gate"] > 100  # saturated and wrong somewhere: large, but finite
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_main_ce_weights_are_p_true_cubed_then_one_minus_the_previous_gate():
    """Each exit's weights, divided by their batch maximum, plus the paper's 0.1 offset."""
    model = build().train()
    x, y = batch()
    loss, measured = model(x, targets=y)
    _, _, pooled, gates = model.run(x)  # train mode: the same batch statistics, the same outputs
    logits = [model.head.logits(i, pooled[i]) for i in range(4)]
    p_true = F.softmax(logits[0], 1)[torch.arange(B), y]
    torch.testing.assert_close(ce_weight_first(logits[0], y, 3.0), p_true**3)
    raw = [p_true**3] + [1 - torch.sigmoid(gates[i - 1]) for i in range(1, 4)]
    weights = [w / w.max() + 0.1 for w in raw]
    assert all(w.max().item() == pytest.approx(1.1) for w in weights)
    for i in range(4):
        expected = (weights[i] * F.cross_entropy(logits[i], y, reduction="none")).mean()
        torch.testing.assert_close(measured[f"exit{i}_ce"], expected.detach())
    total = sum(measured[f"exit{i}_ce"] + measured[f"exit{i}_gate"] + 0.1 * measured[f"exit{i}_supp"] for i in range(4))
    torch.testing.assert_close(loss.detach(), total)


def test_ce_weights_are_detached():
    # With only the main CE, the gates receive no gradient (their output enters as a weight), and
    # exit 0's gradient is that of a constant-weighted CE.
    model = build(cam_suppression=0.0, gate_loss=0.0).train()
    x, y = batch()
    loss, _ = model(x, targets=y)
    loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in model.named_parameters() if n.startswith("gates."))
    got = model.head.cams[0].weight.grad.clone()
    model.zero_grad()
    _, _, pooled, _ = model.run(x)
    logits = model.head.logits(0, pooled[0])
    weight = (F.softmax(logits, 1)[torch.arange(B), y] ** 3).detach()
    weight = weight / weight.max() + 0.1
    (weight * F.cross_entropy(logits, y, reduction="none")).mean().backward()
    torch.testing.assert_close(got, model.head.cams[0].weight.grad)


def test_gate_targets_follow_correctness_until_the_threshold_then_freeze_per_example():
    model = build().train()
    keys = [bytes([k]) for k in range(4)]
    right, wrong = torch.ones(4), torch.zeros(4)
    # Exit 1 (threshold 0.6): under it, the targets are the current correctness and nothing freezes.
    target, frozen = model.gate_targets(1, torch.tensor([1.0, 0.0, 1.0, 0.0]), keys)
    assert torch.equal(target, torch.tensor([1.0, 0.0, 1.0, 0.0])) and frozen == 0
    assert model.exit_accuracy[1] == pytest.approx(0.5) and not model.frozen_targets[1]
    for _ in range(20):  # the running accuracy climbs past 0.6 (momentum 0.9)
        model.gate_targets(1, right[:2], keys[2:])
    assert model.exit_accuracy[1] > 0.6
    # Examples seen from now on freeze at their correctness of that moment ...
    target, frozen = model.gate_targets(1, torch.tensor([0.0, 1.0, 1.0, 1.0]), keys)
    assert torch.equal(target, torch.tensor([0.0, 1.0, 1.0, 1.0])) and frozen == 1.0
    # ... and keep it whatever the exit answers later, in training and in eval mode.
    target, _ = model.gate_targets(1, right, keys)
    assert torch.equal(target, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    model.eval()
    target, _ = model.gate_targets(1, wrong, [*keys[:2], b"new", b"other"])
    assert torch.equal(target, torch.tensor([0.0, 1.0, 0.0, 0.0])), "eval reads frozen targets, freezes none"
    assert b"new" not in model.frozen_targets[1]
    # Another exit has its own threshold and state.
    assert model.exit_accuracy[2] is None and not model.frozen_targets[2]


def test_example_keys_identify_an_image_in_any_batch():
    from tasks.models.occam import example_keys

    x, _ = batch()
    keys = example_keys(x)
    assert len(set(keys)) == B
    assert example_keys(x[[3, 1]]) == [keys[3], keys[1]]


def test_the_loss_freezes_gate_targets_through_training():
    model = build(gate_thresholds=(0.0, 0.0, 0.0, 0.0)).train()  # every exit past its threshold at once
    x, y = batch()
    model(x, targets=y)  # the first batch sets the running accuracies
    _, measured = model(x, targets=y)
    assert all(measured[f"exit{i}_frozen"] == 1.0 for i in range(4))
    assert all(len(model.frozen_targets[i]) == B for i in range(4))


def test_a_one_row_training_batch_uses_the_gates_running_statistics():
    model = build().train()
    x, y = batch()
    before = model.gates[1].bn.running_mean.clone()
    loss, _ = model(x[:1], targets=y[:1])
    assert torch.isfinite(loss)
    assert torch.equal(model.gates[1].bn.running_mean, before)


def test_targets_and_intermediates_together_are_refused():
    x, y = batch()
    with pytest.raises(ValueError, match="targets"):
        build()(x, intermediates=True, targets=y)


# --- through the objective, masks and trials ---------------------------------------------------


def _data(x, y):
    split = Split(x, {"y": y})
    return StageData(split, split)


def test_the_default_objective_trains_on_the_models_own_loss():
    x, y = batch()
    model = build().train()
    torch.manual_seed(0)
    loss, measured = cross_entropy(model, _data(x, y)).loss({"train": Split(x, {"y": y})}, 0)
    own, own_measured = model(x, targets=y)
    torch.testing.assert_close(loss, own)
    assert measured.keys() == own_measured.keys() and "exit0_supp" in measured
    assert not torch.allclose(loss, F.cross_entropy(model(x), y))


def test_a_plain_model_keeps_plain_cross_entropy():
    spec = MODELS.get("resnet18")
    torch.manual_seed(0)
    model = spec.build(spec.Config(name="resnet18", width=4), n_classes=K, image_size=SIZE).eval()
    x, y = batch()
    loss, measured = cross_entropy(model, _data(x, y)).loss({"train": Split(x, {"y": y})}, 0)
    assert torch.equal(loss, F.cross_entropy(model(x).float(), y))
    assert list(measured) == ["ce"]
    assert not getattr(model, "own_loss", False)


def test_masks_cover_exit_convs_and_gate_linears_not_the_class_maps_or_norms():
    model = build()
    names = maskable_names(model, MaskSelection())
    roles = parameter_roles(model)
    assert {"exits.0.conv1.weight", "exits.3.conv2.weight", "gates.1.fc1.weight", "gates.1.fc2.weight"} <= set(names)
    assert "layer4.1.conv2.weight" in names
    assert not any(n.startswith("head.") for n in names)
    assert roles["head.cams.2.weight"] == "head" and roles["gates.0.bn.weight"] == "norm"
    assert roles["exits.1.bn.weight"] == "norm"
    assert "head.cams.2.weight" in maskable_names(model, MaskSelection(head=True))


def test_a_masked_model_trains_on_its_bases_own_loss():
    source, fresh = build(seed=0), build(seed=1)
    names = maskable_names(source, MaskSelection())
    gen = torch.Generator().manual_seed(2)
    params = dict(source.named_parameters())
    mask = {n: torch.rand(params[n].shape, generator=gen) < 0.5 for n in names}
    masked = transfer(source, fresh, mask, TransferConfig()).train()
    assert isinstance(masked, MaskedModel) and masked.own_loss
    plain = build(seed=3)
    plain.load_state_dict(effective_state_dict(masked))
    plain.train()
    x, y = batch()
    loss, measured = cross_entropy(masked, _data(x, y)).loss({"train": Split(x, {"y": y})}, 0)
    plain_loss, _ = plain(x, targets=y)
    assert "exit3_gate" in measured
    assert torch.equal(loss, plain_loss)
    loss.backward()  # gradients reach the fresh model's own (unmasked-by-the-mask) weights
    assert masked.base.exits[2].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("methods", [("scratch", "subtask_induction", "l2sp")])
def test_trials_run_on_occam_resnet18(tmp_path, methods):
    raw = vision_raw(tmp_path, {"name": "occam_resnet18", "width": 4}, methods=list(methods))
    raw["task"] = {**raw["task"], "image_size": 16}
    sweep = load_sweep(raw)
    store = ArtifactStore(tmp_path / "store")
    for method in methods:
        axes = {"mask.sparsity": 0.5} if method == "subtask_induction" else {}
        spec = TrialSpec(method=method, axes=axes, data_fraction=0.5, seed=0)
        row = run_trial(sweep, spec, store)
        assert 0.0 <= row["test_acc"] <= 1.0, method
        epochs = json.loads(row["measurements_json"])
        assert {"exit0_supp", "exit2_gate", "exit3_taken", "loss"} <= set(epochs[0]), method
        assert 0.0 <= row["shape_bias"] <= 1.0 or math.isnan(row["shape_bias"])
