"""What a head looks at: its attention probabilities from a query position over every key position, clean and
corrupt, per example and summarised by role.

The probabilities are computed from the queries and keys the model itself hands its attention function (after
rotary, before grouped key/value heads are repeated), captured in the model's own forward whatever its attention
implementation (eager, sdpa, flash: the attention output still comes from that implementation, and no
``output_attentions`` flag is needed, which fused and flash paths ignore): ``softmax(q k^T * scaling)`` in float32
with the module's own scaling (granite's attention multiplier, GPT-2's inverse-layer scaling included), its logit
soft-cap where it has one, under the causal mask and the layer's sliding window where it has one. Families whose
attention does not go through transformers' attention interface (GPT-Neo: eager only, local layers windowed inside
the module) are read from the eager module's own probability output instead. A test holds both routes to the
eager probabilities of every family, and an sdpa-loaded model to its eager twin.

Roles align examples of different lengths: each key position gets one role (the corrupted name token, a keyword
of the prompt such as ``SELECT`` or ``FROM``, else the section it is in: the Instruction, the Context, the Response),
and a head's attention to a role is the summed probability over that role's positions, averaged over examples.
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from helpers.models.architectures import blocks, family_spec, get_submodule, head_geometry
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


def _attention_interface():
    try:
        from transformers.modeling_utils import AttentionInterface
    except ImportError:  # transformers < 4.48: no interface
        return None
    return AttentionInterface


def goes_through_interface(model) -> bool:
    """Does this model's attention call transformers' attention interface (where queries and keys are captured)?"""
    spec = family_spec(model.config)
    module = get_submodule(blocks(model)[0], spec.attention)
    return _attention_interface() is not None and "ALL_ATTENTION_FUNCTIONS" in vars(sys.modules[type(module).__module__])


_CAPTURE_LOCK = threading.Lock()


@contextmanager
def captured_queries_keys(model, store: dict):
    """While inside, every attention call of ``model`` records ``store[layer] = (query [B, H, Tq, dh], key
    [B, kv_heads, Tk, dh], scaling, sliding_window, softcap)`` and then runs the model's own implementation."""
    interface = _attention_interface()
    name = getattr(model.config, "_attn_implementation", None) or "eager"
    mapping = interface._global_mapping
    had, original = name in mapping, mapping.get(name)
    layer_of = {id(get_submodule(b, family_spec(model.config).attention)): i for i, b in enumerate(blocks(model))}

    def capture(module, query, key, value, attention_mask, *args, **kwargs):
        if id(module) in layer_of:
            scaling = kwargs.get("scaling")
            store[layer_of[id(module)]] = (
                query.detach(), key.detach(), scaling if scaling is not None else getattr(module, "scaling", None),
                kwargs.get("sliding_window", getattr(module, "sliding_window", None)), kwargs.get("softcap"))
        own = original if original is not None else sys.modules[type(module).__module__].eager_attention_forward
        return own(module, query, key, value, attention_mask, *args, **kwargs)

    with _CAPTURE_LOCK:  # (one wrapper at a time: overlapping calls would restore each other's)
        mapping[name] = capture
        try:
            yield
        finally:
            if had:
                mapping[name] = original
            else:
                del mapping[name]


def probabilities_from_queries_keys(query, key, scaling, sliding_window=None, softcap=None) -> torch.Tensor:
    """[heads, Tq, Tk] float32: ``softmax(q k^T * scaling)`` of one prompt (batch row 0), causal (queries are the last
    Tq positions), keys beyond ``sliding_window`` positions back hidden; grouped key heads shared by their queries."""
    q, k = query[0].float(), key[0].float()  # [H, Tq, dh], [kv, Tk, dh]
    H, Tq, dh = q.shape
    k = k.repeat_interleave(H // k.shape[0], dim=0)
    scores = q @ k.transpose(-1, -2) * (scaling if scaling is not None else dh ** -0.5)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    Tk = k.shape[1]
    q_pos = torch.arange(Tk - Tq, Tk, device=q.device)[:, None]
    k_pos = torch.arange(Tk, device=q.device)[None, :]
    hidden = k_pos > q_pos
    if sliding_window is not None:
        hidden |= k_pos <= q_pos - sliding_window
    return scores.masked_fill(hidden, float("-inf")).softmax(-1)


def attention_probabilities(model, ids) -> torch.Tensor:
    """[layer, head, query, key] attention probabilities of one prompt (``ids``: token ids), float32 on the CPU."""
    model = unwrap_model(model)
    ids = torch.as_tensor(list(ids), device=model_device(model)).unsqueeze(0)
    store: dict = {}
    if goes_through_interface(model):
        with eval_mode(model), captured_queries_keys(model, store), torch.no_grad():
            ModelCalls.of(model).forward(model, ids)
        missing = [l for l in range(len(blocks(model))) if l not in store]
        if missing:  # (e.g. an implementation registered on the model's own interface, not the global one)
            raise RuntimeError(f"layers {missing} did not call transformers' attention interface: their queries and "
                               f"keys were not captured")
        return torch.stack([probabilities_from_queries_keys(*store[l]).cpu() for l in range(len(blocks(model)))])
    return _eager_module_probabilities(model, ids)


def _eager_module_probabilities(model, ids) -> torch.Tensor:
    """The eager attention modules' own probability outputs (families outside the attention interface)."""
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
            ModelCalls.of(model).forward(model, ids)
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
    if len(tokens) != len(pairs) or any(len(t) != len(p.clean_ids) for t, p in zip(tokens, pairs)):
        raise ValueError(f"tokens must hold each example's token texts: {len(tokens)} lists for {len(pairs)} pairs, "
                         f"lengths {[len(t) for t in tokens]} for {[len(p.clean_ids) for p in pairs]}")
    if unknown_queries := [q for q in queries if q not in ("answer", "corrupted")]:
        raise ValueError(f"unknown queries {unknown_queries}; known: ('answer', 'corrupted')")
    geo = head_geometry(unwrap_model(model).config)
    if wrong := [h for h in heads if not (0 <= h[0] < geo.n_layers and 0 <= h[1] < geo.n_heads)]:
        raise ValueError(f"heads {wrong} are outside the model ({geo.n_layers} layers x {geo.n_heads} heads)")
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
