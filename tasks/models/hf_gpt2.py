"""Hugging Face transformers' GPT-2 (`GPT2LMHeadModel`), built offline from its config: the paper's
model, with its language-model head tied to the token embedding.

`model: {name: hf_gpt2, n_layer: 2, n_embd: 64, n_head: 4}` builds `GPT2LMHeadModel(GPT2Config(...))`
with the task's vocabulary and positions, Hugging Face's own initialisation included (drawn from
torch's global RNG, so the trial's seeded init governs it). Nothing is downloaded: the model is
built from a config, and a trained one is loaded from a local folder or safetensors file
(`source: {pretrained: PATH}`, methods/artifacts.py).

What Instill keeps of it: `transformer` (the `GPT2Model` body, under Hugging Face's parameter names,
`transformer.h.0.attn.c_attn.weight`, so a state dict saved by `save_pretrained` loads as it is) and
the head, `lm_head`, which is `GPT2LMHeadModel`'s tied head written as `x @ wte.weight.T`: the
same logits, with no parameter of its own. The matrix thus has one name (`transformer.wte.weight`,
role "embedding" for masks) and state dicts hold no tensor twice (safetensors refuses shared ones).

Contract with the rest of Instill (as `tasks/models/gpt.py`): tokens (B, T) -> logits over the
vocabulary at the last position (B, vocab_size); the task's label y is the token y.
`model(tokens, intermediates=True)` returns `(logits, features)`: `embed` (token + position
embeddings after dropout) and `block{i}` (each block's output) are the residual stream (B, T, C);
`final` is the last position after `ln_f` (B, C), what the head reads. `model(tokens, targets=y)`
returns the next-token loss over every position of `tokens ++ y` (`task.loss: all_positions`).
Masks cover the Conv1D weights of attention and MLP (`c_attn`, `c_proj`, `c_fc`) by default.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn
from torch.nn import functional as F

from common.config import Frozen
from tasks.base import register_model


class HFGPT2Config(Frozen):
    """`GPT2Config`'s architecture fields, under their Hugging Face names; `vocab_size` and
    `n_positions` come from the task."""

    name: Literal["hf_gpt2"] = "hf_gpt2"
    n_layer: int = Field(2, ge=1, le=48)
    n_embd: int = Field(128, ge=8)
    n_head: int = Field(4, ge=1)
    n_inner: int | None = Field(None, ge=1, description="MLP width; None: 4 * n_embd")
    activation_function: Literal["gelu_new", "gelu", "relu", "silu", "tanh", "gelu_pytorch_tanh"] = "gelu_new"
    resid_pdrop: float = Field(0.1, ge=0.0, lt=1.0)
    embd_pdrop: float = Field(0.1, ge=0.0, lt=1.0)
    attn_pdrop: float = Field(0.1, ge=0.0, lt=1.0)
    layer_norm_epsilon: float = Field(1e-5, gt=0)
    initializer_range: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    def hf_config(self, vocab_size: int, n_positions: int):
        """The `transformers.GPT2Config` of this block for a task's vocabulary and positions."""
        from transformers import GPT2Config  # imported on use: `import tasks` stays fast

        fields = self.model_dump(exclude={"name"})
        return GPT2Config(vocab_size=vocab_size, n_positions=n_positions, bos_token_id=None, eos_token_id=None,
                          pad_token_id=None, **fields)  # fmt: skip


