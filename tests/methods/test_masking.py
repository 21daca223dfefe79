import pytest
import torch

from methods.masking import (
    MaskedModel,
    MaskSelection,
    ScoreMask,
    complement,
    density,
    maskable_names,
    parameter_roles,
    sample_like,
    topk_mask,
)
from orchestrator.trial import fresh_model


@pytest.fixture
def model(tiny):
    sweep = tiny()
    return fresh_model(sweep, sweep.build_task(), 0, "source_init").eval()


@pytest.fixture
def tokens():
    return torch.tensor([[1, 2, 30], [5, 7, 30], [0, 0, 30]])


def _hard(model, mask):
    fns = {n: ScoreMask(m.shape, 0.0) for n, m in mask.items()}
    for n, fn in fns.items():
        fn.hard = mask[n]
    return MaskedModel(model, fns).eval()


def test_default_selection_masks_weight_matrices_only(model):
    names = maskable_names(model, MaskSelection())
    roles = parameter_roles(model)
    assert names and all(roles[n] == "weight" for n in names)
    assert "tok_emb.weight" not in names and "head.weight" not in names
    assert not any("ln" in n or n.endswith(".bias") for n in names)
    with_all = maskable_names(model, MaskSelection(embeddings=True, head=True, norms=True, biases=True))
    assert set(with_all) == {n for n, _ in model.named_parameters()}


def test_exclude_patterns_and_empty_selection(model):
    names = maskable_names(model, MaskSelection(exclude=("blocks.0.mlp.*",)))
    assert not any(n.startswith("blocks.0.mlp") for n in names)
    with pytest.raises(ValueError, match="covers no parameter"):
        maskable_names(model, MaskSelection(exclude=("*",)))


def test_all_ones_mask_reproduces_the_source_exactly(model, tokens):
    params = dict(model.named_parameters())
    ones = {n: torch.ones_like(params[n], dtype=torch.bool) for n in maskable_names(model, MaskSelection())}
    assert torch.equal(_hard(model, ones)(tokens), model(tokens))


def test_all_zeros_mask_zeroes_exactly_the_masked_weights(model, tokens):
    params = dict(model.named_parameters())
    names = maskable_names(model, MaskSelection())
    zeros = {n: torch.zeros_like(params[n], dtype=torch.bool) for n in names}
    masked = _hard(model, zeros)
    effective = masked.effective_weights()
    for n in names:
        assert torch.count_nonzero(effective[n]) == 0
    # Unmasked parameters are untouched: the forward equals the model with those weights zeroed.
    with torch.no_grad():
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        for n in names:
            params[n].zero_()
        expected = model(tokens)
        model.load_state_dict(reference)
    assert torch.equal(masked(tokens), expected)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 0.9, 0.98, 0.999])
def test_requested_sparsity_is_hit(model, sparsity):
    gen = torch.Generator().manual_seed(0)
    scores = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.ndim == 2}
    mask = topk_mask(scores, sparsity)
    assert abs((1 - density(mask)) - sparsity) <= 0.005
    # The kept entries are the highest scores.
    kept = torch.cat([s[mask[n]] for n, s in scores.items()])
    dropped = torch.cat([s[~mask[n]] for n, s in scores.items()])
    if len(kept) and len(dropped):
        assert kept.min() >= dropped.max()


def test_topk_rejects_bad_sparsity():
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        topk_mask({"w": torch.zeros(3, 3)}, 1.0)


def test_sampled_mask_has_the_same_count_and_complement_inverts(model):
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.randn(p.shape, generator=gen) for n, p in model.named_parameters() if p.ndim == 2}
    mask = topk_mask(scores, 0.9)
    sampled = sample_like(mask, torch.Generator().manual_seed(2))
    assert sum(int(m.sum()) for m in sampled.values()) == sum(int(m.sum()) for m in mask.values())
    assert any(not torch.equal(sampled[n], mask[n]) for n in mask)
    again = sample_like(mask, torch.Generator().manual_seed(2))
    assert all(torch.equal(again[n], sampled[n]) for n in mask)
    comp = complement(mask)
    assert abs(density(comp) - (1 - density(mask))) < 1e-9
    assert all(not (comp[n] & mask[n]).any() for n in mask)
