"""hf_gpt2: transformers' GPT2LMHeadModel built offline, its masks, and a source loaded from a local
Hugging Face folder or safetensors file (`source: {pretrained: PATH}`) instead of trained."""

import pytest
import torch
from safetensors.torch import save_file

from methods.artifacts import SourceTraining
from methods.discovery import DiscoveryConfig, discover
from methods.masking import MaskSelection, density, maskable_names, parameter_roles
from orchestrator.artifacts import ArtifactStore
from orchestrator.config import load_sweep
from orchestrator.trial import TrialSpec, run_trial
from orchestrator.trial.upstream import Upstream
from tests.conftest import tiny_raw

HF = {"name": "hf_gpt2", "n_layer": 1, "n_embd": 16, "n_head": 2}


def _raw(**overrides):
    raw = tiny_raw(**overrides)
    raw["model"] = {**HF, **overrides.get("model", {})}
    return raw


def _model(seed=0):
    sweep = load_sweep(_raw())
    task = sweep.build_task()
    torch.manual_seed(seed)
    return task, task.build_model(sweep.model).eval()


def test_logits_are_gpt2_lm_head_models_at_the_last_position():
    task, model = _model()
    x = task.base_data(0).train.x[:8]
    hf = model.to_hf().eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert hf.lm_head.weight is hf.transformer.wte.weight, "the head is tied to the token embedding"
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits[:, -1], atol=1e-6)
    assert model(x).shape == (8, task.config.operand_range + 1)  # logits over the vocabulary


def test_the_tied_matrix_has_one_name_and_masks_cover_the_conv1d_weights():
    _, model = _model()
    assert "lm_head.weight" not in model.state_dict(), "no tensor is stored twice (safetensors refuses that)"
    assert parameter_roles(model)["transformer.wte.weight"] == "embedding"
    assert maskable_names(model, MaskSelection()) == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.mlp.c_proj.weight",
    ]


def test_discovery_hits_the_requested_sparsity():
    task, model = _model()
    found = discover(model, task.subtask_data(0), DiscoveryConfig(epochs=1, batch_size=100), 0.75,
                     torch.Generator().manual_seed(0))  # fmt: skip
    assert density(found.mask) == pytest.approx(0.25, abs=1e-4)


def test_a_task_with_classes_beyond_the_vocabulary_refuses_it():
    with pytest.raises(ValueError, match=r"hf_gpt2.*modulus \(40\) exceeds task\.operand_range \(30\)"):
        load_sweep(_raw(task={"modulus": 40}))


def test_pretrained_field_is_left_out_of_dumps_when_unset():
    """Sweeps that train their source keep their identities and keys."""
    assert "pretrained" not in SourceTraining().canonical()
    assert SourceTraining(pretrained="/x").canonical()["pretrained"] == "/x"


@pytest.mark.parametrize("form", ["folder", "safetensors"])
def test_a_source_is_loaded_from_a_local_pretrained_model(tmp_path, form):
    _, trained = _model(seed=7)
    hf = trained.to_hf()
    if form == "folder":
        hf.save_pretrained(tmp_path / "gpt2")  # what a Hugging Face user has on disk
        path = tmp_path / "gpt2"
    else:  # the hub's older layout: no `transformer.` prefix, causal-mask buffers, the tied head
        state = {k.removeprefix("transformer."): v.clone() for k, v in hf.state_dict().items()}
        state["h.0.attn.bias"] = torch.ones(1, 1, 4, 4)
        path = tmp_path / "gpt2.safetensors"
        save_file(state, str(path))
    sweep = load_sweep(_raw(source={"pretrained": str(path)}))
    store = ArtifactStore(tmp_path / "store")
    row = run_trial(sweep, TrialSpec(method="full_transfer", data_fraction=0.5, seed=0), store)
    assert 0.0 <= row["test_acc"] <= 1.0
    upstream = Upstream(sweep, TrialSpec(method="full_transfer", data_fraction=0.5, seed=0), store, torch.device("cpu"))
    assert "pretrained_sha256" in upstream.key("source")
    source = upstream.get("source")  # the stored artifact the trial used
    for name, tensor in trained.state_dict().items():
        assert torch.equal(source.state_dict()[name], tensor), name


def test_a_pretrained_file_that_does_not_fit_is_a_clear_error(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"transformer.wte.weight": torch.zeros(5, 16)}, str(path))
    sweep = load_sweep(_raw(source={"pretrained": str(path)}))
    with pytest.raises(ValueError, match=r"does not fit model HFGPT2.*missing.*other shapes"):
        run_trial(sweep, TrialSpec(method="full_transfer", data_fraction=0.5, seed=0), ArtifactStore(tmp_path / "s"))
    missing = load_sweep(_raw(source={"pretrained": str(tmp_path / "nowhere")}))
    with pytest.raises(ValueError, match="does not exist.*nothing is downloaded"):
        run_trial(missing, TrialSpec(method="full_transfer", data_fraction=0.5, seed=0), ArtifactStore(tmp_path / "t"))
