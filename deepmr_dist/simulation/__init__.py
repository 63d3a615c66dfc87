"""The paper's simulation study (Malina et al. 2022), without the original code's defects.

Modules, one job each:

- :mod:`~deepmr_dist.simulation.motifs`: PWMs from JASPAR (offline, pyjaspar) or JASPAR/MEME files.
- :mod:`~deepmr_dist.simulation.binding`: energies and soft-OR binding probabilities.
- :mod:`~deepmr_dist.simulation.counts`: expected counts and the Anscombe transform.
- :mod:`~deepmr_dist.simulation.generator`: one round of sequences, counts and labels per seed.
- :mod:`~deepmr_dist.simulation.truth`: the true causal effect per locus and per round.
- :mod:`~deepmr_dist.simulation.training`: training and loading the ensemble (torch, optional Dask).

Nothing is imported here, so that using the generator does not import torch.
"""
