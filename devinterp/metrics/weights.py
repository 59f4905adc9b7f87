"""Weight-derived metrics: functions from the weights and the language's ground truth to named values.

Headline metrics (one per rule, with progress values). A tensor-transformer is a polynomial of
its one-hot inputs, so the model's prediction in a rule's minimal context (bigram [s];
skip-trigram A at offset d before B, the positions between empty, d = 1..max_skip; induction
[x, y, x] for eligible x and every y the language can put after x) is an exact contraction of
the weights with those tokens and needs no sampled data.
The metric is KL(rule's true next-token distribution || that prediction), averaged over the
rule's contexts; "nothing learned" is the same KL for the uniform prediction (what the
zero-initialised unembedding gives) and "learned" is 0, so progress = 1 - KL / KL_uniform.
Category transitions compare distributions over categories.

Diagnostics (no progress values): skip-rule trigram push as a z-score against other anchors and
the rank of the output; previous-token score of layer-0 heads; sign-aware copying score of
last-layer heads; Q/K/V composition between layers and one combined induction-circuit score;
per-head QK and OV norms and effective ranks; MLP contribution to the direct path; total norm.

Names follow docs/guides/training.md ("What is measured"): ``<primitive>/<rule>/<metric>``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from devinterp.baselines import blind_components, pooled_baselines
from devinterp.language import Language, plogp
from devinterp.language.primitive import InductionCircuit, TrigramPush
from devinterp.language.reachability import reachability
from devinterp.metrics import circuits
from devinterp.model import ModelConfig, TensorTransformer
from devinterp.store.schema import MetricInfo


def context_logits(
    model: TensorTransformer, tokens: Tensor, positions: Tensor, live: Tensor | None = None
) -> Tensor:
    """Exact logits after sparse contexts: tokens, positions, live (n, k) -> (member, n, V) at
    each context's last slot. Slots with live = False, like positions not listed at all, are
    empty (zero embedding). In bilinear and squared attention an empty position stays zero
    through every layer (its query, key and value are zero, and it adds nothing to others), so
    leaving it out is exact. (Softmax attention would still attend to it; for that comparison
    variant the contexts are the listed tokens alone.)"""
    M = model.cfg.n_members
    x = model.embed(tokens[None].expand(M, -1, -1), positions)  # (M, n, k, D)
    if live is not None:
        x = x * live[None, :, :, None]
    return model.unembed(model.blocks(x, positions)[:, :, -1:])[:, :, 0]


def occurrences(
    language: Language, index: int, contexts: list, n_ctx: int, n: int = 1024, seed: int = 7
) -> np.ndarray:
    """(n_contexts,) how often each minimal context of primitive ``index`` (1-based label) occurs
    in ``n`` sequences of the language, its tokens at the same relative positions and its rule
    firing at its last slot (so an offset the language never produces counts 0)."""
    primitive = language.primitives[index - 1]
    sample = language.sample(n, n_ctx, seed=seed)
    tokens, labels, rules = sample.tokens[:, :-1], sample.labels[:, 1:], sample.rules[:, 1:]  # next token's
    counts = np.zeros(len(contexts))
    for j, context in enumerate(contexts):
        rule = language.rule_names.index(f"{primitive.name}/{primitive.rule_names[context.rule]}")
        back = [context.positions[-1] - p for p in context.positions]  # offsets before the last slot
        reach = max(back)
        if reach >= tokens.shape[1]:
            continue
        hit = (labels[:, reach:] == index) & (rules[:, reach:] == rule)
        for token, offset in zip(context.tokens, back):
            hit &= tokens[:, reach - offset : tokens.shape[1] - offset] == token
        counts[j] = hit.sum()
    return counts


def possible_under(language: Language, contexts: list) -> np.ndarray:
    """(n,) bool: every step between adjacent listed positions of the context has non-zero
    probability under the language. [x, y, x] for induction then ranges over the pairs the
    language can produce (y that can follow x), so the metric asks for copying where copying
    is what the data teaches, not on token pairs the model never sees."""
    if not contexts:
        return np.zeros(0, dtype=bool)
    tokens = np.array([c.tokens for c in contexts])  # (n, k): one rule's contexts share k
    positions = np.array([c.positions for c in contexts])
    dist = language.true_next_dist(tokens)  # (n, k, V)
    rows = np.arange(len(contexts))
    ok = np.ones(len(contexts), dtype=bool)
    for i in range(tokens.shape[1] - 1):
        adjacent = positions[:, i + 1] == positions[:, i] + 1
        ok &= ~adjacent | (dist[rows, i, tokens[:, i + 1]] > 0)
    return ok


def adjacent_run(positions) -> int:
    """How many of a context's listed positions, counted back from its last, follow each other
    with no empty slot between (the slots an order-k oracle may read: k up to this)."""
    run = 1
    while run < len(positions) and positions[-run] - positions[-run - 1] == 1:
        run += 1
    return run


def next_after_contexts(language: Language, tokens: np.ndarray, live: np.ndarray) -> np.ndarray:
    """(n, V): ``language``'s next-token distribution after each context's listed tokens (tokens
    (n, k) padded in front, live (n, k)), contexts of one length at a time."""
    out = np.zeros((len(tokens), language.d_vocab))
    lengths = live.sum(1)
    for length in sorted(set(lengths.tolist())):
        chosen = np.flatnonzero(lengths == length)
        out[chosen] = language.true_next_dist(tokens[chosen, tokens.shape[1] - length :])[:, -1]
    return out


class HeadlineMetrics:
    """One KL metric per rule that has minimal contexts, computed from the weights alone.

    All contexts go through the model in one batch: shorter ones are padded in front with empty
    slots. Category-level rules compare the model's category distribution (token
    probabilities summed within categories) with the true one.
    """

    def __init__(self, language: Language, n_ctx: int, max_contexts_per_rule: int = 32):
        V = language.d_vocab
        category_onehot = np.eye(len(language.vocab.categories))[language.vocab.token_category]  # (V, C)
        infos: list[MetricInfo] = []
        entries = []  # (metric, tokens, positions, category_level)
        context_weights: list[float] = []  # how often each context occurs (1 unless counted)
        owners: list[int] = []  # index of each context's primitive
        # a rule no sequence can fire (devinterp/language/reachability.py) has nothing to learn
        can_fire = reachability(language).rules
        for index, primitive in enumerate(language.primitives, start=1):
            by_rule: dict[int, list] = {}
            first_rule = language.rule_offsets[index - 1]
            for context in primitive.minimal_contexts():
                if max(context.positions) < n_ctx and can_fire[first_rule + context.rule]:
                    by_rule.setdefault(context.rule, []).append(context)
            for rule, contexts in sorted(by_rule.items()):
                if primitive.possible_contexts_only:
                    contexts = [c for c, ok in zip(contexts, possible_under(language, contexts)) if ok]
                if len(contexts) > max_contexts_per_rule:  # evenly spaced, deterministic subset
                    keep = np.linspace(0, len(contexts) - 1, max_contexts_per_rule).round().astype(int)
                    contexts = [contexts[i] for i in keep]
                labels = language.next_label(np.array([c.tokens for c in contexts]))
                # contexts where a higher-priority rule takes over do not show this rule
                contexts = [c for c, label in zip(contexts, labels) if label == index]
                weights = np.ones(len(contexts))
                if contexts and primitive.weigh_contexts_by_occurrence:
                    weights = occurrences(language, index, contexts, n_ctx)
                    if weights.sum() > 0:  # contexts the language never produces are left out
                        contexts = [c for c, w in zip(contexts, weights) if w > 0]
                        weights = weights[weights > 0]
                    else:  # a rule too rare for the sample: every context counts the same
                        weights = np.ones(len(contexts))
                if contexts:
                    infos.append(
                        MetricInfo(
                            f"{primitive.name}/{primitive.rule_names[rule]}/kl",
                            "weight",
                            primitive.name,
                            primitive.rule_names[rule],
                            learned=0.0,
                        )
                    )
                    entries += [(len(infos) - 1, c, primitive.category_level) for c in contexts]
                    context_weights += weights.tolist()
                    owners += [index - 1] * len(contexts)
        self.contexts = [(m, c) for m, c, _ in entries]  # (metric index, MinimalContext)
        self.weights = np.array(context_weights, dtype=np.float64)  # (n_contexts,)
        k = max((len(c.tokens) for _, c, _ in entries), default=1)
        pad = lambda row, fill: (fill,) * (k - len(row)) + tuple(row)  # noqa: E731
        tokens = np.array([pad(c.tokens, 0) for _, c, _ in entries], dtype=np.int64).reshape(-1, k)
        positions = np.array(
            [pad(c.positions, c.positions[0]) for _, c, _ in entries], dtype=np.int64
        ).reshape(-1, k)
        live = np.array([pad((True,) * len(c.tokens), False) for _, c, _ in entries], dtype=bool).reshape(
            -1, k
        )
        metric = np.array([m for m, _, _ in entries], dtype=np.int64)
        category_level = np.array([level for _, _, level in entries], dtype=bool)
        true_next = next_after_contexts(language, tokens, live)  # from the visible tokens only
        self.tensors: dict[str, Tensor] = {
            "tokens": torch.from_numpy(tokens),
            "positions": torch.from_numpy(positions),
            "live": torch.from_numpy(live),
            "category_onehot": torch.from_numpy(category_onehot).float(),
        }
        nothing = np.zeros(len(infos))
        for level, name in ((False, "token"), (True, "category")):
            chosen = np.flatnonzero(category_level == level)
            target = true_next[chosen]
            uniform = np.full(V, 1.0 / V)
            if level:
                target, uniform = target @ category_onehot, uniform @ category_onehot
            target_plogp = plogp(target)
            average = np.zeros((len(infos), len(chosen)))
            average[metric[chosen], np.arange(len(chosen))] = self.weights[chosen]
            average /= np.where(average.sum(1, keepdims=True) > 0, average.sum(1, keepdims=True), 1)
            nothing += average @ (target_plogp - target @ np.log(uniform))
            self.tensors.update(
                {
                    f"{name}_index": torch.from_numpy(chosen),
                    f"{name}_target": torch.from_numpy(target).float(),
                    f"{name}_plogp": torch.from_numpy(target_plogp).float(),
                    f"{name}_average": torch.from_numpy(average).float(),
                }
            )
        knock_out, blind, blind_from, mass = self._baselines(
            language, n_ctx, infos, tokens, live, true_next, owners, category_level, category_onehot
        )
        self.infos = [
            MetricInfo(
                i.name,
                i.kind,
                i.primitive,
                i.rule,
                float(nothing[m]),
                0.0,
                unit="nats",
                knock_out=float(knock_out[m]),
                blind=float(blind[m]),
                blind_from=blind_from[m],
                mass=float(mass[m]),
            )
            for m, i in enumerate(infos)
        ]

    def _baselines(
        self, language, n_ctx, infos, tokens, live, true_next, owners, category_level, category_onehot
    ):
        """Per metric, its knock-out and blind baselines (devinterp/baselines.py) over its contexts
        (``true_next``: the language's distribution after each) with their weights, and its mass
        (its rule's positions in a training-distribution sample).
        An oracle of order k sees a context's last k slots only where they are listed and
        adjacent (so [A, empty, ..., B] gets order 1). Category-level metrics pool over categories."""
        n_metrics = len(infos)
        knock_out, blind = np.full(n_metrics, np.nan), np.full(n_metrics, np.nan)
        blind_from, mass = [""] * n_metrics, np.full(n_metrics, np.nan)
        metric = np.array([m for m, _ in self.contexts], dtype=np.int64)
        owners = np.array(owners, dtype=np.int64)
        if not self.contexts:  # a corpus: no rules with minimal contexts
            return knock_out, blind, blind_from, mass
        oracles = language.context_oracles(n_ctx)
        adjacent = np.zeros_like(live)  # (n, k): the run of adjacent listed slots ending the context
        for row, (_, context) in enumerate(self.contexts):
            run = adjacent_run(context.positions)
            adjacent[row, adjacent.shape[1] - run :] = True
        for owner in sorted(set(owners.tolist())):
            rows = np.flatnonzero(owners == owner)
            visible = tokens[rows]
            target = true_next[rows]
            oracle_rows = blind_components(
                language, owner + 1, oracles, visible, adjacent[rows], knock_out=False
            )
            components = {name: values[:, -1] for name, values in oracle_rows.items()}
            if owner < len(language.primitives) - 1:
                without = language.knock_out([language.primitives[owner].name])
                components["knock_out"] = next_after_contexts(without, visible, live[rows])
            uniform = np.full(language.d_vocab, 1.0 / language.d_vocab)
            if category_level[rows].all():
                target, uniform = target @ category_onehot, uniform @ category_onehot
                components = {name: values @ category_onehot for name, values in components.items()}
            primitive = language.primitives[owner]
            for m in sorted(set(metric[rows].tolist())):
                mine = metric[rows] == m
                found = pooled_baselines(
                    target[mine],
                    {name: values[mine] for name, values in components.items()},
                    self.weights[rows[mine]],
                    uniform,
                )
                knock_out[m], blind[m], blind_from[m] = found.knock_out, found.blind, found.blind_from
                rule = language.rule_names.index(f"{primitive.name}/{infos[m].rule}")
                mass[m] = float(oracles.rule_positions[rule])
        return knock_out, blind, blind_from, mass

    def to(self, device: torch.device) -> "HeadlineMetrics":
        self.tensors = {name: t.to(device) for name, t in self.tensors.items()}
        return self

    def compute(self, model: TensorTransformer) -> Tensor:
        """(n_headline, member) KL values."""
        t = self.tensors
        if not self.infos:  # a corpus: no rules with minimal contexts
            return model.W_E.new_zeros(0, model.cfg.n_members)
        log_q = (
            context_logits(model, t["tokens"], t["positions"], t["live"]).float().log_softmax(-1)
        )  # (M, n, V)
        return self.kl(log_q)

    def kl(self, log_q: Tensor) -> Tensor:
        """(n_headline, member) KL values from predictions log_q (member, n_contexts, V) in the
        contexts' order (``self.contexts``): the metric of any prediction, a model's or not."""
        t = self.tensors
        token_kl = t["token_plogp"] - (t["token_target"] * log_q[:, t["token_index"]]).sum(-1)  # (M, n_token)
        category_q = log_q[:, t["category_index"]].exp() @ t["category_onehot"]  # (M, n_category, C)
        category_kl = t["category_plogp"] - (t["category_target"] * category_q.clamp_min(1e-30).log()).sum(-1)
        return t["token_average"] @ token_kl.T + t["category_average"] @ category_kl.T


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """numerator / denominator, 0 where the denominator is 0 (weights at initialisation)."""
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-30), torch.zeros_like(numerator))


class Diagnostics:
    """Mechanism diagnostics of the circuits; no progress values. Each primitive asks for its
    own (``Primitive.weight_diagnostics``: a trigram push per skip-trigram rule, the induction
    circuit); the induction circuit is reported under ``model`` when no primitive owns it."""

    def __init__(self, language: Language, cfg: ModelConfig, profile_window: int = 16):
        self.cfg = cfg
        self.offsets = list(range(min(profile_window, cfg.n_ctx - 1) + 1))  # 0..W
        self.pushes: list[
            tuple[str, list[str], Tensor, list[int]]
        ] = []  # (primitive, rule names, rules, offsets)
        owners = []  # primitives owning the induction circuit
        empty = reachability(language).empty
        for p in language.primitives:
            if p.name in empty:  # no mechanism to diagnose in a primitive that can never fire
                continue
            for diagnostic in p.weight_diagnostics():
                if isinstance(diagnostic, TrigramPush):
                    self.pushes.append(
                        (p.name, p.rule_names, torch.from_numpy(diagnostic.rules), list(diagnostic.offsets))
                    )
                elif isinstance(diagnostic, InductionCircuit):
                    owners.append(p.name)
                else:
                    raise TypeError(f"{p.name}: unknown weight diagnostic {type(diagnostic).__name__}")
        self.induction = owners[0] if owners else "model"
        self.has_induction_circuit = cfg.n_layers >= 2
        self.infos = [
            MetricInfo(name, "diagnostic", primitive, rule) for name, (primitive, rule) in self._names()
        ]

    def _names(self) -> list[tuple[str, tuple[str, str]]]:
        """(metric name, (primitive, rule)) in the order of a row."""
        cfg, names = self.cfg, []
        L, H = cfg.n_layers, cfg.n_heads
        for primitive, rule_names, _, _ in self.pushes:
            for rule in rule_names:
                names += [
                    (f"{primitive}/{rule}/push_z", (primitive, rule)),
                    (f"{primitive}/{rule}/out_rank", (primitive, rule)),
                ]
        if self.has_induction_circuit:
            owner = self.induction
            names += [(f"{owner}/L0H{h}/prev_token", (owner, f"L0H{h}")) for h in range(H)]
            names += [(f"{owner}/L{L - 1}H{h}/copying", (owner, f"L{L - 1}H{h}")) for h in range(H)]
            names.append((f"{owner}/circuit/score", (owner, "circuit")))
        for kind in ("k", "q", "v"):
            for l1 in range(L):
                for l2 in range(l1 + 1, L):
                    names += [
                        (f"comp/{kind}/L{l1}H{a}->L{l2}H{b}", ("comp", f"L{l1}H{a}->L{l2}H{b}"))
                        for a in range(H)
                        for b in range(H)
                    ]
        for layer in range(L):
            for h in range(H):
                for r in range(cfg.n_pairs):
                    names += [
                        (f"model/L{layer}H{h}/qk{r + 1}_norm", ("model", f"L{layer}H{h}")),
                        (f"model/L{layer}H{h}/qk{r + 1}_rank", ("model", f"L{layer}H{h}")),
                    ]
                names += [
                    (f"model/L{layer}H{h}/ov_norm", ("model", f"L{layer}H{h}")),
                    (f"model/L{layer}H{h}/ov_rank", ("model", f"L{layer}H{h}")),
                ]
            if cfg.mlp:
                names.append((f"model/L{layer}/mlp_direct_norm", ("model", f"L{layer}")))
        names += [("model/all/direct_norm", ("model", "all")), ("model/all/weight_norm", ("model", "all"))]
        return names

    def to(self, device: torch.device) -> "Diagnostics":
        self.pushes = [(n, names, r.to(device), o) for n, names, r, o in self.pushes]
        return self

    def compute(self, model: TensorTransformer) -> Tensor:
        """(n_diagnostics, member) values, in the order of ``infos``."""
        values = self.values(model)
        names = [i.name for i in self.infos]
        if list(values) != names:
            computed = list(values) + [None] * len(names)
            first = next((a, b) for a, b in zip(computed, names + [None] * len(computed)) if a != b)
            raise ValueError(
                f"diagnostics: computed {len(values)} values for {len(names)} declared names, first "
                f"difference (computed, declared): {first}"
            )
        return torch.stack(list(values.values())).float()

    def values(self, model: TensorTransformer) -> dict[str, Tensor]:
        """Every diagnostic by name, (member,) each, each name made next to its value."""
        cfg, out = self.cfg, {}
        L, H = cfg.n_layers, cfg.n_heads
        for primitive, rule_names, rules, offsets in self.pushes:
            z, rank = self._skip_push(model, rules, offsets)  # (M, R) each
            for r, rule in enumerate(rule_names):
                out[f"{primitive}/{rule}/push_z"] = z[:, r]
                out[f"{primitive}/{rule}/out_rank"] = rank[:, r]
        compositions = {
            (l1, l2): circuits.composition(model, l1, l2) for l1 in range(L) for l2 in range(l1 + 1, L)
        }
        if self.has_induction_circuit:
            owner, last = self.induction, L - 1
            profile0 = circuits.positional_profile(model, 0, self.offsets)  # (M, H, W+1)
            prev_token = _safe_ratio(profile0[..., 1].abs(), profile0.abs().sum(-1))  # (M, H)
            copying = self._copying(model, profile0[..., 1], last)  # (M, H)
            k_comp = compositions[(0, last)]["k"]  # (M, H0, H_last), computed once above
            circuit = (prev_token[:, :, None] * k_comp * copying.clamp_min(0)[:, None, :]).flatten(1).amax(1)
            out.update({f"{owner}/L0H{h}/prev_token": prev_token[:, h] for h in range(H)})
            out.update({f"{owner}/L{last}H{h}/copying": copying[:, h] for h in range(H)})
            out[f"{owner}/circuit/score"] = circuit
        for kind in ("k", "q", "v"):
            for (l1, l2), composition in compositions.items():
                out.update(
                    {
                        f"comp/{kind}/L{l1}H{a}->L{l2}H{b}": composition[kind][:, a, b]
                        for a in range(H)
                        for b in range(H)
                    }
                )
        for layer in range(L):
            q, k = circuits.query_key_vectors(model, layer)  # (M, P, H, V, dh)
            qk_norm, qk_rank = circuits.frobenius_and_effective_rank(
                circuits.gram_spectrum(q, k)
            )  # (M, P, H)
            left, right = circuits.ov_factors(model, layer)
            ov_norm, ov_rank = circuits.frobenius_and_effective_rank(
                circuits.gram_spectrum(left, right.transpose(-1, -2))
            )  # (M, H)
            qk_norm = qk_norm / cfg.d_head
            for h in range(H):
                for r in range(cfg.n_pairs):
                    out[f"model/L{layer}H{h}/qk{r + 1}_norm"] = qk_norm[:, r, h]
                    out[f"model/L{layer}H{h}/qk{r + 1}_rank"] = qk_rank[:, r, h]
                out[f"model/L{layer}H{h}/ov_norm"] = ov_norm[:, h]
                out[f"model/L{layer}H{h}/ov_rank"] = ov_rank[:, h]
            if cfg.mlp:
                out[f"model/L{layer}/mlp_direct_norm"] = (
                    circuits.mlp_direct_path(model, layer).flatten(1).norm(dim=1)
                )
        out["model/all/direct_norm"] = circuits.direct_path(model).flatten(1).norm(dim=1)
        out["model/all/weight_norm"] = (
            torch.stack([p.flatten(1).pow(2).sum(1) for p in model.parameters()]).sum(0).sqrt()
        )
        return out

    @staticmethod
    def _copying(model: TensorTransformer, previous_weight: Tensor, layer: int) -> Tensor:
        """Sign-aware copying score of each head of ``layer``: the z-score of its OV diagonal
        (output = source token) against all OV entries, times the sign of its pattern in the
        induction match (query token x, key holding x written by the layer-0 heads, each
        weighted by its signed pattern at offset 1). A negative match times a negative OV
        diagonal copies. (member, head)."""
        cfg = model.cfg
        ov = circuits.ov(model, layer)  # (M, H, V, V)
        diag_excess = ov.diagonal(dim1=-2, dim2=-1).mean(-1) - ov.mean((-1, -2))
        z = _safe_ratio(diag_excess, ov.flatten(-2).std(-1))
        written = model.W_E[:, None] @ circuits.head_ov_matrices(model, 0)  # (M, H0, V, D)
        key_input = (previous_weight[..., None, None] * written).sum(1)  # (M, V, D)
        q = model.W_E[:, None, None] @ model.W_Q[:, layer]  # (M, P, H, V, dh)
        k = key_input[:, None, None] @ model.W_K[:, layer]
        match = circuits.combine_pairs((q * k).sum(-1) / cfg.d_head, cfg.attention).mean(-1)  # (M, H)
        return match.sign() * z

    @staticmethod
    def _skip_push(model: TensorTransformer, rules: Tensor, offsets: list[int]) -> tuple[Tensor, Tensor]:
        """Per rule: z-score of the trigram push on C from anchor A against all other keys, and
        the rank of C among outputs pushed from (B, A) (0 = top), each (member, rule). Summed
        over heads and layers, averaged over the offsets."""
        V = model.cfg.d_vocab
        R = rules.shape[0]
        anchor, trigger, out = rules[:, 0], rules[:, 1], rules[:, 2]
        every = torch.arange(V, device=rules.device)
        by_key = by_out = 0
        for layer in range(model.cfg.n_layers):
            by_key = by_key + circuits.trigram_entries(  # query B, key: every token, out C
                model, layer, trigger.repeat_interleave(V), every.repeat(R), out.repeat_interleave(V), offsets
            ).sum(1).mean(-1).view(-1, R, V)
            by_out = by_out + circuits.trigram_entries(  # query B, key A, out: every token
                model,
                layer,
                trigger.repeat_interleave(V),
                anchor.repeat_interleave(V),
                every.repeat(R),
                offsets,
            ).sum(1).mean(-1).view(-1, R, V)
        own = by_key.gather(2, anchor[None, :, None].expand(by_key.shape[0], -1, -1))[..., 0]  # (M, R)
        z = _safe_ratio(own - by_key.mean(-1), by_key.std(-1))
        pushed = by_out.gather(2, out[None, :, None].expand(by_out.shape[0], -1, -1))  # (M, R, 1)
        rank = (by_out > pushed).sum(-1).float()  # (M, R)
        return z, rank


class PairComposition:
    """Rows of the timeline group ``composition``: Q- and K-composition per Q/K pair between
    every two layers (devinterp.metrics.circuits.pair_composition), beside the pair-averaged scores the
    diagnostics keep under their old names: ``comp/k<r>/L<l1>H<a>->L<l2>H<b>``,
    ``comp/q<r>/...``, the signed alignment ``comp/k<r>_signed/...`` and its product over the
    pairs ``comp/k_joint_signed/...``."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg
        L, H, P = cfg.n_layers, cfg.n_heads, cfg.n_pairs
        kinds = [f"k{r + 1}" for r in range(P)] + [f"q{r + 1}" for r in range(P)]
        kinds += [f"k{r + 1}_signed" for r in range(P)] + ["k_joint_signed"]
        self.infos = [
            MetricInfo(f"comp/{kind}/L{l1}H{a}->L{l2}H{b}", "diagnostic", "comp", f"L{l1}H{a}->L{l2}H{b}")
            for kind in kinds
            for l1 in range(L)
            for l2 in range(l1 + 1, L)
            for a in range(H)
            for b in range(H)
        ]

    def to(self, device: torch.device) -> "PairComposition":
        return self  # nothing kept on a device

    def compute(self, model: TensorTransformer) -> Tensor:
        """(n_metrics, member), in the order of ``infos``."""
        L, P = self.cfg.n_layers, self.cfg.n_pairs
        scores = {
            (l1, l2): circuits.pair_composition(model, l1, l2) for l1 in range(L) for l2 in range(l1 + 1, L)
        }
        rows = []
        for key, pair in (
            [("k", r) for r in range(P)] + [("q", r) for r in range(P)] + [("k_signed", r) for r in range(P)]
        ):
            rows += [s[key][:, pair].flatten(1) for s in scores.values()]  # (M, H1 * H2) per layer pair
        rows += [s["k_joint_signed"].flatten(1) for s in scores.values()]
        return torch.cat(rows, 1).T.float()
