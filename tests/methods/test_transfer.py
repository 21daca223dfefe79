from types import SimpleNamespace

import pytest
import torch

from common.seeding import torch_generator
from methods import TrainConfig, train
from methods.masking import MaskSelection, maskable_names, topk_mask
from methods.transfer import TransferConfig, transfer
from orchestrator.trial import fresh_model


def _setup(tiny, **transfer_kwargs):
    sweep = tiny()
    task = sweep.build_task()
    source = fresh_model(sweep, task, 0, "source_init")
    with torch.no_grad():  # make the source differ visibly from any fresh init
        for p in source.parameters():
            p.add_(1.0)
    fresh = fresh_model(sweep, task, 0, "init")
    fresh_copy = {k: v.clone() for k, v in fresh.state_dict().items()}
    names = maskable_names(source, MaskSelection())
    gen = torch.Generator().manual_seed(0)
    mask = topk_mask({n: torch.rand(dict(source.named_parameters())[n].shape, generator=gen) for n in names}, 0.6)
    model = transfer(source, fresh, mask, TransferConfig(**transfer_kwargs))
    return sweep, task, source, fresh_copy, mask, model


def _check_masked_weights(model, source, mask):
    src = dict(source.named_parameters())
    eff = model.effective_weights()
    for n, m in mask.items():
        assert torch.equal(eff[n][m], src[n][m]), n  # bit-equal, not merely close


def test_masked_weights_are_source_bits_before_and_after_frozen_training(tiny):
    sweep, task, source, fresh_init, mask, model = _setup(tiny)
    _check_masked_weights(model, source, mask)
    before = {n: w.detach().clone() for n, w in model.effective_weights().items()}
    train(model, task.downstream_data(0, 1.0), TrainConfig(epochs=2, lr=1e-2), torch_generator(0, "t"))
    _check_masked_weights(model, source, mask)
    after = model.effective_weights()
    changed = any(not torch.equal(after[n][~m], before[n][~m]) for n, m in mask.items())
    assert changed, "the fresh (unmasked-position) weights should train"


def test_unmasked_positions_are_fresh_and_unmasked_params_follow_the_setting(tiny):
    _, _, source, fresh_init, mask, model = _setup(tiny, unmasked="keep")
    eff = model.effective_weights()
    for n, m in mask.items():
        assert torch.equal(eff[n][~m], fresh_init[n][~m])
    src = dict(source.named_parameters())
    for n, p in model.base.named_parameters():
        if n not in mask:
            assert torch.equal(p, src[n]), f"{n} should be kept from the source"

    _, _, source, fresh_init, mask, model = _setup(tiny, unmasked="reinit")
    for n, p in model.base.named_parameters():
        if n not in mask:
            assert torch.equal(p, fresh_init[n]), f"{n} should keep its fresh init"


def test_trainable_subnetwork_variant_trains_the_source_weights(tiny):
    _, task, source, _, mask, model = _setup(tiny, trainable_subnetwork=True)
    train(model, task.downstream_data(0, 1.0), TrainConfig(epochs=2, lr=1e-2), torch_generator(0, "t"))
    src = dict(source.named_parameters())
    eff = model.effective_weights()
    assert any(not torch.equal(eff[n][m], src[n][m]) for n, m in mask.items())


def test_transfer_refuses_different_architectures(tiny):
    sweep = tiny()
    other = tiny(model={"n_layers": 2})
    task = sweep.build_task()
    with pytest.raises(ValueError, match="one architecture"):
        transfer(fresh_model(sweep, task, 0, "a"), fresh_model(other, task, 0, "b"), {}, TransferConfig())


def test_sampled_controls_keep_the_documented_number_of_source_weights(tiny):
    from methods import MethodContext, get_method
    from methods.masking import density

    sweep, task, source, _, mask, _ = _setup(tiny)
    kept = {}
    for name in ("subtask_induction", "sampled_subnetwork", "complement_subnetwork", "paper_sampled_subnetwork"):
        ctx = MethodContext(
            task=task,
            data=task.downstream_data(0, 0.5),
            config=None,
            training=sweep.training,
            settings=SimpleNamespace(block={"transfer": TransferConfig()}.__getitem__),
            artifacts={"source": source, "mask": mask},
            generator=torch.Generator().manual_seed(3),
            device=torch.device("cpu"),
            fresh_model=lambda stage: fresh_model(sweep, task, 0, stage),
        )
        model = get_method(name).build(ctx)
        kept[name] = density({n: fn.mask for n, fn in zip(model.names, model.fns.values(), strict=True)})
    assert kept["sampled_subnetwork"] == pytest.approx(kept["subtask_induction"])
    assert kept["complement_subnetwork"] == pytest.approx(1 - kept["subtask_induction"])
    assert kept["paper_sampled_subnetwork"] == pytest.approx(1 - kept["subtask_induction"])  # the inverted mask
