"""Exact incremental recomputation of single-base mutants (fastISM-style).

A single-base mutation changes, in a convolutional stack, only the columns of
each activation inside the receptive field of the mutated position. The
engine runs in phases, one module each:

1. :mod:`.trace`: trace a member with torch.fx, keeping the leaf modules the
   caller names whole and rewriting their calls;
2. :mod:`.plan`: classify every operation, trying the table of
   :mod:`.rules` (one module per layer family, each rule with its matcher);
3. :mod:`.run`: the runner that, for a batch of mutants, computes each
   position-local activation only on a window of changed columns (all
   mutants' windows stacked into one tensor, one kernel call per layer), and
   everything after the first non-local operation on full activations
   rebuilt from the cached reference;
4. :mod:`.verify`: the build-time check of a runner against full forward passes.

:func:`.build.build_incremental_runner` chains them for one member.

Operations computed on windows:

- ``Conv1d`` / ``F.conv1d`` with zero padding (any amount, ``"same"``,
  ``"valid"``), any dilation and groups, stride 1; on the input itself as
  reference + weights x one-hot change;
- eval-mode ``BatchNorm1d`` (folded into the convolution before it when it
  is that convolution's only user), elementwise activations (modules and
  functions), eval-mode dropout, softmax over channels;
- arithmetic between windowed values, scalars and constants (a constant
  with a length axis is read per window; a leaf module rewritten into a
  product with a constant, such as a frozen dropout mask, stays incremental);
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
