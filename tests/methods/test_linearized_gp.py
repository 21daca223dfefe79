"""linearized_gp: the GP posterior mean of the source's linearisation, fitted in closed form.

Exactness against kernel ridge regression on a linear model, the explicit and matrix-free kernels
agree, σ² is chosen on validation only, the GP interpolates as σ² -> 0, and whole trials run."""

import json
import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from common.seeding import torch_generator
from methods import linearized_gp as _linearized_gp  # noqa: F401  (registers the method)
from methods.linearized_gp import (
    LinearizedGP,
    LinearizedGPConfig,
    fit_gp,
    gram,
    jacobian,
    kernel_matrix_free,
)
from methods.registry import MethodContext, get_method
from methods.training import TrainConfig, evaluate
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks.base import Split, StageData
from tests.conftest import tiny_raw
from tests.tasks.test_shapes import vision_raw


class LinearModel(nn.Module):
    """f(x) = W x + b, following the models' protocol (features, feature_names)."""

    def __init__(self, d: int, c: int):
        super().__init__()
        self.head = nn.Linear(d, c)

    def feature_names(self):
        return ("input",)

    def forward(self, x, intermediates=False):
        logits = self.head(x)
        return (logits, {"input": x}) if intermediates else logits


class TanhMLP(nn.Module):
    def __init__(self, d: int, width: int, c: int):
        super().__init__()
        self.layer = nn.Linear(d, width)
        self.head = nn.Linear(width, c)

    def feature_names(self):
        return ("hidden",)

    def forward(self, x, intermediates=False):
        h = torch.tanh(self.layer(x))
        logits = self.head(h)
        return (logits, {"hidden": h}) if intermediates else logits


def _seeded(module_fn, seed=0):
    torch.manual_seed(seed)
    return module_fn().double()


def _split(x, y):
    return Split(x, {"y": y})


def _data(n, d, c, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    y = torch.randint(c, (n,), generator=gen)
    return x, y


# --- exactness -------------------------------------------------------------------------------


def test_linear_model_equals_kernel_ridge_regression():
    d, c, n = 4, 3, 12
    source = _seeded(lambda: LinearModel(d, c))
    x, y = _data(n, d, c)
    x_test, _ = _data(7, d, c, seed=1)
    model = LinearizedGP(source)
    val = _split(x_test, torch.zeros(7, dtype=torch.long))
    fit_gp(model, _split(x, y), val, LinearizedGPConfig(sigma2_grid=(0.05,)), 5)
    got = model(x_test).detach().numpy()

    # Independently: the Jacobian kernel of W x + b w.r.t. (W, b) is (xᵀx' + 1) ⊗ I_C.
    X, Xt = x.numpy(), x_test.numpy()
    W, b = source.head.weight.detach().numpy(), source.head.bias.detach().numpy()
    K = np.kron(X @ X.T + 1, np.eye(c))
    sigma2 = 0.05 * np.mean(np.diag(K))
    residual = (np.eye(c)[y.numpy()] - (X @ W.T + b)).reshape(-1)
    beta = np.linalg.solve(K + sigma2 * np.eye(n * c), residual)
    want = Xt @ W.T + b + (np.kron(Xt @ X.T + 1, np.eye(c)) @ beta).reshape(-1, c)

    assert np.abs(got - want).max() < 1e-8
    assert float(model.gp_sigma2) == pytest.approx(sigma2, rel=1e-12)
    assert np.abs(model.gp_beta.numpy() - beta).max() < 1e-8
    # The kernel itself, from the explicit Jacobian.
    assert np.abs(gram(jacobian(model, x, c, 5)).numpy() - K).max() < 1e-10


def test_explicit_and_matrix_free_paths_agree():
    d, c, n = 3, 3, 7
    source = _seeded(lambda: TanhMLP(d, 5, c))
    x, y = _data(n, d, c)
    x_val, y_val = _data(6, d, c, seed=2)
    model = LinearizedGP(source)
    explicit = gram(jacobian(model, x, c, 3))
    free = kernel_matrix_free(model, x, c, 3)
    assert explicit.shape == (n * c, n * c)
    assert torch.allclose(free, explicit, rtol=0, atol=1e-12)

    fits = {}
    for name, limit in (("explicit", 2**30), ("free", 0)):
        gp = LinearizedGP(source)
        cfg = LinearizedGPConfig(sigma2_grid=(1e-3, 1e-1), jacobian_max_bytes=limit)
        result = fit_gp(gp, _split(x, y), _split(x_val, y_val), cfg, 3)
        fits[name] = (gp, result)
    (a, ra), (b, rb) = fits["explicit"], fits["free"]
    assert ra.measurements[0]["explicit_jacobian"] == 1.0 and rb.measurements[0]["explicit_jacobian"] == 0.0
    assert ra.history == rb.history
    assert torch.allclose(a.gp_delta, b.gp_delta, rtol=0, atol=1e-10)
    assert torch.allclose(a(x_val), b(x_val), rtol=0, atol=1e-10)


def test_the_fit_is_deterministic_and_never_changes_the_source():
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    before = {k: v.clone() for k, v in source.state_dict().items()}
    x, y = _data(8, 3, 3)
    runs = []
    for _ in range(2):
        gp = LinearizedGP(source)
        result = fit_gp(gp, _split(x, y), _split(x, y), LinearizedGPConfig(), 4)
        runs.append((gp, result))
    (a, ra), (b, rb) = runs
    assert torch.equal(a.gp_delta, b.gp_delta) and ra == rb
    assert not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in a.source.state_dict().items())
    assert a.gp_delta.abs().sum() > 0


