"""The leaf modules of :mod:`deepmr_dist.models` for incremental ISM, and how their calls are rewritten.

:func:`~deepmr_dist.ism.engine.make_runner` passes :data:`MODEL_LEAVES` to
:func:`~deepmr_dist.ism.incremental.build.build_incremental_runner`, so that
the incremental engine itself knows no model classes.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from deepmr_dist.ism.incremental.trace import Leaves
from deepmr_dist.models.ensemble import FrozenDropout


def frozen_dropout_product(gm: fx.GraphModule, call: fx.Node, example_input: torch.Tensor) -> fx.Node:
    """A :class:`FrozenDropout` call as a product with its mask, stored on ``gm`` as a constant.

    The mask is drawn for the shape of one example of the call's input (batch
    excluded); as a constant with a length axis it is then read per window
    like any other, so MC-dropout members stay incremental.
    """
    module = gm.get_submodule(str(call.target))
    assert isinstance(module, FrozenDropout)
    mask = module.mask(tuple(example_input.shape[1:]), example_input.device).to(example_input.dtype)
    name = f"_frozen_dropout_mask_{call.name}"
    gm.register_buffer(name, mask)
    return gm.graph.call_function(operator.mul, (call.args[0], gm.graph.get_attr(name)))


MODEL_LEAVES: Leaves = {FrozenDropout: frozen_dropout_product}
"""The modules of :mod:`deepmr_dist.models` the tracer must keep whole, with their rewrites."""
