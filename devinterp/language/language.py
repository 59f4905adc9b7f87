"""A compiled language: exact sampling and exact next-token distributions.

Conventions (docs/architecture.md):
- ``sample(n, seq_len, seed)`` -> tokens, labels, logp (and rules), each (n, T); entry t
  describes token t given tokens < t. Position 0 comes from the start distribution (label
  ``start``, rule -1).
- ``true_next_dist(tokens)`` (n, T, V): entry t is the distribution of token t + 1 given
  tokens <= t.
- Mixing: primitives are tried in priority order; the first whose condition holds labels the
  position; one with p < 1 puts p on its own distribution and 1 - p on what the rules below it
  give. The fallback (category transitions) always holds, so the weights sum to one.
- Sampling never forms the (n, V) mixture: each position's uniform picks the emitting rule by
  the mixture weights, then, rescaled to [0, 1), a token by inverse CDF of that rule's
  distribution; log p is the mixture's probability of the drawn token. ``true_next_dist`` forms
  the mixture, and the tests check the sampler's frequencies and log p against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

if TYPE_CHECKING:  # torch is loaded only for the device sampler (the CLI's light commands skip it)
    import torch

from devinterp.language.arrays import Array, TorchArrays, arrays_of
from devinterp.language.oracles import ContextOracles, estimate_oracles
from devinterp.language.primitive import Primitive, RowTable
from devinterp.language.primitives import PRIMITIVES
from devinterp.language.primitives.category import CategoryTransition
from devinterp.language.spec import (
    SpecError,
    Vocab,
    check_keys,
    distribution,
    parse_vocab,
    read_yaml,
)

START = "start"


def device_seed(seed: int | list[int]) -> int:
    """The seed of torch's generator for a stream seed (an int or a list such as [stream, block]):
    numpy's SeedSequence hashes it to 63 bits, so nearby seeds give unrelated streams."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0] >> np.uint64(1))


def device_uniforms(n: int, seq_len: int, seeds: list, device: torch.device) -> torch.Tensor:
    """(len(seeds) * n, seq_len) float64 uniforms on ``device``: stream k's from torch's generator
    there, seeded with ``device_seed(seeds[k])``."""
    import torch

    generators = [torch.Generator(device).manual_seed(device_seed(seed)) for seed in seeds]
    return torch.cat(
        [torch.rand((n, seq_len), generator=g, dtype=torch.float64, device=device) for g in generators]
    )


def plogp(dist: np.ndarray) -> np.ndarray:
    """sum_v p(v) log p(v) over the last axis (0 log 0 = 0): minus the entropy, in nats."""
    return (dist * np.log(np.where(dist > 0, dist, 1.0))).sum(-1)


class Sample(NamedTuple):
    tokens: np.ndarray  # (n, T) int64
    labels: np.ndarray  # (n, T) int64: index into Language.label_names
    logp: np.ndarray  # (n, T) float64: exact log p(token t | tokens < t)
    rules: np.ndarray  # (n, T) int64: index into Language.rule_names, -1 at position 0