def test_the_gp_interpolates_the_training_data_as_sigma2_goes_to_zero():
    d, c, n = 3, 3, 8  # P = 3*16 + 16 + 16*3 + 3 = 115 > N·C = 24: the kernel has full rank
    source = _seeded(lambda: TanhMLP(d, 16, c))
    x, y = _data(n, d, c)
    model = LinearizedGP(source)
    result = fit_gp(model, _split(x, y), _split(x, y), LinearizedGPConfig(sigma2_grid=(1e-10,)), 8)
    onehot = torch.nn.functional.one_hot(y, c).double()
    assert (source(x) - onehot).abs().max() > 0.5  # the prior does not fit the labels ...
    assert (model(x) - onehot).abs().max() < 1e-5  # ... the posterior mean does
    assert result.measurements[0]["train_acc"] == 1.0


def test_without_training_data_the_gp_is_the_source():
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    x, y = _data(6, 3, 3)
    model = LinearizedGP(source)
    result = fit_gp(model, _split(x[:0], y[:0]), _split(x, y), LinearizedGPConfig(sigma2_grid=(1.0, 0.1)), 4)
    assert torch.equal(model(x), source(x))
    assert len(set(result.history)) == 1 and result.measurements[0]["sigma2_relative"] == 1.0


# --- σ² on validation --------------------------------------------------------------------------


def _selection_setup():
    d, c, n = 20, 3, 10  # N < d + 1: (X Xᵀ + 1) ⊗ I has full rank, so small σ² interpolates
    source = _seeded(lambda: LinearModel(d, c))
    x, _ = _data(n, d, c)
    prior = source(x).argmax(-1)
    y = (prior + 1) % c  # the training labels disagree with the source everywhere
    return source, x, y, prior


GRID = LinearizedGPConfig(sigma2_grid=(1e-6, 1e3))


def test_sigma2_is_chosen_by_validation_accuracy():
    source, x, y, prior = _selection_setup()
    chosen = {}
    # Validation labelled like the training data: only the interpolating σ² gets it right.
    # Validation labelled by the source: only the σ² that stays at the prior does.
    for name, labels in (("train_like", y), ("source_like", prior)):
        model = LinearizedGP(source)
        val = _split(x, labels)
        result = fit_gp(model, _split(x, y), val, GRID, 4)
        chosen[name] = result.measurements[0]["sigma2_relative"]
        assert result.best_val_acc == max(result.history) == evaluate(model, val)["y"] == 1.0
        assert min(result.history) == 0.0
    assert chosen == {"train_like": 1e-6, "source_like": 1e3}


