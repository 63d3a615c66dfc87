"""Plan: how each node of a traced member is computed for single-base mutants.

Every node of the traced graph gets a :class:`Kind`:

- ``CONST``: does not depend on the input; evaluated once, at planning.
- ``META``: Python values computed from shapes (``x.shape[2] - 10``);
  re-evaluated per call from the shapes the full activations would have.
- ``LOCAL``: an activation ``(batch, channels, length)`` computed as a window
  of changed columns per mutant (static :data:`~.rules.base.Extent`), the
  rest being the reference of the mutant's locus.
- ``RANGE``: an activation computed in full for each mutant, but only over
  the columns ``[lo, hi)`` that later nodes read (e.g. before a crop).
- ``DELTA``: an output without a sequence axis computed from a window
  (mean over length, ``Flatten -> Linear``).
- ``FUSED``: a flattening whose only user is a ``Linear`` with a delta rule;
  computed for references only.
- ``PLAIN``: anything else that depends on the input; run as the model runs
  it, on full activations.

A node is LOCAL when a rule of the table (:mod:`.rules.registry`) takes it
and all its sequence-axis inputs are LOCAL, and becomes RANGE once its window
would be as wide as the columns it must provide.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.node import map_arg

from deepmr_dist.ism.incremental.rules.base import DeltaRule, Extent, Rule
from deepmr_dist.ism.incremental.rules.registry import RULES, Rules
from deepmr_dist.ism.incremental.trace import node_call, run_example


class Kind(enum.Enum):
    """How a node is computed for mutants (see the module docstring)."""

    CONST = "const"
    META = "meta"
    LOCAL = "local"
    RANGE = "range"
    DELTA = "delta"
    FUSED = "fused"
    PLAIN = "plain"


@dataclass
class Step:
    """One node of the plan."""

    node: fx.Node
    kind: Kind
    call: Callable[..., Any] | None = None
    rule: Rule | None = None
    delta: DeltaRule | None = None
    length: int = 0
    extent: Extent = (0, 0)
    lo: int = 0
    hi: int = 0

    @property
    def tracked(self) -> bool:
        """Whether the node carries the sequence axis (LOCAL or RANGE)."""
        return self.kind in (Kind.LOCAL, Kind.RANGE)


@dataclass
class Plan:
    """The analysed graph of one member at one sequence length."""

    steps: dict[fx.Node, Step]
    x: fx.Node
    outputs: Any
    length: int
    consts: dict[fx.Node, Any]
    shapes: dict[fx.Node, torch.Tensor]
    """Meta tensors with the shape and dtype of each tracked node for a batch of two."""
    pads: dict[fx.Node, tuple[int, int]] = field(default_factory=dict)
    finite: bool = False
    """Whether window columns outside the sequence always hold finite values (no log, exp, division...)."""

    def step(self, node: fx.Node) -> Step:
        """The step of ``node``."""
        return self.steps[node]


def analyse(
    gm: fx.GraphModule,
    length: int,
    example: torch.Tensor,
    outputs: Sequence[int] | None = None,
    rules: Rules = RULES,
) -> Plan:
    """Plan the incremental computation of ``gm`` on sequences of ``length``.

    Parameters
    ----------
    gm
        The traced member, its leaf modules rewritten (:func:`~.trace.rewrite_leaves`).
    length
        Sequence length L.
    example
        A one-hot batch ``(batch, alphabet, length)`` with batch > 1, on the member's device.
    outputs
        For a member returning a tuple or list: the elements to compute; the
        others are returned as ``None`` and nothing that only they need is run.
        ``None`` computes everything.
    rules
        The table of rules to match nodes with.
    """
    return _Planner(gm, length, example, outputs, rules).plan()


class _Planner:
    """Builds a :class:`Plan` from a traced graph and the values of one example run.

    Implements :class:`~.rules.base.Context` for the matchers.
    """

    def __init__(
        self, gm: fx.GraphModule, length: int, example: torch.Tensor, outputs: Sequence[int] | None, rules: Rules
    ) -> None:
        self.gm = gm
        self.length = length
        self.rules = rules
        self.batch = example.shape[0]
        nodes = list(gm.graph.nodes)
        self.x = next(n for n in nodes if n.op == "placeholder")
        self.output = next(n for n in nodes if n.op == "output")
        self.outputs = _select_outputs(self.output.args[0], outputs)
        self.live = _ancestors(self.outputs)
        self.calls = {n: node_call(gm, n) for n in nodes if n.op.startswith("call_")}
        self.values = run_example(gm, self.calls, example)
        self.steps: dict[fx.Node, Step] = {}
        self.tainted: set[fx.Node] = set()

    # ------------------------------------------------------------------ Context protocol

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(node.target)) if node.op == "call_module" else None

    def call(self, node: fx.Node) -> Callable[..., Any]:
        return self.calls[node]

    def value(self, node: fx.Node) -> Any:
        return self.values[node]

    def const(self, arg: Any) -> Any:
        return self.values[arg] if isinstance(arg, fx.Node) else arg

    def depends_on_input(self, node: fx.Node) -> bool:
        return node in self.tainted

    def tracked(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.steps and self.steps[arg].tracked

    def local(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.steps and self.steps[arg].kind is Kind.LOCAL

    def fused(self, arg: Any) -> bool:
        return isinstance(arg, fx.Node) and arg in self.steps and self.steps[arg].kind is Kind.FUSED

    def shape_only(self, node: fx.Node) -> bool:
        return self.steps[node].kind is Kind.META

    def rule(self, node: fx.Node) -> Rule | None:
        return self.steps[node].rule

    # ------------------------------------------------------------------ classification

    def classify(self) -> None:
        """Assign every node its kind (before saturation)."""
        for node in self.gm.graph.nodes:
            if node not in self.live:
                continue
            if node is self.x or any(n in self.tainted for n in node.all_input_nodes):
                self.tainted.add(node)
            self.steps[node] = self._classify(node)

    def _classify(self, node: fx.Node) -> Step:
        call = self.calls.get(node)
        if node is self.x:
            return Step(node, Kind.LOCAL, length=self.length, extent=(0, 1))
        if node not in self.tainted:
            return Step(node, Kind.CONST, call)
        value = self.values[node]
        if not isinstance(value, torch.Tensor):
            has_tensor = isinstance(value, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in value)
            return Step(node, Kind.PLAIN if has_tensor else Kind.META, call)
        rule = self.rules.window_rule(node, self) if self._is_sequence(value) else None
        if rule is not None and self._only_inputs(node, rule.sources):
            kinds = {self.steps[s].kind for s in rule.sources}
            if kinds == {Kind.LOCAL}:
                extent = rule.extent([self.steps[s].extent for s in rule.sources])
                return Step(node, Kind.LOCAL, call, rule=rule, length=value.shape[2], extent=extent)
            return Step(node, Kind.RANGE, call, rule=rule, length=value.shape[2])
        if self.rules.is_fused(node, self):
            return Step(node, Kind.FUSED, call)
        delta = self.rules.delta_rule(node, self)
        if delta is not None:
            return Step(node, Kind.DELTA, call, delta=delta)
        return Step(node, Kind.PLAIN, call)

    def _is_sequence(self, value: torch.Tensor) -> bool:
        return value.ndim == 3 and value.shape[0] == self.batch

    def _only_inputs(self, node: fx.Node, sources: tuple[fx.Node, ...]) -> bool:
        """Every input depending on x is a source or a shape value."""
        return all(
            n in sources or self.steps[n].kind in (Kind.META, Kind.CONST) for n in node.all_input_nodes
        ) and all(self.tracked(s) for s in sources)

    # ------------------------------------------------------------------ ranges

    def demand(self) -> None:
        """Set ``lo, hi`` of each tracked node: the columns its users read."""
        for node in reversed(list(self.steps)):
            step = self.steps[node]
            if not step.tracked:
                continue
            ranges = []
            for user in node.users:
                user_step = self.steps.get(user)
                if user is not self.output and (user_step is None or user_step.kind is Kind.META):
                    continue
                if user_step is not None and user_step.tracked:
                    rule = user_step.rule
                    assert rule is not None
                    ranges += [
                        rule.input_range(i, user_step.lo, user_step.hi) for i, s in enumerate(rule.sources) if s is node
                    ]
                else:
                    ranges.append((0, step.length))
            lo = max(0, min((r[0] for r in ranges), default=0))
            hi = min(step.length, max((r[1] for r in ranges), default=step.length))
            step.lo, step.hi = (lo, hi) if lo < hi else (0, step.length)

    def saturate(self) -> None:
        """Turn windows as wide as their demanded columns into ranges, and follow the change downstream."""
        for node, step in self.steps.items():
            if step.kind is Kind.LOCAL and node is not self.x:
                assert step.rule is not None
                after_range = any(self.steps[s].kind is Kind.RANGE for s in step.rule.sources)
                if after_range or step.extent[1] >= step.hi - step.lo:
                    step.kind = Kind.RANGE
            elif step.kind is Kind.FUSED and self.steps[node.args[0]].kind is not Kind.LOCAL:
                step.kind = Kind.PLAIN
            elif step.kind is Kind.DELTA:
                assert step.delta is not None
                fused = step.delta.fused_input is None or self.steps[step.delta.fused_input].kind is Kind.FUSED
                if self.steps[step.delta.source].kind is not Kind.LOCAL or not fused:
                    step.kind = Kind.PLAIN

    def pads(self) -> dict[fx.Node, tuple[int, int]]:
        """Zero padding each cached reference needs so that every gather stays in range."""
        pads: dict[fx.Node, tuple[int, int]] = {}

        def need(node: fx.Node, lo: int, hi: int) -> None:
            length = self._length(node)
            left, right = pads.get(node, (0, 0))
            pads[node] = (max(left, -lo), max(right, hi - length))

        def relative(node: fx.Node, left: int, width: int) -> None:
            need(node, left, self.length - 1 + left + width)

        for node, step in self.steps.items():
            if step.kind is Kind.LOCAL and step.rule is not None:
                extents = [self.steps[s].extent for s in step.rule.sources]
                for gathered, left, width in step.rule.gathers(extents, step.extent):
                    relative(gathered, left, width)
                for const in getattr(step.rule, "length_consts", ()):
                    relative(const, *step.extent)
            elif step.kind is Kind.DELTA:
                assert step.delta is not None
                relative(step.delta.source, *self.steps[step.delta.source].extent)
            if step.kind is Kind.LOCAL and self._materialized(node):
                need(node, step.lo, step.hi + 1)
        return pads

    def _length(self, node: fx.Node) -> int:
        return int(self.values[node].shape[-1])

    def _materialized(self, node: fx.Node) -> bool:
        """Whether some user reads full columns of the LOCAL ``node``."""
        for user in node.users:
            if user is self.output or (user in self.steps and self.steps[user].kind in (Kind.RANGE, Kind.PLAIN)):
                return True
        return False

    def plan(self) -> Plan:
        """Run the analysis."""
        self.classify()
        self.demand()
        self.saturate()
        pads = self.pads()
        for step in self.steps.values():
            if step.kind is Kind.DELTA:
                assert step.delta is not None
                step.delta.prepare(self.steps[step.delta.source].extent, self.length)
        consts = {n: self.values[n] for n, s in self.steps.items() if s.kind is Kind.CONST}
        local_rules = [s.rule for s in self.steps.values() if s.kind is Kind.LOCAL and s.rule is not None]
        finite = not any(rule.may_overflow() for rule in local_rules)
        shapes = {n: self.values[n].to("meta") for n, s in self.steps.items() if s.tracked}
        return Plan(self.steps, self.x, self.outputs, self.length, consts, shapes, pads, finite)


def _select_outputs(structure: Any, outputs: Sequence[int] | None) -> Any:
    """The output structure with unselected top-level elements replaced by ``None``."""
    if outputs is None:
        return structure
    if not isinstance(structure, (tuple, list)):
        raise ValueError(f"outputs {tuple(outputs)} were selected, but the member returns a single value")
    n = len(structure)
    wanted = {i % n for i in outputs if -n <= i < n}
    if len(wanted) != len(set(outputs)):
        raise ValueError(f"outputs {tuple(outputs)} out of range for a member returning {n} values")
    return type(structure)(v if i in wanted else None for i, v in enumerate(structure))


def _ancestors(structure: Any) -> set[fx.Node]:
    """Every node the output structure depends on."""
    live: set[fx.Node] = set()
    stack: list[fx.Node] = []
    map_arg(structure, stack.append)
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live
