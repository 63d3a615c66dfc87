"""Rules: how each position-local operation is computed on windows of changed columns.

One module per layer family, each with its rule and the matcher that
recognises it in a traced graph (:mod:`.base` says what a rule is):

- :mod:`.conv`: ``Conv1d`` / ``F.conv1d`` with zero padding and stride 1;
- :mod:`.batchnorm`, :mod:`.relu`: a batch norm or ReLU right after a
  convolution, folded into it;
- :mod:`.elementwise`: activations, arithmetic, eval-mode normalisation and
  dropout, softmax over channels;
- :mod:`.concat`, :mod:`.crop`: concatenation along channels, channel
  selection and cropping along the length;
- :mod:`.mean`, :mod:`.linear`: mean or sum over the length and
  ``Flatten -> Linear``, as reference + change (delta rules).

:mod:`.registry` is the table the planner tries them from.
"""
