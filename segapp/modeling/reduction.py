"""Visual-token reduction inside the LLM: FastV, DivPrune and DyCoke's dynamic KV pruning.

`reduced_generate` is greedy decoding of one sequence through the causal LM's own decoder
layers (called one by one, so the sequence may shrink between layers and each layer may attend
to a gathered subset of its KV cache). Positions are explicit: a token keeps the RoPE position
it had in the unreduced sequence, so dropping tokens never shifts what follows.

- FastV (image or video): after layer K, keep the top ``keep`` share of visual tokens ranked by
  the last prompt token's head-averaged attention in layer K - 1; layers >= K run on the
  shorter sequence (that is where the prefill time goes down).
- DivPrune (`divprune_select`, before the LLM): a greedy max-min diverse subset of the projected
  visual tokens on cosine distance.
- DyCoke stage 2 (`KVPrune`): at every decoding step, the current token's attention in layer
  L - 1 ranks the visual tokens; layers >= L attend only to the top ``keep`` of them (the cache
  is gathered, never deleted). The kept set is recomputed only when the attention pattern
  changed (cosine similarity with the previous step below ``refresh_below``).

Without FastV the prefill is one function over every layer (`_prefill_layers`), which video
can run under `torch.compile` (`compiled_prefill`, `segapp video --compile`).

Without FastV and KV pruning, `reduced_generate` computes what the plain prefill + decode does
(up to float rounding of a differently shaped causal mask); the default image path does not
use it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from segapp.modeling.generation import CACHE, Generation
from segapp.modeling.segllm import SegLLM


@dataclass(frozen=True)
class FastV:
    """Drop visual tokens after layer `layer` by the last token's attention in layer - 1."""

    layer: int = 2
    keep: float = 0.5  # share of visual tokens layers >= `layer` still see


@dataclass(frozen=True)
class KVPrune:
    """DyCoke stage 2: layers >= `layer` attend to the top `keep` visual tokens per step."""

    layer: int = 3
    keep: float = 0.3  # 1 - P
    refresh_below: float = 0.9  # recompute the kept set when attention similarity drops below


@dataclass
class ReducedGeneration(Generation):
    """Generation plus what the reduction did."""

    visual_in: int = 0  # visual tokens entering the LLM
    visual_after_fastv: int = 0  # visual tokens layers >= FastV's layer see (= visual_in w/o)
    visual_decode: int = 0  # visual tokens late layers attend to while decoding
    kv_refreshes: int = 0  # times the KV-pruning kept set was recomputed
    kv_cache_bytes: int = 0  # size of the KV cache after prefill
    visual_positions: torch.Tensor | None = None  # RoPE position of each row of image_hidden


