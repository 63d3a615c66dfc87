"""Exact incremental recomputation of single-base mutants (fastISM-style).

A single-base mutation changes, in a convolutional stack, only the columns of
each activation inside the receptive field of the mutated position.
:func:`build_incremental_runner` traces a member with torch.fx, classifies
every operation (:mod:`deepmr_dist.ism.incremental_graph`), and returns a
runner that, for a batch of mutants, computes each position-local activation
only on a window of changed columns (all mutants' windows stacked into one
tensor, one kernel call per layer), and everything after the first non-local
operation on full activations rebuilt from the cached reference. Mean over
length and ``Flatten -> Linear`` are computed as reference + change.

Operations computed on windows (see :mod:`deepmr_dist.ism.incremental_rules`):

- ``Conv1d`` / ``F.conv1d`` with zero padding (any amount, ``"same"``,
  ``"valid"``), any dilation and groups, stride 1; on the input itself as
  reference + weights x one-hot change;
- eval-mode ``BatchNorm1d`` (folded into the convolution before it when it
  is that convolution's only user), elementwise activations (modules and
  functions), eval-mode dropout, softmax over channels;
- arithmetic between windowed values, scalars and constants (a constant
  with a length axis is read per window; each
  :class:`~deepmr_dist.models.ensemble.FrozenDropout` becomes a product with
  its mask, so MC-dropout members stay incremental);
- concatenation along channels, channel selection and cropping along the
  length (indexing, ``narrow``).

Mean or sum over the length (``AdaptiveAvgPool1d(1)`` included) and
``Flatten`` / ``view`` / ``reshape`` followed by ``Linear`` are computed as
reference + change. A window as wide as the columns later layers read turns
into a full computation of just those columns (e.g. only the columns kept by
a crop). Everything else (strided convolutions, pooling, dense layers over
length, recurrence, attention) runs as in the model on full activations.

Exactness: columns outside a window equal the reference by construction
(their receptive field holds no mutated position); window columns beyond the
sequence ends carry values nobody reads except as the zero padding of the
layer, which they are set to. In-place operations run out of place so cached
references stay intact. Every runner is also checked against full forward
passes at build time, on mutants at both sequence ends and at an ``N``
column; a model that fails the check (or cannot be traced or analysed) gets
``None`` and the engine falls back to full recomputation. Results match full
recomputation up to float rounding (about 1e-6 relative in float32).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from deepmr_dist.ism import incremental_rules as R
from deepmr_dist.ism import window as W
from deepmr_dist.ism.mutants import N_BASES, apply_mutations, mutation_list
from deepmr_dist.ism.incremental_graph import Kind, Plan, Step, analyse, trace

logger = logging.getLogger(__name__)

MIN_SAVING = 0.2
"""Incremental runners are built only when they save at least this fraction of the multiply-adds."""

VERIFY_TOLERANCE = 1e-4
"""Build-time check: largest allowed difference to full recomputation, relative to the output scale."""

VERIFY_TOLERANCE_TF32 = 3e-3
"""The same on CUDA when float32 convolutions may run in TF32 (PyTorch's default for cuDNN)."""


@dataclass
class ReferenceCache:
    """What :meth:`IncrementalRunner.mutants` needs from the reference pass."""

    refs: dict[fx.Node, W.PaddedRef]
    outputs: dict[fx.Node, torch.Tensor]


class _Env:
    """The values of one pass (references or one batch of mutants); implements :class:`Inputs`."""

    def __init__(
        self,
        plan: Plan,
        consts: dict[fx.Node, W.PaddedRef],
        batch: W.Batch | None = None,
        cache: ReferenceCache | None = None,
    ) -> None:
        self.plan = plan
        self.const_refs = consts
        self.finite = plan.finite
        self.batch = batch  # type: ignore[assignment]
        self.cache = cache
        self.values: dict[fx.Node, Any] = {}
        self._full: dict[fx.Node, torch.Tensor] = {}
        self._spans: dict[fx.Node, list[tuple[R.Extent, bool, torch.Tensor]]] = {}

    # ------------------------------------------------------------------ Inputs protocol

    def window(self, node: fx.Node, extent: R.Extent, zero_pad: bool = False) -> torch.Tensor:
        step = self.plan.step(node)
        own_left, own_width = step.extent
        mask = zero_pad and (own_left < 0 or self.plan.length - 1 + own_left + own_width > step.length)
        data = self.values[node]
        if (own_left, own_width) == extent and not mask:
            return data
        for (left, width), masked, wide in self._spans.get(node, ()):
            if left <= extent[0] and extent[0] + extent[1] <= left + width and (masked or not mask):
                return wide[:, :, extent[0] - left : extent[0] - left + extent[1]]
        extra_left = own_left - extent[0]
        extra_right = extent[0] + extent[1] - own_left - own_width
        wide = W.span(
            self.reference(node),
            data,
            self.batch,
            own_left,
            extra_left,
            extra_right,
            step.length if mask else None,
            self.finite,
        )
        self._spans.setdefault(node, []).append((extent, mask, wide))
        return wide

    def columns(self, node: fx.Node, lo: int, hi: int) -> torch.Tensor:
        if self.plan.step(node).kind is Kind.CONST:
            data, data_lo, length = _as_3d(self.plan.consts[node]), 0, self.plan.consts[node].shape[-1]
        else:
            data, data_lo = self._tracked_full(node)
            length = self.plan.step(node).length
        inner_lo, inner_hi = max(lo, 0), min(hi, length)
        data = data[:, :, inner_lo - data_lo : inner_hi - data_lo]
        return W.pad_columns(data, inner_lo - lo, hi - inner_hi)

    def const_window(self, node: fx.Node, extent: R.Extent) -> torch.Tensor:
        return self.const_refs[node].gather(self.batch, *extent)

    def value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        return self.plan.consts[node]

    def length(self, node: fx.Node) -> int:
        return self.plan.step(node).length

    def reference(self, node: fx.Node) -> W.PaddedRef:
        assert self.cache is not None
        return self.cache.refs[node]

    def reference_output(self, node: fx.Node) -> torch.Tensor:
        assert self.cache is not None
        return self.cache.outputs[node]

    # ------------------------------------------------------------------ full activations

    def _tracked_full(self, node: fx.Node) -> tuple[torch.Tensor, int]:
        """A tracked node over the columns its users read, with the first column's index."""
        step = self.plan.step(node)
        if self.batch is None:
            return self.values[node], 0
        if step.kind is Kind.RANGE:
            return self.values[node], step.lo
        if node not in self._full:
            self._full[node] = W.materialize(
                self.reference(node), self.values[node], self.batch, step.extent[0], step.lo, step.hi
            )
        return self._full[node], step.lo

    def full(self, node: fx.Node) -> Any:
        """A node's value as the model would see it (full activations, possibly channels-last)."""
        step = self.plan.steps.get(node)
        if step is not None and step.tracked:
            return self.columns(node, 0, step.length)
        return self.value(node)

    def virtual(self, node: fx.Node) -> Any:
        """For shape arithmetic: tracked nodes as meta tensors of the full activation's shape."""
        step = self.plan.steps.get(node)
        if self.batch is None or step is None or not step.tracked:
            return self.value(node)
        example = self.plan.shapes[node]
        return example.new_empty((self.batch.size, *example.shape[1:]))


def _as_3d(t: torch.Tensor) -> torch.Tensor:
    """Right-align a broadcastable constant to 3 dimensions, as broadcasting would."""
    return t.reshape((1,) * (3 - t.ndim) + tuple(t.shape))


class IncrementalRunner:
    """A :class:`~deepmr_dist.ism.engine.MemberRunner` recomputing only what each mutation changes.

    Build with :func:`build_incremental_runner`.
    """

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.const_refs = {
            node: W.PaddedRef(_as_3d(plan.consts[node]), *pad)
            for node, pad in plan.pads.items()
            if plan.step(node).kind is Kind.CONST
        }

    def _steps(self) -> Iterator[tuple[fx.Node, Step]]:
        return iter(self.plan.steps.items())

    def reference(self, x: torch.Tensor) -> tuple[Any, ReferenceCache]:
        """Run the member on the references ``x``, caching what mutants need."""
        env = _Env(self.plan, self.const_refs)
        for node, step in self._steps():
            if node is self.plan.x:
                env.values[node] = W.channels_last(x)
            elif step.kind is Kind.CONST:
                continue
            elif step.tracked:
                assert step.rule is not None
                env.values[node] = step.rule.run_range(env, 0, step.length)
            elif step.kind is Kind.META:
                env.values[node] = _call(step, env.virtual)
            else:
                env.values[node] = _call(step, env.full)
        refs = {
            node: W.PaddedRef(env.values[node], *pad)
            for node, pad in self.plan.pads.items()
            if self.plan.step(node).tracked
        }
        outputs = {node: env.values[node] for node, step in self._steps() if step.kind is Kind.DELTA}
        return self._output(env), ReferenceCache(refs, outputs)

    def mutants(
        self,
        x: torch.Tensor,
        cache: ReferenceCache,
        locus: torch.Tensor,
        position: torch.Tensor,
        base: torch.Tensor,
    ) -> Any:
        """Predict mutants: reference ``x[locus[k]]`` with ``base[k]`` written at ``position[k]``."""
        batch = W.Batch(x, locus, position, base)
        env = _Env(self.plan, self.const_refs, batch, cache)
        for node, step in self._steps():
            if node is self.plan.x:
                env.values[node] = _one_hot(batch, x.shape[1], x.dtype)
            elif step.kind in (Kind.CONST, Kind.FUSED):
                continue
            elif step.kind is Kind.LOCAL:
                assert step.rule is not None
                env.values[node] = step.rule.run_local(env, step.extent)
            elif step.kind is Kind.RANGE:
                assert step.rule is not None
                env.values[node] = step.rule.run_range(env, step.lo, step.hi)
            elif step.kind is Kind.DELTA:
                assert step.delta is not None
                source = self.plan.step(step.delta.source)
                env.values[node] = step.delta.run(env, source.extent, source.length)
            elif step.kind is Kind.META:
                env.values[node] = _call(step, env.virtual)
            else:
                env.values[node] = _call(step, env.full)
        return self._output(env)

    def _output(self, env: _Env) -> Any:
        return map_arg(self.plan.outputs, lambda n: _contiguous(env.full(n)))


def _call(step: Step, resolve: Any) -> Any:
    """Run a node's operation with its arguments resolved by ``resolve``."""
    assert step.call is not None
    args = map_arg(step.node.args, resolve)
    kwargs = map_arg(step.node.kwargs, resolve)
    return step.call(*args, **kwargs)


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def _one_hot(batch: W.Batch, alphabet: int, dtype: torch.dtype) -> torch.Tensor:
    """The mutated column of every mutant, ``(n, alphabet, 1)``."""
    rows = torch.zeros((batch.size, 1, alphabet), dtype=dtype, device=batch.x.device)
    rows[batch.arange(batch.size), 0, batch.base] = 1
    return rows.transpose(1, 2)


# --------------------------------------------------------------------------- building


def build_incremental_runner(
    member: nn.Module, length: int, *, outputs: Sequence[int] | None = None
) -> IncrementalRunner | None:
    """An exact incremental runner for ``member`` on sequences of ``length``, or ``None``.

    Parameters
    ----------
    member
        An eval-mode module mapping one-hot ``(batch, 4, length)`` to a tensor
        or a tuple of tensors. It must stay on its device, unmodified, while
        the runner is used (weights are copied into channels-last form here).
    length
        Sequence length L.
    outputs
        For a member returning a tuple: the elements that will be read (e.g.
        ``(1,)`` for BPNet's counts); the runner returns ``None`` in the other
        places and skips every layer only they need. ``None`` computes all.

    Returns
    -------
    IncrementalRunner or None
        ``None`` when the member cannot be traced, its first operation is not
        position-local, recomputing windows would save little, or the runner
        fails its build-time check against full forward passes.
    """
    gm = trace(member)
    if gm is None:
        logger.info("incremental ISM: %s cannot be traced", type(member).__name__)
        return None
    example = _example(member, length)
    try:
        with torch.inference_mode():
            plan = analyse(gm, length, example, outputs)
    except Exception as err:  # noqa: BLE001 - a model we cannot analyse falls back to full recompute
        logger.info("incremental ISM: analysis of %s failed: %s", type(member).__name__, err)
        return None
    saving = saving_fraction(plan)
    if saving < MIN_SAVING:
        logger.info("incremental ISM: %s would save only %.0f%%", type(member).__name__, 100 * saving)
        return None
    runner = IncrementalRunner(plan)
    problem = verify(runner, member, example, outputs)
    if problem is not None:
        logger.warning("incremental ISM disabled for %s: %s", type(member).__name__, problem)
        return None
    return runner


def _example(member: nn.Module, length: int) -> torch.Tensor:
    """Two random one-hot sequences on the member's device and dtype, the second with an ``N``."""
    tensor = next(iter(member.parameters()), None)
    if tensor is None:
        tensor = next(iter(member.buffers()), torch.empty(0))
    dtype = tensor.dtype if tensor.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, N_BASES, (2, length), generator=generator)
    x = torch.nn.functional.one_hot(codes, N_BASES).transpose(1, 2).to(dtype)
    x[1, :, length // 3] = 0
    return x.to(tensor.device)


def saving_fraction(plan: Plan) -> float:
    """The fraction of convolution / dense multiply-adds per mutant the plan avoids."""
    full = incremental = 0
    for step in plan.steps.values():
        if isinstance(step.rule, R.ConvRule):
            per_column = step.rule.weight.numel()
            full += per_column * step.length
            if step.kind is Kind.LOCAL:
                incremental += per_column * (1 if step.rule.first_layer else step.extent[1])
            else:
                incremental += per_column * (step.hi - step.lo)
        elif step.kind is Kind.DELTA and isinstance(step.delta, R.LinearRule):
            source = plan.step(step.delta.source)
            per_column = step.delta.weight[0].numel()
            full += per_column * source.length
            incremental += per_column * source.extent[1]
    return 1 - incremental / full if full else 0.0


def verify(
    runner: IncrementalRunner, member: nn.Module, x: torch.Tensor, outputs: Sequence[int] | None = None
) -> str | None:
    """Compare ``runner`` with full forward passes on mutants at the ends, the middle and an ``N``.

    ``outputs`` are the selected output elements (as in :func:`build_incremental_runner`).
    Returns a description of the first mismatch, or ``None`` if all agree.
    """
    length = x.shape[2]
    locus, position, base = mutation_list(x)
    keep = torch.isin(position, torch.tensor([0, 1, length // 3, length // 2, length - 2, length - 1], device=x.device))
    locus, position, base = locus[keep], position[keep], base[keep]
    try:
        with torch.inference_mode():
            ref, cache = runner.reference(x)
            got = runner.mutants(x, cache, locus, position, base)
            want_ref = _select(member(x), outputs)
            want = _select(member(apply_mutations(x, locus, position, base)), outputs)
    except Exception as err:  # noqa: BLE001 - any failure disables the runner
        return f"{type(err).__name__}: {err}"
    tf32 = x.is_cuda and x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    tolerance = VERIFY_TOLERANCE_TF32 if tf32 else VERIFY_TOLERANCE
    for name, a, b in (("reference", ref, want_ref), ("mutants", got, want)):
        problem = _compare(a, b, tolerance)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def _select(value: Any, outputs: Sequence[int] | None) -> Any:
    if outputs is None:
        return value
    wanted = {i % len(value) for i in outputs}
    return type(value)(v if i in wanted else None for i, v in enumerate(value))


def _compare(got: Any, want: Any, tolerance: float) -> str | None:
    got_leaves, want_leaves = _leaves(got), _leaves(want)
    if len(got_leaves) != len(want_leaves):
        return f"{len(got_leaves)} outputs instead of {len(want_leaves)}"
    for a, b in zip(got_leaves, want_leaves, strict=True):
        if a.shape != b.shape:
            return f"shape {tuple(a.shape)} instead of {tuple(b.shape)}"
        scale = b.abs().max().item() if b.numel() else 0.0
        error = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        if not error <= tolerance * max(scale, 1.0):
            return f"differs by {error:.3g} (output scale {scale:.3g})"
    return None


def _leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return []