@dataclass
class Language:
    """A language: vocabulary, start distribution and primitives in priority order."""

    name: str
    vocab: Vocab
    start_dist: np.ndarray  # (V,)
    primitives: list[Primitive]
    source: str = ""  # where the spec came from, for messages

    def __post_init__(self):
        self.label_names = [START] + [p.name for p in self.primitives]
        self.rule_names = [f"{p.name}/{r}" for p in self.primitives for r in p.rule_names]
        self.rule_offsets = np.cumsum([0] + [len(p.rule_names) for p in self.primitives])
        self.rule_label = np.repeat(np.arange(1, len(self.primitives) + 1), np.diff(self.rule_offsets))
        self.seq_len: int | None = None
        self.start_rows = RowTable(self.start_dist)  # one row: position 0's distribution
        # the primitives that need to know where they labelled a position (Primitive.took_positions)
        self._told = [
            i for i, p in enumerate(self.primitives) if type(p).took_positions is not Primitive.took_positions
        ]
        self._on_device: dict[torch.device, Language] = {}  # this language for the device sampler

    @property
    def d_vocab(self) -> int:
        return self.vocab.size

    def check_sequence_length(self, seq_len: int) -> None:
        """Refuse a sequence length the primitives cannot work at (e.g. max_skip >= seq_len)."""
        if seq_len < 2:
            raise SpecError(f"{self.source}: sequence length must be at least 2, got {seq_len}")
        for i, primitive in enumerate(self.primitives):
            primitive.check_sequence_length(seq_len, f"{self.source}: primitives[{i}]")
        self.seq_len = seq_len

    # ---- the mixture at one position -------------------------------------------------------

    def _mixture_at(self, states: list, tokens: Array, t: int):
        """Every primitive's firing at position t, suppression applied, with the mixture weight
        each gets (P, n), the position's label and its rule."""
        n, xp = tokens.shape[0], arrays_of(tokens)
        label = xp.zeros(n, xp.int64)
        rule = xp.full(n, -1)
        remaining = xp.full(n, 1.0, xp.float64)  # probability mass not yet claimed by higher-priority rules
        firings = [primitive.fire(state, tokens, t) for primitive, state in zip(self.primitives, states)]
        for primitive, firing in zip(self.primitives, firings):  # suppression: off where the suppressor fires
            for name in primitive.suppresses:
                if name in self.label_names:  # a knocked-out primitive needs no switching off
                    suppressed = firings[self.label_names.index(name) - 1]
                    suppressed.fires = suppressed.fires & ~firing.fires
        weights = xp.zeros((len(firings), n))
        for i, (primitive, firing) in enumerate(zip(self.primitives, firings)):
            weights[i] = remaining * (xp.as_float(firing.fires) * primitive.p)
            first = firing.fires & (label == 0)
            label = xp.where(first, i + 1, label)
            rule = xp.where(first, int(self.rule_offsets[i]) + firing.rule, rule)
            remaining = remaining - weights[i]
        for i in self._told:
            self.primitives[i].took_positions(states[i], label == i + 1)
        return firings, weights, label, rule

    def _next_at(self, states: list, tokens: np.ndarray, t: int):
        """Distribution of token t + 1 given tokens[:, :t + 1], its label and its rule."""
        firings, weights, label, rule = self._mixture_at(states, tokens, t)
        dist = np.zeros((tokens.shape[0], self.vocab.size))
        for firing, weight in zip(firings, weights):
            where = np.flatnonzero(weight)
            dist[where] += weight[where, None] * firing.dense(where, self.vocab.size)
        return dist, label, rule

    def _draw_next(self, states: list, tokens: Array, t: int, uniform: Array):
        """Token t + 1 drawn from its distribution given tokens[:, :t + 1], with its label, rule
        and exact log-probability, without forming the (n, V) mixture: the uniform first picks
        the rule that emits (by the mixture weights), then, rescaled to [0, 1), a token from that
        rule's distribution. On a device every rule draws for every row and the emitter's token
        is kept (no data-dependent shapes, so no host synchronisation); each row's token is the
        same either way."""
        xp = arrays_of(tokens)
        firings, weights, label, rule = self._mixture_at(states, tokens, t)
        claimed = xp.cumsum(weights, axis=0)  # (P, n)
        mass = uniform * claimed[-1]
        emitter = (claimed <= mass).sum(axis=0).clip(max=len(firings) - 1)  # first rule above
        rows = xp.arange(len(uniform))
        below = claimed[emitter, rows] - weights[emitter, rows]
        within = ((mass - below) / weights[emitter, rows].clip(min=1e-300)).clip(
            0.0, math.nextafter(1.0, 0.0)
        )
        token = xp.zeros(len(uniform), xp.int64)
        for i, firing in enumerate(firings):
            if xp.on_device:
                token = xp.where(emitter == i, firing.draw(rows, within), token)
                continue
            where = np.flatnonzero(emitter == i)
            if len(where):
                token[where] = firing.draw(where, within[where])
        prob = xp.zeros(len(uniform))
        for firing, weight in zip(firings, weights):
            prob += weight * firing.prob(token)
        return token, label, rule, xp.log(prob)

    # ---- public API ------------------------------------------------------------------------

    def sample(self, n: int, seq_len: int, seed: int | list[int]) -> Sample:
        """n sequences of seq_len tokens, vectorised over sequences, reproducible from seed."""
        return self.sample_streams(n, seq_len, [seed])[0]

    def sample_streams(
        self, n: int, seq_len: int, seeds: list, device: torch.device | str | None = None
    ) -> list[Sample]:
        """``sample(n, seq_len, seed)`` for each seed, walked through the positions together.

        Each stream's uniforms come from its own generator and every operation is row-wise, so
        stream k equals ``sample(n, seq_len, seeds[k])`` exactly; one walk over (len(seeds) * n)
        rows costs far less than len(seeds) walks (the per-position cost is mostly fixed).

        With ``device``, the walk runs in torch on that device (the device sampler) with
        uniforms from torch's generator there, seeded by ``device_seed(seed)``, and returns
        tensors on it. That is another stream than numpy's, of the same distribution; it is a
        pure function of the seed for one kind of device (CUDA's generator may also differ
        between GPU models).
        """
        if device is None:
            uniforms = np.concatenate([np.random.default_rng(seed).random((n, seq_len)) for seed in seeds])
        else:
            import torch

            uniforms = device_uniforms(n, seq_len, seeds, torch.device(device))
        return self.sample_from_uniforms(uniforms, n)

    def sample_from_uniforms(self, uniforms: Array, n: int) -> list[Sample]:
        """Streams of n sequences each from uniforms (streams * n, T) in [0, 1): numpy arrays,
        or tensors on a device (the walk then runs there, with shapes fixed by the uniforms', so
        it never waits on the host and can be captured as one CUDA graph)."""
        xp = arrays_of(uniforms)
        if xp.on_device:
            return self.on(xp)._sample_walk(uniforms, n, xp)
        return self._sample_walk(uniforms, n, xp)

    def _sample_walk(self, uniforms: Array, n: int, xp) -> list[Sample]:
        rows_total, seq_len = uniforms.shape
        tokens = xp.zeros((rows_total, seq_len), xp.int64)
        labels = xp.zeros((rows_total, seq_len), xp.int64)
        rules = xp.full((rows_total, seq_len), -1)
        logp = xp.zeros((rows_total, seq_len))
        tokens[:, 0] = self.start_rows.draw(xp.zeros(rows_total, xp.int64), uniforms[:, 0])
        logp[:, 0] = xp.log(self.start_rows.probs[0, tokens[:, 0]])
        states = [p.begin(rows_total, xp) for p in self.primitives]
        for t in range(1, seq_len):
            tokens[:, t], labels[:, t], rules[:, t], logp[:, t] = self._draw_next(
                states, tokens, t - 1, uniforms[:, t]
            )
        return [
            Sample(*(array[k * n : (k + 1) * n] for array in (tokens, labels, logp, rules)))
            for k in range(rows_total // n)
        ]

    def on(self, xp: TorchArrays) -> "Language":
        """This language with every primitive's tables on xp's device (made once per device)."""
        moved = self._on_device.get(xp.device)
        if moved is None:
            moved = Language(self.name, self.vocab, self.start_dist, [p.on(xp) for p in self.primitives])
            moved.source, moved.seq_len = self.source, self.seq_len
            moved.start_rows = self.start_rows.on(xp)
            self._on_device[xp.device] = moved
        return moved

    def stream_block(
        self, n: int, seq_len: int, stream_seeds: list, block_index: int, device: torch.device | None = None
    ) -> list[Sample]:
        """Block ``block_index`` of each training stream: n sequences sampled from
        ``[stream seed, block_index]`` (a pure function of both, so any step can be resumed);
        with ``device``, by the device sampler there."""
        return self.sample_streams(n, seq_len, [[seed, block_index] for seed in stream_seeds], device)

    def _walk(self, tokens: np.ndarray):
        """For given tokens (n, T), yield (t, distribution of token t + 1, its label, its rule)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        states = [p.begin(tokens.shape[0]) for p in self.primitives]
        for t in range(tokens.shape[1]):
            yield (t, *self._next_at(states, tokens, t))

    def true_next_dist(self, tokens: np.ndarray) -> np.ndarray:
        """(n, T) tokens -> (n, T, V): entry t is p(token t + 1 | tokens <= t)."""
        n, T = np.shape(tokens)
        out = np.zeros((n, T, self.vocab.size))
        for t, dist, _, _ in self._walk(tokens):
            out[:, t] = dist
        return out

    def label(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, T) tokens -> labels and rules (n, T) as ``sample`` gives them (entry t: token t)."""
        n, T = np.shape(tokens)
        labels = np.zeros((n, T), dtype=np.int64)
        rules = np.full((n, T), -1, dtype=np.int64)
        for t, _, label, rule in self._walk(np.asarray(tokens)[:, :-1]):
            labels[:, t + 1], rules[:, t + 1] = label, rule
        return labels, rules

    def next_label(self, tokens: np.ndarray) -> np.ndarray:
        """(n, k) contexts -> (n,) label of the token that would follow each."""
        labels = np.zeros(len(tokens), dtype=np.int64)
        for t, _, label, _ in self._walk(tokens):
            labels = label
        return labels

    def context_oracles(self, seq_len: int) -> ContextOracles:
        """The order-0, -1 and -2 oracles of this language at ``seq_len`` (devinterp/language/
        oracles.py), estimated once per length and kept."""
        cache = self.__dict__.setdefault("_oracles", {})
        if seq_len not in cache:
            cache[seq_len] = estimate_oracles(self, seq_len)
        return cache[seq_len]

    def knock_out(self, names: list[str]) -> "Language":
        """The language without these primitives: their positions fall back to the next rule
        down in priority. The category fallback cannot be knocked out."""
        return self._keep([p for p in self.primitives if p.name not in names], names, "knock out")

    def only(self, names: list[str]) -> "Language":
        """The language with just these primitives and the category fallback (a curriculum's
        first phase: train on X alone)."""
        return self._keep(
            [p for p in self.primitives if p.name in names or p.kind == "category"], names, "keep"
        )

    def _keep(self, kept: list[Primitive], names: list[str], verb: str) -> "Language":
        known = {p.name for p in self.primitives}
        for name in names:
            if name not in known:
                raise SpecError(
                    f"{self.source}: cannot {verb} {name!r}: no such primitive "
                    f"(primitives: {', '.join(p.name for p in self.primitives)})"
                )
            if verb == "knock out" and name == self.primitives[-1].name:
                raise SpecError(
                    f"{self.source}: cannot knock out {name!r}: it is the fallback every position needs"
                )
        language = Language(self.name, self.vocab, self.start_dist, kept, self.source)
        language.seq_len = self.seq_len
        return language

    def decode(self, tokens: np.ndarray) -> list[str]:
        return [self.vocab.tokens[i] for i in np.asarray(tokens).tolist()]

    def ground_truth(self) -> dict[str, np.ndarray]:
        """Every primitive's defining arrays, keyed ``<primitive>/<array>``."""
        out = {"start_dist": self.start_dist}
        for p in self.primitives:
            out.update({f"{p.name}/{k}": v for k, v in p.ground_truth().items()})
        return out


def parse_language(data: dict, source: str = "<spec>") -> Language:
    """Validate a spec mapping and compile it; every problem raises SpecError naming the field."""
    check_keys(data, {"name", "categories", "start", "primitives"}, source)
    for key in ("categories", "start", "primitives"):
        if key not in data:
            raise SpecError(f"{source}: missing required field {key!r}")
    vocab = parse_vocab(data["categories"], f"{source}: categories")
    start_categories = distribution(
        data["start"], f"{source}: start", vocab.category_id, len(vocab.categories)
    )
    specs = data["primitives"]
    if not isinstance(specs, list) or not specs:
        raise SpecError(f"{source}: primitives: expected a non-empty list, highest priority first")
    primitives: list[Primitive] = []
    for i, spec in enumerate(specs):
        field = f"{source}: primitives[{i}]"
        if not isinstance(spec, dict):
            raise SpecError(f"{field}: expected a mapping with a 'type'")
        kind = spec.get("type")
        if kind not in PRIMITIVES:
            raise SpecError(
                f"{field}.type: unknown primitive {kind!r} (known: {', '.join(sorted(PRIMITIVES))})"
            )
        primitive = PRIMITIVES[kind].from_spec(spec, vocab, field)
        if primitive.name in [p.name for p in primitives] or primitive.name == START:
            raise SpecError(f"{field}.name: duplicate primitive name {primitive.name!r}")
        primitives.append(primitive)
    for i, primitive in enumerate(primitives):
        primitive.check_place(primitives[:i], primitives[i + 1 :], f"{source}: primitives[{i}]")
    names = [p.name for p in primitives]
    for i, primitive in enumerate(primitives):
        for target in primitive.suppresses:
            if target not in names or target == primitive.name or target == names[-1]:
                raise SpecError(
                    f"{source}: primitives[{i}].suppresses: {target!r} is not another primitive "
                    f"that can be switched off ({', '.join(n for n in names[:-1] if n != primitive.name)})"
                )
    fallbacks = [i for i, p in enumerate(primitives) if isinstance(p, CategoryTransition)]
    if fallbacks != [len(primitives) - 1]:
        raise SpecError(
            f"{source}: primitives: exactly one 'category' primitive is needed, listed last "
            "(it is the fallback whose condition always holds)"
        )
    name = data.get("name", Path(source).stem)
    return Language(
        name=str(name),
        vocab=vocab,
        start_dist=vocab.category_mixture(start_categories),
        primitives=primitives,
        source=source,
    )


def load_language(path: str | Path) -> Language:
    """Load and validate a YAML language spec (safe YAML); raises SpecError naming the field."""
    return parse_language(read_yaml(path), source=str(path))