class TiedLMHead(nn.Module):
    """`GPT2LMHeadModel.lm_head` with its weight tied to `wte`: logits = x @ wte.weight.T, no bias.
    It holds the embedding outside the module tree (a tuple), so the matrix keeps one name and
    `functional_call` swapping `transformer.wte.weight` swaps the head's use of it too."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self._tied = (embedding,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self._tied[0].weight)


class HFGPT2(nn.Module):
    """transformers' GPT2LMHeadModel behind Instill's model API; see the module doc."""

    head_name = "lm_head"
    penultimate = "final"

    def __init__(self, cfg: HFGPT2Config, vocab_size: int, n_positions: int, sequence_loss: bool = False):
        super().__init__()
        from transformers import GPT2LMHeadModel

        self.cfg = cfg
        self.own_loss = sequence_loss  # forward(tokens, targets=y) -> (loss, measurements)
        hf = GPT2LMHeadModel(cfg.hf_config(vocab_size, n_positions))  # Hugging Face's init, head tied to wte
        self.transformer = hf.transformer
        self.lm_head = TiedLMHead(self.transformer.wte)

    def feature_names(self) -> tuple[str, ...]:
        """Names of the features `forward(..., intermediates=True)` returns, in order."""
        return ("embed", *(f"block{i}" for i in range(len(self.transformer.h))), "final")

    def _hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The body's last hidden state (after `ln_f`, every position) and the residual stream after
        the embedding and each block, read by hooks (GPT2Block's call signature varies across
        transformers versions; its output does not)."""
        features: dict[str, torch.Tensor] = {}

        def record(name):
            def hook(module, args, output):
                features[name] = output[0] if isinstance(output, tuple) else output

            return hook

        body = self.transformer
        handles = [body.drop.register_forward_hook(record("embed"))]
        handles += [block.register_forward_hook(record(f"block{i}")) for i, block in enumerate(body.h)]
        try:
            hidden = body(input_ids=tokens, use_cache=False).last_hidden_state  # (B, T, C)
        finally:
            for handle in handles:
                handle.remove()
        return hidden, features

    def forward(
        self, tokens: torch.Tensor, intermediates: bool = False, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits over the vocabulary at the last position (B, vocab_size); with `intermediates`,
        `(logits, features)`; with `targets` (B,), `(loss, measurements)`: the mean next-token
        cross-entropy over every position of `tokens ++ targets` (`lm`; `ce`: the last position's)."""
        hidden, features = self._hidden(tokens)
        if targets is not None:
            logits = self.lm_head(hidden).float()  # (B, T, vocab)
            following = torch.cat([tokens[:, 1:], targets[:, None]], dim=1)  # the token after each position
            lm = F.cross_entropy(logits.flatten(0, 1), following.flatten())
            return lm, {"lm": lm, "ce": F.cross_entropy(logits[:, -1].detach(), targets)}
        final = hidden[:, -1]  # (B, C), ln_f applied by the body
        features["final"] = final
        logits = self.lm_head(final)
        return (logits, features) if intermediates else logits

    @staticmethod
    def pretrained_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A state dict read from a pretrained file under this model's names (`source: {pretrained:}`)."""
        return hf_state_dict(state)

    def to_hf(self):
        """A `transformers.GPT2LMHeadModel` holding this model's weights (e.g. to `save_pretrained`)."""
        from transformers import GPT2LMHeadModel

        body = self.transformer
        hf = GPT2LMHeadModel(body.config)
        hf.load_state_dict(self.state_dict(), strict=False)  # lm_head.weight is wte's, tied
        return hf


def hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A GPT-2 state dict as Hugging Face saves it (`save_pretrained`, or the hub's older files whose
    names lack `transformer.` and hold attention-mask buffers) under this model's names."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight" or name.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # the tied head (wte's), and causal-mask buffers, not weights
        out[name if name.startswith("transformer.") else f"transformer.{name}"] = tensor
    return out


@register_model("hf_gpt2", HFGPT2Config, accepts=("tokens",), vocabulary_head=lambda cfg: True)
def build_hf_gpt2(
    cfg: HFGPT2Config, *, vocab_size: int, n_positions: int, n_classes: int, sequence_loss: bool = False, **_
) -> HFGPT2:
    if n_classes > vocab_size:
        raise ValueError(f"hf_gpt2 reads class y as token y, but the task has {n_classes} classes and a "
                         f"vocabulary of {vocab_size}")  # fmt: skip
    return HFGPT2(cfg, vocab_size=vocab_size, n_positions=n_positions, sequence_loss=sequence_loss)
