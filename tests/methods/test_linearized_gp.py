"""linearized_gp: the source's linearisation trained by cross-entropy (MAP) under a Gaussian prior,
a Laplace posterior, the prior precision by the evidence, predictive probabilities.

The function-space solution against an independent parameter-space one (MAP, evidence, the head's
posterior covariance, the predictive), the evidence is maximised, the explicit and matrix-free
kernels agree, validation never chooses anything, and whole trials run."""

import json
import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn
from torch.nn import functional as F

from common.seeding import torch_generator
from methods import linearized_gp as _linearized_gp  # noqa: F401  (registers the method)
from methods.linearized_gp import LinearizedGP, LinearizedGPConfig, fit_gp, gram, jacobian, kernel_matrix_free
from methods.registry import MethodContext, get_method
from methods.training import TrainConfig, evaluate
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from tasks.base import Split, StageData
from tests.conftest import tiny_raw
from tests.tasks.test_shapes import vision_raw


class TanhMLP(nn.Module):
    head_name = "head"

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


def _fit(source, x, y, xv=None, yv=None, cfg=None, seed=1):
    model = LinearizedGP(source)
    val = _split(x, y) if xv is None else _split(xv, yv)
    result = fit_gp(model, _split(x, y), val, cfg or LinearizedGPConfig(), 8, torch.Generator().manual_seed(seed))
    return model, result


# --- an independent solution in parameter space ---------------------------------------------------


def _full_jacobian(source, x):
    """J(X) (N·C, P) by torch.autograd.functional.jacobian, parameters in registration order."""
    names = [n for n, _ in source.named_parameters()]
    params = tuple(p.detach() for _, p in source.named_parameters())

    def f(*ps):
        return torch.func.functional_call(source, dict(zip(names, ps, strict=True)), (x,))

    jac = torch.autograd.functional.jacobian(f, params)
    return torch.cat([j.reshape(x.shape[0] * j.shape[1], -1) for j in jac], dim=1), names


