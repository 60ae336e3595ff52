"""What a head looks at: its attention probabilities from a query position over every key position, clean and
corrupt, per example and summarised by role.

The probabilities come from the model's own eager attention formula (query-key products with its scaling, rotary,
causal and local-window masks, key/value heads shared by grouped queries), run for this one forward: a model
loaded with sdpa or flash attention is switched to eager while it runs and back afterwards, and the attention
module's probability output is captured by a hook (no ``output_attentions`` flag, which fused and flash paths
ignore). Dropout is off.

Roles align examples of different lengths: each key position gets one role (the corrupted name token, a keyword
of the prompt such as ``SELECT`` or ``FROM``, else the section it is in: the Instruction, the Context, the Response),
and a head's attention to a role is the summed probability over that role's positions, averaged over examples.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from helpers.models.architectures import blocks, family_spec, get_submodule
from helpers.patching.model_calls import ModelCalls, eval_mode, model_device, unwrap_model

#: prompt keywords that get a role of their own (matched on the token's text, stripped)
KEYWORDS = ("SELECT", "FROM", "CREATE", "TABLE", "ORDER", "BY", "(", ")", ",")
SECTIONS = ("Instruction", "Context", "Response")
NAME_ROLE = "corrupted name"


@contextmanager
def eager_attention(model):
    """Run ``model`` with its eager attention (the formula that yields probabilities) while inside."""
    config = model.config
    before = getattr(config, "_attn_implementation", None)
    if before in (None, "eager"):
        yield
        return
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = before


def attention_probabilities(model, ids) -> torch.Tensor:
    """[layer, head, query, key] attention probabilities of one prompt (``ids``: token ids), float32 on the CPU."""
    model = unwrap_model(model)
    spec = family_spec(model.config)
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer, block in enumerate(blocks(model)):
        def hook(mod, args, output, _layer=layer):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if not isinstance(weights, torch.Tensor):
                raise RuntimeError(f"layer {_layer}'s attention returned no probabilities under eager attention")
            store[_layer] = weights[0].detach().float().cpu()
        handles.append(get_submodule(block, spec.attention).register_forward_hook(hook))
    try:
        with eval_mode(model), eager_attention(model), torch.no_grad():
            ModelCalls.of(model).forward(model, torch.as_tensor(list(ids), device=model_device(model)).unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return torch.stack([store[l] for l in range(len(store))])


def token_roles(tokens: list[str], corrupted_position: int | None) -> list[str]:
    """One role per token: the corrupted name, a keyword, or the section (Instruction / Context / Response)."""
    roles, section = [], "prompt start"
    for i, tok in enumerate(tokens):
        text = tok.strip()
        for s in SECTIONS:
            if text.startswith(s):
                section = s
        if i == corrupted_position:
            roles.append(NAME_ROLE)
        elif text in KEYWORDS:
            roles.append(text)
        else:
            roles.append(f"{section} text" if section in SECTIONS else section)
    return roles


@dataclass
class HeadAttention:
    """One head's attention from one query (``"answer"`` or ``"corrupted"``) over the examples.

    ``clean`` / ``corrupt``: [example] lists of probabilities over that example's key positions; ``by_role``:
    side -> role -> mean probability mass over examples."""

    layer: int
    head: int
    query: str
    clean: list[list[float]]
    corrupt: list[list[float]]
    by_role: dict[str, dict[str, float]]

    def to_dict(self) -> dict:
        return {"layer": self.layer, "head": self.head, "query": self.query, "by_role": self.by_role,
                "clean": self.clean, "corrupt": self.corrupt}


def head_attention(model, pairs, tokens: list[list[str]], heads: list[tuple[int, int]],
                   queries: tuple[str, ...] = ("answer",)) -> list[HeadAttention]:
    """Attention of each of ``heads`` ((layer, head)) from each query in ``queries`` ("answer": the last position;
    "corrupted": the corrupted token), clean and corrupt, per example and by role (``tokens``: each example's
    token texts, for the roles)."""
    pairs = list(pairs)
    probs = [(attention_probabilities(model, p.clean_ids), attention_probabilities(model, p.corrupt_ids))
             for p in pairs]
    roles = [token_roles(t, p.corrupted_position) for t, p in zip(tokens, pairs)]
    out = []
    for layer, head in heads:
        for query in queries:
            sides = {"clean": [], "corrupt": []}
            mass: dict[str, dict[str, float]] = {"clean": {}, "corrupt": {}}
            for (clean, corrupt), pair, role in zip(probs, pairs, roles):
                q = pair.answer_position if query == "answer" else pair.corrupted_position
                for side, p in (("clean", clean), ("corrupt", corrupt)):
                    row = p[layer, head, q, :q + 1]
                    sides[side].append(row.tolist())
                    for r, value in zip(role, row.tolist()):
                        mass[side][r] = mass[side].get(r, 0.0) + value / len(pairs)
            out.append(HeadAttention(layer, head, query, sides["clean"], sides["corrupt"], mass))
    return out
