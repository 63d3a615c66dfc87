"""Run: the incremental runner, computing each LOCAL node on windows of changed columns.

:class:`IncrementalRunner` executes a :class:`~.plan.Plan`: for the
references it runs every node in full and caches the padded activations
mutants read; for a batch of mutants it runs LOCAL nodes on windows (all
mutants' windows stacked into one tensor, one kernel call per layer), RANGE
nodes on the columns later nodes read, DELTA nodes as reference + change, and
everything else on full activations rebuilt from the cached reference.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.fx.node import map_arg

from deepmr_dist.ism.incremental.plan import Kind, Plan, Step
from deepmr_dist.ism.incremental.rules.base import Extent
from deepmr_dist.ism.incremental.window import (
    Batch,
    GatherBuffers,
    PaddedRef,
    channels_last,
    materialize,
    pad_columns,
    span,
)


@dataclass
class ReferenceCache:
    """What :meth:`IncrementalRunner.mutants` needs from the reference pass."""

    refs: dict[fx.Node, PaddedRef]
    outputs: dict[fx.Node, torch.Tensor]
    buffers: GatherBuffers | None = None
    """Where the batches of mutants on these references gather into (``None``: fresh tensors)."""


class _Env:
    """The values of one pass (references or one batch of mutants); implements :class:`~.rules.base.Inputs`."""

    def __init__(
        self,
        plan: Plan,
        consts: dict[fx.Node, PaddedRef],
        batch: Batch | None = None,
        cache: ReferenceCache | None = None,
    ) -> None:
        self.plan = plan
        self.const_refs = consts
        self.finite = plan.finite
        self.batch = batch  # type: ignore[assignment]
        self.cache = cache
        self.values: dict[fx.Node, Any] = {}
        self._full: dict[fx.Node, torch.Tensor] = {}
        self._spans: dict[fx.Node, list[tuple[Extent, bool, torch.Tensor]]] = {}

    # ------------------------------------------------------------------ Inputs protocol

    def window(self, node: fx.Node, extent: Extent, zero_pad: bool = False) -> torch.Tensor:
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
        wide = span(
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
        return pad_columns(data, inner_lo - lo, hi - inner_hi)

    def const_window(self, node: fx.Node, extent: Extent) -> torch.Tensor:
        return self.const_refs[node].gather(self.batch, *extent)

    def value(self, node: fx.Node) -> Any:
        if node in self.values:
            return self.values[node]
        return self.plan.consts[node]

    def length(self, node: fx.Node) -> int:
        return self.plan.step(node).length

    def reference(self, node: fx.Node) -> PaddedRef:
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
            self._full[node] = materialize(
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

    Build with :func:`~deepmr_dist.ism.incremental.build.build_incremental_runner`.

    Parameters
    ----------
    plan
        The member's plan.
    reuse_gathers
        On the CPU, gather into buffers kept in the reference cache from one
        batch of mutants to the next (:class:`~.window.GatherBuffers`: the same
        results, without the page faults of fresh tensors of hundreds of MB);
        ``False``, and on other devices (whose caching allocators reuse memory
        already), fresh tensors per batch.
    """

    def __init__(self, plan: Plan, *, reuse_gathers: bool = True) -> None:
        self.plan = plan
        self.reuse_gathers = reuse_gathers
        self.const_refs = {
            node: PaddedRef(_as_3d(plan.consts[node]), *pad)
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
                env.values[node] = channels_last(x)
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
            node: PaddedRef(env.values[node], *pad)
            for node, pad in self.plan.pads.items()
            if self.plan.step(node).tracked
        }
        outputs = {node: env.values[node] for node, step in self._steps() if step.kind is Kind.DELTA}
        buffers = GatherBuffers() if self.reuse_gathers and x.device.type == "cpu" else None
        return self._output(env), ReferenceCache(refs, outputs, buffers)

    def mutants(
        self,
        x: torch.Tensor,
        cache: ReferenceCache,
        locus: torch.Tensor,
        position: torch.Tensor,
        base: torch.Tensor,
    ) -> Any:
        """Predict mutants: reference ``x[locus[k]]`` with ``base[k]`` written at ``position[k]``."""
        batch = Batch(x, locus, position, base, cache.buffers)
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
        return self._output(env, cache.buffers)

    def _output(self, env: _Env, buffers: GatherBuffers | None = None) -> Any:
        """The outputs, copied out of the gather buffers the next batch overwrites."""

        def value(node: fx.Node) -> Any:
            out = _contiguous(env.full(node))
            return out.clone() if buffers is not None and isinstance(out, torch.Tensor) and buffers.holds(out) else out

        return map_arg(self.plan.outputs, value)


def _call(step: Step, resolve: Any) -> Any:
    """Run a node's operation with its arguments resolved by ``resolve``."""
    assert step.call is not None
    args = map_arg(step.node.args, resolve)
    kwargs = map_arg(step.node.kwargs, resolve)
    return step.call(*args, **kwargs)


def _contiguous(value: Any) -> Any:
    return value.contiguous() if isinstance(value, torch.Tensor) else value


def _one_hot(batch: Batch, alphabet: int, dtype: torch.dtype) -> torch.Tensor:
    """The mutated column of every mutant, ``(n, alphabet, 1)``."""
    rows = torch.zeros((batch.size, 1, alphabet), dtype=dtype, device=batch.x.device)
    rows[batch.arange(batch.size), 0, batch.base] = 1
    return rows.transpose(1, 2)
