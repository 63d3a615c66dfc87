"""Ensemble fusion: members of one architecture run as one network.

Every peer runs ensemble members one after another, each a separate set of
small operations; a fused network runs each layer once for all members, with
the members' filters side by side. The phases, one module each:

1. :mod:`.build`: trace every member with torch.fx, check that the graphs are
   the same operations on the same shapes, and merge them node by node
   (grouped convolutions, batched linear layers, folded batch norms, per-member
   constants concatenated along channels, see its docstring);
2. :mod:`.verify`: the build-time check of the fused network against the
   member loop, on the mutants the incremental engine's check uses;
3. :mod:`.runner`: :func:`~.runner.build_fused` (1 and 2, or ``None`` with the
   reason logged at DEBUG) and :class:`~.runner.FusedRunner`, which runs the
   fused network (in full, or incrementally: fuse first, then recompute only
   what a mutation changes) and splits its outputs back into members.

:mod:`.ops` holds the one layer torch has no module for
(:class:`~.ops.GroupedLinear`). :func:`deepmr_dist.ism.engine.make_ensemble_runners`
chooses between the fused network and the member loop.
"""