class _KVStore:
    """Per-layer key/value cache; duck-types the `update` of transformers' Cache.

    With `gather` set, layers >= `gather_from` get only those cache entries back (the stored
    cache is untouched).
    """

    def __init__(self, layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * layers
        self.values: list[torch.Tensor | None] = [None] * layers
        self.gather: torch.Tensor | None = None
        self.gather_from = layers

    def update(
        self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: object, **kw: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        k = key if old_k is None else torch.cat([old_k, key], dim=-2)
        v = value if old_v is None else torch.cat([old_v, value], dim=-2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        if self.gather is not None and layer_idx >= self.gather_from:
            return k.index_select(2, self.gather), v.index_select(2, self.gather)
        return k, v

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in [*self.keys, *self.values] if t is not None
        )


def _prefill_tail(
    llm: Any, hidden: torch.Tensor, visual_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After the last layer (hidden 1 x n x H): the final-normed last position (1 x H), its
    logits (1 x V) and the final-normed visual positions `visual_index` (V x H)."""
    normed = llm.model.norm(hidden[0])
    last = normed[-1:]
    return last, llm.lm_head(last), normed.index_select(0, visual_index)


# last hidden state, its logits, visual tokens' hidden states, per-layer keys, per-layer values
Prefilled = tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[Any], list[Any]]


def _prefill_layers(
    llm: Any,
    hidden: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    visual_index: torch.Tensor,
) -> Prefilled:
    """The prefill of a whole prompt (1 x n x H, RoPE positions 1 x n) through every decoder
    layer of the causal LM `llm`: `_prefill_tail`'s three tensors, then each layer's keys and
    values."""
    lm = llm.model
    cache = _KVStore(len(lm.layers))
    pe = lm.rotary_emb(hidden, positions)
    for layer in lm.layers:
        hidden = layer(
            hidden,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            position_embeddings=pe,
            **{CACHE: cache},
        )
    return (*_prefill_tail(llm, hidden, visual_index), cache.keys, cache.values)


class _CompiledPrefill:
    """`_prefill_layers` under `torch.compile` (one graph for every prompt length), made on
    first use. Fusing the many small operations of a small LLM's layers removes most of
    their per-operation cost, which merging tokens cannot reduce. If compiling fails (no
    C++ compiler on a CPU machine, an unsupported model) it warns once and runs eagerly."""

    def __init__(self) -> None:
        self.fn: Any = None
        self.failed = False

    def __call__(self, *args: Any) -> Prefilled:
        """`_prefill_layers(*args)`, compiled."""
        if not self.failed:
            if self.fn is None:
                self.fn = torch.compile(_prefill_layers, dynamic=True)
            try:
                return self.fn(*args)  # type: ignore[no-any-return]
            except Exception as exc:  # noqa: BLE001 - any compile failure: fall back
                self.failed = True
                warnings.warn(
                    f"torch.compile of the LLM prefill failed ({type(exc).__name__}: "
                    f"{str(exc).splitlines()[0] if str(exc) else ''}); running it eagerly",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _prefill_layers(*args)


compiled_prefill = _CompiledPrefill()


def _causal_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    """1 x 1 x n x n additive causal mask (the sequence holds no earlier cache)."""
    full = torch.full((n, n), torch.finfo(like.dtype).min, dtype=like.dtype, device=like.device)
    return full.triu(1)[None, None]


def _prefill_mask(model: SegLLM, hidden: torch.Tensor) -> torch.Tensor | None:
    """Prefill mask for `hidden` (1 x n x H), built once per sequence length: all-visible for a
    prefix LM; for a causal LM None under SDPA (its causal kernel, which skips the masked half)
    and an additive causal mask for any other attention implementation."""
    mask = model.prefill_attention_mask(hidden)
    if mask is not None or model.llm.config._attn_implementation == "sdpa":
        return mask
    return _causal_mask(hidden.shape[1], hidden)


def _last_query(
    layer: Any, hidden: torch.Tensor, pe: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """1 x heads x 1 x d: the RoPE'd query of the last position of `hidden` in `layer`
    (a LLaMA-style decoder layer: input_layernorm, self_attn.q_proj / head_dim)."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden[:, -1:])
    q = attn.q_proj(x).view(1, 1, -1, attn.head_dim).transpose(1, 2)
    q, _ = apply_rotary_pos_emb(q, q, pe[0][:, -1:], pe[1][:, -1:])
    return q


def _attention(query: torch.Tensor, keys: torch.Tensor, layer: Any) -> torch.Tensor:
    """S: head-averaged softmax attention of one query (1 x h x 1 x d) over keys 1 x kv x S x d."""
    groups = query.shape[1] // keys.shape[1]
    k = keys.repeat_interleave(groups, dim=1) if groups > 1 else keys
    scores = (query.float() @ k.float().transpose(-1, -2)) * layer.self_attn.scaling
    return scores.softmax(-1).mean(1)[0, 0]


def _top_visual(att: torch.Tensor, visual: torch.Tensor, keep: float) -> torch.Tensor:
    """Sorted indices of all non-visual positions plus the top `keep` share of visual ones."""
    vis_idx = visual.nonzero()[:, 0]
    n_keep = int(round(keep * len(vis_idx)))
    top = vis_idx[att[vis_idx].topk(n_keep).indices] if n_keep else vis_idx[:0]
    return torch.cat([(~visual).nonzero()[:, 0], top]).sort().values


def divprune_select(tokens: torch.Tensor, keep: int) -> torch.Tensor:
    """DivPrune: sorted indices of `keep` of the N x D `tokens`, greedy max-min cosine distance.

    The first pick is the token farthest (in its minimum distance) from all others; each next
    pick maximises its minimum distance to those already picked.
    """
    n = tokens.shape[0]
    if keep >= n:
        return torch.arange(n, device=tokens.device)
    if keep <= 0:
        return torch.zeros(0, dtype=torch.long, device=tokens.device)
    unit = F.normalize(tokens.float(), dim=-1)
    dist = 1.0 - unit @ unit.T
    others = dist + torch.eye(n, device=tokens.device) * 4.0  # ignore self-distance
    first = int(others.min(1).values.argmax())
    chosen = [first]
    nearest = dist[first].clone()
    nearest[first] = -1.0
    for _ in range(keep - 1):
        nxt = int(nearest.argmax())
        chosen.append(nxt)
        nearest = torch.minimum(nearest, dist[nxt])
        nearest[chosen] = -1.0
    return torch.tensor(sorted(chosen), dtype=torch.long, device=tokens.device)


def _fastv_prefill(
    model: SegLLM,
    h: torch.Tensor,
    pos: torch.Tensor,
    vis: torch.Tensor,
    mask: torch.Tensor | None,
    fastv: FastV,
    cache: _KVStore,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The prefill with FastV: layers before `fastv.layer` see every token, the later ones only
    the kept visual tokens (and every text token). Returns the last layer's output (before the
    final norm), the kept positions and the kept visual flags; fills `cache`."""
    lm = model.llm.model
    pe = lm.rotary_emb(h, pos)
    att: torch.Tensor | None = None
    for i, layer in enumerate(lm.layers):
        if i == fastv.layer and att is not None:
            keep = _top_visual(att, vis, fastv.keep)
            h, pos, vis = h[:, keep], pos[:, keep], vis[keep]
            pe, mask = lm.rotary_emb(h, pos), _prefill_mask(model, h)
        query = _last_query(layer, h, pe) if i == fastv.layer - 1 else None
        h = layer(
            h,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{CACHE: cache},
            position_embeddings=pe,
        )
        if query is not None:
            att = _attention(query, cache.keys[i], layer)  # type: ignore[arg-type]
    return h, pos, vis


@torch.inference_mode()
def reduced_generate(
    model: SegLLM,
    embeds: torch.Tensor,
    positions: torch.Tensor,
    visual: torch.Tensor,
    *,
    max_new_tokens: int = 48,
    fastv: FastV | None = None,
    kv_prune: KVPrune | None = None,
    compile_prefill: bool = False,
) -> ReducedGeneration:
    """Greedy decoding of one sequence with optional FastV and DyCoke KV pruning.

    embeds: 1 x L x H input embeddings (visual tokens already spliced in); positions: 1 x L
    long RoPE positions (increasing; gaps where tokens were dropped before the LLM); visual:
    L bool, which positions are visual tokens. Keeps the last-layer hidden state of every step
    that emits `[SEG]`, as `SegLLM.generate` does. `compile_prefill` (without FastV): the
    prefill's layers run under `torch.compile` (`compiled_prefill`).
    """
    lm = model.llm.model
    layers = list(lm.layers)
    if fastv is not None and not 1 <= fastv.layer < len(layers):
        raise ValueError(f"FastV layer must be in [1, {len(layers) - 1}], got {fastv.layer}")
    if kv_prune is not None and not 1 <= kv_prune.layer < len(layers):
        raise ValueError(f"KV-pruning layer must be in [1, {len(layers) - 1}]")
    if fastv is not None and kv_prune is not None:
        raise ValueError("FastV and KV pruning cannot be combined (their caches disagree)")
    t0 = time.perf_counter()
    cache = _KVStore(len(layers))
    h, pos, vis = embeds, positions, visual.to(embeds.device)
    visual_in = int(vis.sum())
    mask = _prefill_mask(model, h)
    if fastv is not None:
        h, pos, vis = _fastv_prefill(model, h, pos, vis, mask, fastv, cache)
        hidden, logits, image_hidden = _prefill_tail(model.llm, h, vis.nonzero()[:, 0])
    else:  # the whole prompt through every layer
        run = compiled_prefill if compile_prefill else _prefill_layers
        hidden, logits, image_hidden, cache.keys, cache.values = run(
            model.llm, h, pos, mask, vis.nonzero()[:, 0]
        )
    visual_positions = pos[0, vis]
    prefill_len = pos.shape[1]
    kv_bytes = cache.nbytes()
    t1 = time.perf_counter()

    tokens: list[int] = []
    seg_hidden: list[torch.Tensor] = []
    next_pos = int(positions.max()) + 1
    embed = model.llm.get_input_embeddings()
    vis_positions = vis.nonzero()[:, 0]  # cache rows (prefill) holding visual tokens
    n_keep = int(round(kv_prune.keep * len(vis_positions))) if kv_prune else len(vis_positions)
    kept_prefix: torch.Tensor | None = None
    previous: torch.Tensor | None = None
    refreshes = 0
    limit = max(0, model.llm.config.max_position_embeddings * 4 - next_pos)
    for step in range(min(max_new_tokens, limit)):
        next_id = model.first_tokens(logits)[0] if step == 0 else int(logits.argmax(-1)[0])
        if next_id == model.eos_token_id:
            break
        tokens.append(next_id)
        if next_id == model.seg_token_id:
            seg_hidden.append(hidden[0])
        h = embed(torch.tensor([[next_id]], device=embeds.device))
        p = torch.tensor([[next_pos]], device=embeds.device)
        pe = lm.rotary_emb(h, p)
        for i, layer in enumerate(layers):
            query = _last_query(layer, h, pe) if kv_prune and i == kv_prune.layer - 1 else None
            h = layer(h, position_ids=p, use_cache=True, position_embeddings=pe, **{CACHE: cache})
            if query is not None and kv_prune is not None:
                att = _attention(query, cache.keys[i], layer)[vis_positions]  # type: ignore[arg-type]
                if previous is None or float(F.cosine_similarity(att, previous, dim=0)) < (
                    kv_prune.refresh_below
                ):
                    top = vis_positions[att.topk(n_keep).indices]
                    other = (~vis).nonzero()[:, 0]
                    kept_prefix = torch.cat([other, top]).sort().values
                    refreshes += 1
                previous = att
                assert kept_prefix is not None
                generated = torch.arange(prefill_len, prefill_len + step + 1, device=h.device)
                cache.gather = torch.cat([kept_prefix, generated])
                cache.gather_from = kv_prune.layer
        hidden = lm.norm(h[:, -1])
        logits = model.llm.lm_head(hidden)
        next_pos += 1
    t2 = time.perf_counter()
    width = model.llm.config.hidden_size
    return ReducedGeneration(
        tokens,
        torch.stack(seg_hidden) if seg_hidden else embeds.new_zeros(0, width),
        int(embeds.shape[1]),
        t1 - t0,
        t2 - t1,
        visual_in=visual_in,
        visual_after_fastv=int(vis.sum()),
        visual_decode=n_keep,
        kv_refreshes=refreshes,
        kv_cache_bytes=kv_bytes,
        image_hidden=image_hidden if model.seg_pointer is not None else None,
        visual_positions=visual_positions,
    )