def _parameter_space(source, x, y, delta):
    """MAP w of Σ log softmax(f0 + J w)[y] − δ/2 |w|² by Newton in parameter space, the Laplace
    evidence with the P x P Hessian, and the Hessian itself."""
    j, _ = _full_jacobian(source, x)
    f0 = source(x).detach()
    n, c = f0.shape
    w = torch.zeros(j.shape[1], dtype=torch.float64)
    for _ in range(100):
        f = f0 + (j @ w).view(n, c)
        pi = F.softmax(f, 1)
        grad = j.T @ (F.one_hot(y, c) - pi).reshape(-1) - delta * w
        blocks = torch.block_diag(*[torch.diag(p) - torch.outer(p, p) for p in pi])
        hess = j.T @ blocks @ j + delta * torch.eye(len(w), dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        w = w + step
        if step.abs().max() < 1e-13:
            break
    f = f0 + (j @ w).view(n, c)
    pi = F.softmax(f, 1)
    blocks = torch.block_diag(*[torch.diag(p) - torch.outer(p, p) for p in pi])
    hess = j.T @ blocks @ j + delta * torch.eye(len(w), dtype=torch.float64)
    loglik = F.log_softmax(f, 1).gather(1, y[:, None]).sum()
    p = len(w)
    evidence = loglik - delta / 2 * (w @ w) + p / 2 * math.log(delta) - 0.5 * torch.linalg.slogdet(hess)[1]
    return w, float(evidence), hess


def test_the_map_evidence_and_head_covariance_equal_the_parameter_space_laplace():
    d, c, n = 3, 3, 10  # P = 3*6 + 6 + 6*3 + 3 = 45 > N·C = 30 and the other way with n = 20
    for n in (10, 20):
        source = _seeded(lambda: TanhMLP(d, 6, c))
        x, y = _data(n, d, c)
        model, result = _fit(source, x, y)
        row = result.measurements[0]
        delta = row["prior_precision"]
        assert delta == pytest.approx(float(model.gp_prior_precision), rel=1e-12)
        w, evidence, hess = _parameter_space(source, x, y, delta)
        assert torch.allclose(model.gp_delta, w, rtol=0, atol=1e-7)
        assert row["log_evidence"] == pytest.approx(evidence, abs=1e-7)
        # The head's posterior covariance: the head block of the inverse Hessian.
        cov = torch.linalg.inv(hess)[-(6 * c + c) :, -(6 * c + c) :]
        got = model.gp_head_factor @ model.gp_head_factor.T
        assert row["head_params"] == 6 * c + c
        assert torch.allclose(got, cov, rtol=0, atol=1e-9)


def test_the_prediction_is_the_monte_carlo_average_over_the_gaussian_logits():
    source = _seeded(lambda: TanhMLP(3, 6, 3))
    x, y = _data(15, 3, 3)
    xt, _ = _data(5, 3, 3, seed=4)
    model, _ = _fit(source, x, y, cfg=LinearizedGPConfig(samples=50))
    j, _ = _full_jacobian(source, xt)
    mean = source(xt).detach() + (j @ model.gp_delta).view(5, 3)
    assert torch.allclose(model.map_logits(xt), mean, atol=1e-10)
    head = j[:, -21:].reshape(5, 3, 21)
    sigma = model.gp_head_factor @ model.gp_head_factor.T
    want = []
    for i in range(5):
        cov = head[i] @ sigma @ head[i].T
        lam, vec = torch.linalg.eigh(cov)
        draws = mean[i] + model.gp_draws @ (vec * lam.clamp_min(0).sqrt()).T
        want.append(F.softmax(draws, 1).mean(0))
    probs = model.predict_proba(xt)
    assert torch.allclose(probs, torch.stack(want), atol=1e-10)
    assert torch.allclose(probs.sum(1), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(model(xt), probs.log())
    assert torch.equal(model(xt[:2]), model(xt)[:2])  # the same draws for every batching
    assert (probs.max(1).values < F.softmax(mean, 1).max(1).values).all()  # averaging softens


def test_the_chosen_prior_precision_maximises_the_evidence():
    source = _seeded(lambda: TanhMLP(3, 6, 3))
    x, y = _data(20, 3, 3)
    model, result = _fit(source, x, y)
    row = result.measurements[0]
    assert row["at_bound"] == 0.0
    delta = row["prior_precision"]
    best = _parameter_space(source, x, y, delta)[1]
    for factor in (10**-0.05, 10**0.05, 0.1, 10.0, 1e-3, 1e3):
        assert _parameter_space(source, x, y, delta * factor)[1] <= best + 1e-9


def test_the_map_fits_labels_the_prior_gets_wrong():
    source = _seeded(lambda: TanhMLP(3, 16, 3))
    x, _ = _data(30, 3, 3)
    y = (source(x).argmax(1) + 1) % 3  # every training label disagrees with the source
    model, result = _fit(source, x, y)
    assert result.measurements[0]["train_acc"] > 0.5


def test_explicit_and_matrix_free_paths_agree():
    d, c, n = 3, 3, 7
    source = _seeded(lambda: TanhMLP(d, 5, c))
    x, y = _data(n, d, c)
    x_val, y_val = _data(6, d, c, seed=2)
    model = LinearizedGP(source)
    explicit = gram(jacobian(model, x, c, 3))
    assert torch.allclose(kernel_matrix_free(model, x, c, 3), explicit, rtol=0, atol=1e-12)
    assert torch.allclose(explicit, (lambda j: j @ j.T)(_full_jacobian(source, x)[0]), atol=1e-12)
    fits = {}
    for name, limit in (("explicit", 2**30), ("free", 0)):
        fits[name] = _fit(source, x, y, x_val, y_val, LinearizedGPConfig(jacobian_max_bytes=limit))
    (a, ra), (b, rb) = fits["explicit"], fits["free"]
    assert ra.measurements[0]["explicit_jacobian"] == 1.0 and rb.measurements[0]["explicit_jacobian"] == 0.0
    assert torch.allclose(a.gp_delta, b.gp_delta, rtol=0, atol=1e-10)
    assert torch.allclose(a(x_val), b(x_val), rtol=0, atol=1e-10)


def test_the_fit_is_deterministic_and_never_changes_the_source():
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    before = {k: v.clone() for k, v in source.state_dict().items()}
    x, y = _data(8, 3, 3)
    (a, ra), (b, rb) = _fit(source, x, y), _fit(source, x, y)
    assert torch.equal(a.gp_delta, b.gp_delta) and torch.equal(a.gp_draws, b.gp_draws) and ra == rb
    assert not any(p.requires_grad for p in a.parameters())
    assert all(torch.equal(before[k], v) for k, v in source.state_dict().items())
    assert all(torch.equal(before[k], v) for k, v in a.source.state_dict().items())
    assert a.gp_delta.abs().sum() > 0


def test_a_kept_model_reloads():
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    x, y = _data(8, 3, 3)
    fitted, _ = _fit(source, x, y)
    fresh = LinearizedGP(source)
    fresh.load_state_dict(fitted.state_dict())
    assert torch.equal(fresh(x), fitted(x))


def test_without_training_data_the_prediction_is_the_sources_softmax():
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    x, y = _data(6, 3, 3)
    model = LinearizedGP(source)
    result = fit_gp(model, _split(x[:0], y[:0]), _split(x, y), LinearizedGPConfig(), 4)
    assert torch.allclose(model(x), F.log_softmax(source(x), 1), atol=1e-12)
    assert math.isnan(result.measurements[0]["prior_precision"])
    assert result.best_val_acc == evaluate(source, _split(x, y))["y"] == result.measurements[0]["prior_val_acc"]


# --- validation is never read to choose ----------------------------------------------------------


def test_validation_labels_change_nothing_but_the_score():
    source = _seeded(lambda: TanhMLP(3, 8, 3))
    x, y = _data(12, 3, 3)
    xv, yv = _data(10, 3, 3, seed=3)
    a, ra = _fit(source, x, y, xv, yv)
    b, rb = _fit(source, x, y, xv, (yv + 1) % 3)
    assert torch.equal(a.gp_delta, b.gp_delta) and torch.equal(a.gp_head_factor, b.gp_head_factor)
    assert ra.measurements[0]["prior_precision"] == rb.measurements[0]["prior_precision"]
    assert ra.best_val_acc != rb.best_val_acc


class _Sealed(dict):
    """An evals mapping whose every read fails: proof that training never looked at it."""

    def _fail(self, *args, **kwargs):
        raise AssertionError("the test split was read during training")

    __getitem__ = get = items = values = keys = __iter__ = __contains__ = __len__ = _fail


def test_train_reads_train_and_validation_only():
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    x, y = _data(10, 3, 3)
    data = StageData(train=_split(x, y), val=_split(x, y), evals=_Sealed(test=_split(x, y)))
    with pytest.raises(AssertionError, match="test split was read"):
        data.evals["test"]  # the seal holds
    method = get_method("linearized_gp")
    ctx = MethodContext(
        task=None,
        data=data,
        config=LinearizedGPConfig(),
        training=TrainConfig(eval_batch_size=4),
        artifacts={"source": source},
        generator=torch_generator(0, "method"),
        device=torch.device("cpu"),
        fresh_model=None,
    )
    model = method.build(ctx)
    result = method.train(ctx, model, torch_generator(0, "downstream_train"))
    assert result.best_val_acc == evaluate(model, data.val)["y"]
    assert (result.best_epoch, result.epochs_run, result.steps) == (0, 0, 0)


# --- limits, config, protocol ----------------------------------------------------------------


def test_too_many_training_examples_is_a_clear_error():
    source = _seeded(lambda: TanhMLP(3, 4, 2))
    x, y = _data(11, 3, 2)
    with pytest.raises(ValueError, match=r"11 training examples.*linearized_gp\.max_train = 10"):
        fit_gp(LinearizedGP(source), _split(x, y), _split(x, y), LinearizedGPConfig(max_train=10), 4)


def test_config_is_validated():
    with pytest.raises(ValidationError, match="low <= high"):
        LinearizedGPConfig(prior_precision_bounds=(1.0, 0.1))
    with pytest.raises(ValidationError, match="positive"):
        LinearizedGPConfig(prior_precision_bounds=(0.0, 1.0))
    with pytest.raises(ValidationError):
        LinearizedGPConfig(samples=0)
    with pytest.raises(ValidationError):
        LinearizedGPConfig(sigma2_grid=[1.0])  # the validation grid is gone
    sweep = load_sweep(tiny_raw(methods=["linearized_gp"], linearized_gp={"samples": 10}))
    assert sweep.blocks["linearized_gp"] == LinearizedGPConfig(samples=10)


def test_features_are_the_sources_and_train_mode_keeps_the_source_in_eval():
    sweep = load_sweep(tiny_raw())  # a GPT with dropout 0.1
    task = sweep.build_task()
    torch.manual_seed(0)
    source = task.build_model(sweep.model).eval()
    data = task.downstream_data(0, 0.5)
    model = LinearizedGP(source)
    fit_gp(model, data.train, data.val, LinearizedGPConfig(samples=20), 2000, torch.Generator().manual_seed(0))
    x = data.val.x[:6]
    logp, features = model(x, intermediates=True)
    src_logits, src_features = source(x, intermediates=True)
    assert tuple(features) == model.feature_names() == source.feature_names()
    assert all(torch.allclose(features[k], src_features[k], atol=1e-6) for k in features)
    assert torch.equal(logp, model(x))
    assert (logp - F.log_softmax(src_logits, 1)).abs().max() > 1e-3  # the fit moved the prediction
    model.train()
    assert not model.source.training and torch.equal(model(x), logp)  # no dropout in train mode


# --- whole trials ------------------------------------------------------------------------------


def test_a_trial_on_the_arithmetic_task(tmp_path):
    sweep = load_sweep(
        tiny_raw(methods=["linearized_gp"], analyses=["subnetwork_ablation"], linearized_gp={"samples": 50})
    )
    spec = TrialSpec(method="linearized_gp", data_fraction=0.5, seed=0)
    row = run_trial(sweep, spec, ArtifactStore(tmp_path))
    again = run_trial(sweep, spec, ArtifactStore(tmp_path))
    assert row["status"] == "done" and 0.0 <= row["test_acc"] <= 1.0
    assert (row["best_epoch"], row["epochs_run"]) == (0, 0)
    (measured,) = json.loads(row["measurements_json"])
    assert measured["prior_precision"] > 0 and measured["explicit_jacobian"] == 1.0
    n = len(sweep.build_task().downstream_data(0, 0.5).train)  # the budget plus the ambiguous pairs
    assert measured["kernel_size"] == n * 7  # modulus 7: seven logits per example
    assert math.isnan(row["subnetwork_ablation_drop"])  # nothing was transplanted
    assert row["calibration_nll"] > 0 and 0 <= row["calibration_ece"] <= 1
    for column in ("val_acc", "test_acc", "splits_test_acc_2a2", "calibration_nll"):
        assert row[column] == again[column]


def test_lmc_barrier_does_not_apply_and_gives_nan(tmp_path):
    sweep = load_sweep(
        tiny_raw(
            methods=["linearized_gp"], analyses=[{"name": "lmc_barrier", "points": 3}], linearized_gp={"samples": 5}
        )
    )
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
        linearized_gp={"samples": 20},
    )
    sweep = load_sweep(raw)
    row = run_trial(sweep, TrialSpec(method="linearized_gp", data_fraction=0.5, seed=0), ArtifactStore(tmp_path / "a"))
    assert row["status"] == "done" and 0.0 <= row["test_acc"] <= 1.0
    assert 0.0 <= row["shape_bias"] <= 1.0 or math.isnan(row["shape_bias"])
    assert any(k.startswith("representation_r2_pool_") for k in row)
    assert row["calibration_nll"] > 0


# --- memory: the same numbers with fewer (N·C)² and N·C·P arrays alive ---------------------------------


def test_in_place_symmetrisation_and_float32_gram_give_the_old_numbers(monkeypatch):
    monkeypatch.setattr(_linearized_gp, "_BLOCK_BYTES", 8 * 13 * 4)  # tiles of 4 columns: many tiles
    k = torch.randn(13, 13, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = (k + k.T) / 2
    assert torch.equal(_linearized_gp._symmetrise_(k.clone()), expected)
    j = torch.randn(13, 50, generator=torch.Generator().manual_seed(1))  # float32, as a float32 source's
    step = _linearized_gp._column_blocks(13, 50)
    old = torch.zeros(13, 13, dtype=torch.float64)
    for a in range(0, 50, step):
        old += (j[:, a : a + step] @ j[:, a : a + step].T).double()
    assert torch.equal(gram(j), old)


def test_the_search_keeps_one_cholesky_factor_and_the_fit_is_unchanged(monkeypatch):
    source = _seeded(lambda: TanhMLP(3, 5, 3))
    x, y = _data(9, 3, 3)
    cfg = LinearizedGPConfig(samples=20)
    made = []
    init = _linearized_gp._Posterior.__init__

    def record(self, *args):
        init(self, *args)
        made.append(self)

    monkeypatch.setattr(_linearized_gp._Posterior, "__init__", record)
    lean, lean_row = _fit(source, x, y, cfg=cfg)
    assert len(made) > 5 and sum(p.chol is not None for p in made) == 0  # the fit dropped the last one too
    monkeypatch.setattr(_linearized_gp._Posterior, "drop", lambda self: None)  # every factor kept, as before
    kept, kept_row = _fit(source, x, y, cfg=cfg)
    assert lean_row == kept_row
    for name in ("gp_delta", "gp_alpha", "gp_head_factor", "gp_draws"):
        assert torch.equal(getattr(lean, name), getattr(kept, name))
    post = made[-1]  # a factor formed again after `drop` is the same factor
    chol = post.chol.clone()
    post.drop()
    k = gram(jacobian(LinearizedGP(source), x, 3, 4))
    post.factor(_linearized_gp._symmetrise_(k) / post.delta)
    assert torch.equal(post.chol, chol)