def test_ties_go_to_the_larger_sigma2():
    source, x, y, prior = _selection_setup()
    half = torch.where(torch.arange(len(x)) < len(x) // 2, y, prior)  # each σ² gets half right
    for grid in (GRID.sigma2_grid, GRID.sigma2_grid[::-1]):
        result = fit_gp(LinearizedGP(source), _split(x, y), _split(x, half), LinearizedGPConfig(sigma2_grid=grid), 4)
        assert result.history == [0.5, 0.5]
        assert result.measurements[0]["sigma2_relative"] == 1e3


class _Sealed(dict):
    """An evals mapping whose every read fails: proof that training never looked at it."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("the test split was read during training")

    __getitem__ = get = items = values = keys = __iter__ = __contains__ = __len__ = _fail


def test_train_reads_train_and_validation_only():
    source, x, y, prior = _selection_setup()
    data = StageData(train=_split(x, y), val=_split(x, y), evals=_Sealed(test=_split(x, prior)))
    with pytest.raises(AssertionError, match="test split was read"):
        data.evals["test"]  # the seal holds
    method = get_method("linearized_gp")
    ctx = MethodContext(
        task=None,
        data=data,
        config=GRID,
        training=TrainConfig(eval_batch_size=4),
        artifacts={"source": source},
        generator=torch_generator(0, "method"),
        device=torch.device("cpu"),
        fresh_model=None,
    )
    model = method.build(ctx)
    result = method.train(ctx, model, torch_generator(0, "downstream_train"))
    assert result.best_val_acc == 1.0 and (result.best_epoch, result.epochs_run, result.steps) == (0, 0, 0)


# --- limits, config, protocol ----------------------------------------------------------------


def test_too_many_training_examples_is_a_clear_error():
    source = _seeded(lambda: LinearModel(3, 2))
    x, y = _data(11, 3, 2)
    with pytest.raises(ValueError, match=r"11 training examples.*linearized_gp\.max_train = 10"):
        fit_gp(LinearizedGP(source), _split(x, y), _split(x, y), LinearizedGPConfig(max_train=10), 4)


def test_config_is_validated():
    with pytest.raises(ValidationError, match="positive"):
        LinearizedGPConfig(sigma2_grid=(1.0, 0.0))
    with pytest.raises(ValidationError):
        LinearizedGPConfig(sigma2_grid=())
    with pytest.raises(ValidationError):
        LinearizedGPConfig(sigma=1.0)
    sweep = load_sweep(tiny_raw(methods=["linearized_gp"], linearized_gp={"sigma2_grid": [0.1, 1.0]}))
    assert sweep.blocks["linearized_gp"] == LinearizedGPConfig(sigma2_grid=(0.1, 1.0))


def test_features_are_the_sources_and_train_mode_keeps_the_source_in_eval():
    sweep = load_sweep(tiny_raw())  # a GPT with dropout 0.1
    task = sweep.build_task()
    torch.manual_seed(0)
    source = task.build_model(sweep.model).eval()
    data = task.downstream_data(0, 0.5)
    model = LinearizedGP(source)
    fit_gp(model, data.train, data.val, LinearizedGPConfig(sigma2_grid=(0.1,)), 2000)
    x = data.val.x[:6]
    logits, features = model(x, intermediates=True)
    src_logits, src_features = source(x, intermediates=True)
    assert tuple(features) == model.feature_names() == source.feature_names()
    assert all(torch.allclose(features[k], src_features[k], atol=1e-6) for k in features)
    assert torch.equal(logits, model(x))
    assert (logits - src_logits).abs().max() > 1e-3  # the fit moved the prediction off the prior
    model.train()
    assert not model.source.training and torch.equal(model(x), logits)  # no dropout in train mode


# --- whole trials ------------------------------------------------------------------------------


def test_a_trial_on_the_arithmetic_task(tmp_path):
    sweep = load_sweep(tiny_raw(methods=["linearized_gp"], analyses=["subnetwork_ablation"]))
    spec = TrialSpec(method="linearized_gp", data_fraction=0.5, seed=0)
    row = run_trial(sweep, spec, ArtifactStore(tmp_path))
    again = run_trial(sweep, spec, ArtifactStore(tmp_path))
    assert row["status"] == "done" and 0.0 <= row["test_acc"] <= 1.0
    assert (row["best_epoch"], row["epochs_run"]) == (0, 0)
    (measured,) = json.loads(row["measurements_json"])
    assert measured["sigma2_relative"] in LinearizedGPConfig().sigma2_grid and measured["explicit_jacobian"] == 1.0
    n = len(sweep.build_task().downstream_data(0, 0.5).train)  # the budget plus the ambiguous pairs
    assert measured["kernel_size"] == n * 7  # modulus 7: seven logits per example
    assert math.isnan(row["subnetwork_ablation_drop"])  # nothing was transplanted
    assert (row["val_acc"], row["test_acc"], row["splits_test_acc_2a2"]) == (
        again["val_acc"],
        again["test_acc"],
        again["splits_test_acc_2a2"],
    )


def test_lmc_barrier_does_not_apply_and_gives_nan(tmp_path):
    sweep = load_sweep(tiny_raw(methods=["linearized_gp"], analyses=[{"name": "lmc_barrier", "points": 3}]))
    row = run_trial(sweep, TrialSpec(method="linearized_gp", data_fraction=0.5, seed=0), ArtifactStore(tmp_path))
    assert row["status"] == "done"
    assert all(math.isnan(row[c]) for c in ("lmc_barrier", "lmc_barrier_loss_mid", "lmc_barrier_acc_mid"))


def test_a_trial_on_shapes_with_a_resnet(tmp_path):
    raw = vision_raw(
        tmp_path,
        {"name": "resnet18", "width": 4},
        task={**vision_raw(tmp_path)["task"], "image_size": 16},
        methods=["linearized_gp"],
        analyses=[{"name": "representation_r2", "n": 20, "layers": ["pool"]}],
    )
    sweep = load_sweep(raw)
    row = run_trial(sweep, TrialSpec(method="linearized_gp", data_fraction=0.5, seed=0), ArtifactStore(tmp_path / "a"))
    assert row["status"] == "done" and 0.0 <= row["test_acc"] <= 1.0
    assert 0.0 <= row["shape_bias"] <= 1.0 or math.isnan(row["shape_bias"])
    assert any(k.startswith("representation_r2_pool_") for k in row)
