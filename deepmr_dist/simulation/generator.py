"""Simulated sequences, binding and counts of the paper's simulation study.

One call to :func:`simulate_round` makes one round: its parameters (alpha,
gamma), the training sequences (optionally with variant copies), held-out
calibration sequences (labelled, for :mod:`deepmr_dist.stages.calibration`; never
used for training or ISM) and the test sequences, each with noise-free
expected counts, Poisson counts and Anscombe labels, and the record of which
motif was embedded where (needed for the true causal effect,
:mod:`deepmr_dist.simulation.truth`).

Randomness: round r of seed s draws from ``SeedSequence([s, r])``, split into
independent child streams for the round parameters, the training set, the
test set, the variant copies and the calibration set (spawned in that order;
the calibration stream is the fifth child, so adding it left the first four
and every value they produce unchanged). Any round can therefore be
regenerated alone, rounds are independent, and changing ``n_train`` or
``n_calibration`` does not change the test set. The four scenarios share
round parameters for the same seed and round.

Design choices the paper leaves open (documented here, recorded in attrs):

- gamma = max(0, r) with r ~ N(10 or 1 with equal probability, sd sqrt(0.5)),
  the paper's text; the original code used sd 0.5 (``gamma_sd``).
- The pair's gap (bases between the exposure and outcome instances) is
  uniform on ``[max length, L - sum of lengths]`` over the motifs of the
  scenario (the confounder counts in sequence-dependent scenarios), as in the
  original code; the gap is then always wide enough for a confounder instance.
- A confounder instance is placed uniformly among the starts that overlap no
  exposure/outcome instance.
- Variant copies keep their parent's z (the same locus under the same
  sequence-independent condition); their counts are drawn afresh.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import xarray as xr

from deepmr_dist.errors import InputError
from deepmr_dist.simulation.binding import BACKGROUND, MotifModel, binding_probability, check_background
from deepmr_dist.simulation.counts import CountParameters, anscombe, expected_counts
from deepmr_dist.simulation.motifs import ALPHABET, PSEUDOCOUNT, ROLES, Motif, MotifSet

SCENARIOS: dict[int, str] = {1: "unconfounded", 2: "random", 3: "sequence", 4: "both"}
"""Scenario numbers and names: sequence-independent (z) confounding in 2 and 4,
sequence-dependent (confounder TF) confounding in 3 and 4."""

CASES = ("none", "exposure", "outcome", "pair")
"""Embedding cases, coded 0..3 in the ``case`` variable; each has probability 0.25."""

TASKS = ("exposure", "outcome")

SPLITS = ("train", "variant", "calibration", "test")
"""The parts of a round, in locus order: training sequences, their variant copies
(training too), held-out calibration sequences, test sequences (ISM and truth)."""


@dataclass(frozen=True)
class SimulationConfig:
    """Fixed settings of a simulation study; the defaults are the paper's.

    Attributes
    ----------
    length
        Sequence length L.
    n_train, n_test
        Sequences per round in the training and test sets.
    n_calibration
        Held-out labelled sequences per round for recalibrating the ensemble's
        uncertainty (not in the paper, which used none; 0 = none).
    background
        Background base probabilities, A, C, G, T order.
    pseudocount
        Motif pseudocount, used for sampling instances and for energies.
    alpha_mean, alpha_sd
        alpha ~ N(alpha_mean, alpha_sd) per round.
    gamma_means, gamma_sd
        gamma = max(0, r), r ~ N(one of gamma_means with equal probability, gamma_sd).
    eta, nu, tau
        Confounding coefficients (see :class:`~deepmr_dist.simulation.counts.CountParameters`).
    confounder_probability
        Probability of embedding a confounder instance (sequence-dependent scenarios).
    z_probability
        P(z = 1) per sequence (sequence-independent scenarios).
    augment_fraction
        Variant copies added to the training set, as a fraction of ``n_train`` (0 = none;
        the original code used 0.25).
    """

    length: int = 100
    n_train: int = 10_000
    n_test: int = 1_000
    n_calibration: int = 1_000
    background: tuple[float, ...] = tuple(float(b) for b in BACKGROUND)
    pseudocount: float = PSEUDOCOUNT
    alpha_mean: float = 100.0
    alpha_sd: float = 3.0
    gamma_means: tuple[float, ...] = (10.0, 1.0)
    gamma_sd: float = math.sqrt(0.5)
    eta: float = 20.0
    nu: float = 30.0
    tau: float = 25.0
    confounder_probability: float = 0.5
    z_probability: float = 0.5
    augment_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_background(np.array(self.background))
        if self.n_train < 0 or self.n_test < 0 or self.n_calibration < 0:
            raise InputError(
                f"n_train, n_test and n_calibration must be >= 0, got {self.n_train}, {self.n_test}, "
                f"{self.n_calibration}"
            )
        for name in ("confounder_probability", "z_probability", "augment_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must lie in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class RoundParameters:
    """Parameters drawn once per round: alpha, gamma and the mean gamma was drawn around."""

    alpha: float
    gamma: float
    gamma_mean: float


def parse_scenario(scenario: int | str) -> int:
    """Scenario number 1..4 from a number or a name of :data:`SCENARIOS`."""
    names = {name: number for number, name in SCENARIOS.items()}
    if isinstance(scenario, str) and scenario in names:
        return names[scenario]
    if isinstance(scenario, (int, np.integer)) and int(scenario) in SCENARIOS:
        return int(scenario)
    raise InputError(f"unknown scenario {scenario!r}; expected 1-4 or one of {list(names)}")


def round_streams(seed: int, round_index: int) -> dict[str, np.random.Generator]:
    """The independent random streams of one round.

    Returns
    -------
    dict
        Generators ``"parameters"``, ``"train"``, ``"test"``, ``"variants"``,
        ``"calibration"``: the children of ``SeedSequence([seed, round_index])``
        in that order (child i depends only on the seed, the round and i, so
        the first four are the same as before the calibration stream existed).
    """
    if seed < 0 or round_index < 0:
        raise InputError(f"seed and round index must be >= 0, got {seed}, {round_index}")
    names = ("parameters", "train", "test", "variants", "calibration")
    children = np.random.SeedSequence([seed, round_index]).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def draw_round_parameters(rng: np.random.Generator, config: SimulationConfig) -> RoundParameters:
    """Draw alpha ~ N(alpha_mean, alpha_sd) and gamma = max(0, N(mean, gamma_sd)), mean uniform over gamma_means."""
    alpha = rng.normal(config.alpha_mean, config.alpha_sd)
    gamma_mean = config.gamma_means[rng.integers(len(config.gamma_means))]
    gamma = max(0.0, rng.normal(gamma_mean, config.gamma_sd))
    return RoundParameters(alpha=float(alpha), gamma=float(gamma), gamma_mean=float(gamma_mean))


def simulate_round(
    scenario: int | str,
    round_index: int = 0,
    *,
    seed: int,
    motifs: MotifSet | None = None,
    config: SimulationConfig | None = None,
) -> xr.Dataset:
    """Simulate one round: training, calibration and test sequences with counts and labels.

    Parameters
    ----------
    scenario
        1-4 or ``"unconfounded"``, ``"random"``, ``"sequence"``, ``"both"``.
    round_index
        Round number r; with ``seed`` it fixes every random draw of the round.
    seed
        Seed of the whole study.
    motifs
        Exposure, outcome and confounder motifs; default :meth:`MotifSet.default`.
    config
        Study settings; default :class:`SimulationConfig()` (the paper's).

    Returns
    -------
    xarray.Dataset
        Dims ``locus`` (training, variant copies, calibration, then test), ``position``,
        ``task`` (exposure, outcome), ``motif`` (exposure, outcome, confounder),
        ``motif_position``, ``allele``. Variables:

        - ``sequence`` (locus, position) int8 base codes A=0, C=1, G=2, T=3;
        - ``label`` (locus, task) Anscombe-transformed counts (the model's targets);
        - ``count`` (locus, task) Poisson counts; ``expected_count`` their noise-free means;
        - ``binding`` (locus, motif) soft-OR binding probability q (0 for an unsimulated confounder);
        - ``case`` (locus) embedding case, codes of :data:`CASES`;
        - ``motif_start`` (locus, motif) start of each embedded instance, -1 if none;
        - ``z`` (locus) the sequence-independent confounder;
        - ``split`` (locus) ``"train"``, ``"variant"``, ``"calibration"`` or ``"test"``;
        - ``parent`` (locus) locus id a variant copy was made from, ``""`` otherwise;
        - ``motif_probability`` (motif, motif_position, allele) the unsmoothed
          matrices (NaN past a motif's end) and ``motif_length`` (motif).

        Attrs hold the scenario, seed, round, round parameters and every setting.
    """
    scenario = parse_scenario(scenario)
    motifs = MotifSet.default() if motifs is None else motifs
    config = SimulationConfig() if config is None else config
    background = np.array(config.background)
    models = {role: MotifModel.from_motif(motifs[role], background, config.pseudocount) for role in ROLES}
    sequence_confounding = scenario in (3, 4)
    gap = _gap_bounds(models, config.length, sequence_confounding)
    streams = round_streams(seed, round_index)
    round_params = draw_round_parameters(streams["parameters"], config)
    count_params = CountParameters(alpha=round_params.alpha, gamma=round_params.gamma,
                                   eta=config.eta, nu=config.nu, tau=config.tau)

    def split(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
        return _simulate_split(rng, n, models, config, scenario, gap, count_params)

    train = split(streams["train"], config.n_train)
    n_variants = round(config.augment_fraction * config.n_train)
    variants = _variant_copies(streams["variants"], train, n_variants, models, config, scenario, count_params)
    calibration = split(streams["calibration"], config.n_calibration)
    test = split(streams["test"], config.n_test)
    attrs = {
        "scenario": scenario,
        "scenario_name": SCENARIOS[scenario],
        "seed": int(seed),
        "round": int(round_index),
        **asdict(round_params),
        **{key: (list(value) if isinstance(value, tuple) else value) for key, value in asdict(config).items()},
        "gap_min": gap[0],
        "gap_max": gap[1],
        "gamma_rule": "gamma = max(0, r), r ~ N(gamma_mean, gamma_sd), gamma_mean uniform over gamma_means",
    }
    parts = {"train": train, "variant": variants, "calibration": calibration, "test": test}
    return _to_dataset(parts, round_index, motifs, config, attrs)


def select_split(ds: xr.Dataset, *names: str) -> xr.Dataset:
    """The loci of a round whose ``split`` is one of ``names`` (e.g. ``"train", "variant"``)."""
    unknown = set(names) - set(SPLITS)
    if unknown:
        raise InputError(f"unknown split {sorted(unknown)}; expected one of {list(SPLITS)}")
    return ds.isel(locus=np.flatnonzero(np.isin(ds["split"].values, names)))


def dataset_motif_models(ds: xr.Dataset) -> dict[str, MotifModel]:
    """Rebuild the :class:`MotifModel` of each role from a simulated round.

    Uses the matrices, background and pseudocount recorded in ``ds``, so any
    computation on the round (e.g. the true causal effect) scores sequences
    exactly as the generator did.
    """
    models = {}
    for role in ROLES:
        length = int(ds["motif_length"].sel(motif=role))
        motif = Motif(
            name=str(ds["motif_name"].sel(motif=role).values),
            id=str(ds["motif_id"].sel(motif=role).values),
            probabilities=ds["motif_probability"].sel(motif=role).values[:length],
        )
        models[role] = MotifModel.from_motif(motif, np.array(ds.attrs["background"]), ds.attrs["pseudocount"])
    return models


def one_hot(codes: np.ndarray, dtype: np.dtype = np.float32) -> np.ndarray:
    """One-hot encode ``(n, L)`` base codes into ``(n, 4, L)`` channels A, C, G, T."""
    codes = np.asarray(codes)
    return (codes[:, None, :] == np.arange(4, dtype=codes.dtype)[None, :, None]).astype(dtype)


def _to_dataset(parts: dict[str, dict[str, np.ndarray]], round_index: int, motifs: MotifSet,
                config: SimulationConfig, attrs: dict) -> xr.Dataset:
    ids = {name: np.array([f"r{round_index:03d}-{name}-{i:06d}" for i in range(len(part["case"]))], dtype=str)
           for name, part in parts.items()}
    data = {key: np.concatenate([part[key] for part in parts.values()]) for key in parts["train"]}
    parent = np.full(len(data["case"]), "", dtype=object)
    copies = data["parent_index"] >= 0
    parent[copies] = ids["train"][data["parent_index"][copies]]
    split = np.concatenate([np.full(len(part["case"]), name) for name, part in parts.items()])
    return xr.Dataset(
        {
            "sequence": (("locus", "position"), data["codes"]),
            "label": (("locus", "task"), anscombe(data["count"])),
            "count": (("locus", "task"), data["count"]),
            "expected_count": (("locus", "task"), data["expected"]),
            "binding": (("locus", "motif"), data["binding"]),
            "case": ("locus", data["case"], {"flag_values": list(range(len(CASES))), "flag_meanings": " ".join(CASES)}),
            "motif_start": (("locus", "motif"), data["start"]),
            "z": ("locus", data["z"]),
            "split": ("locus", split),
            "parent": ("locus", parent.astype(str)),
            **_motif_variables(motifs),
        },
        coords={
            "locus": np.concatenate(list(ids.values())),
            "position": np.arange(config.length),
            "task": list(TASKS),
            "motif": list(ROLES),
            "allele": list(ALPHABET),
            "motif_name": ("motif", [motifs[role].name for role in ROLES]),
            "motif_id": ("motif", [motifs[role].id for role in ROLES]),
        },
        attrs=attrs,
    )


def _gap_bounds(models: dict[str, MotifModel], length: int, sequence_confounding: bool) -> tuple[int, int]:
    roles = ROLES if sequence_confounding else ROLES[:2]
    lengths = [models[role].length for role in roles]
    low, high = max(lengths), length - sum(lengths)
    if low > high:
        raise InputError(
            f"sequence length {length} is too short for motifs of lengths {dict(zip(roles, lengths))}: "
            f"the pair's gap range [{low}, {high}] is empty"
        )
    return low, high


def _sample_instances(rng: np.random.Generator, model: MotifModel, n: int) -> np.ndarray:
    cdf = np.cumsum(model.probabilities, axis=1)[:, :3]
    u = rng.random((n, model.length))
    return (u[:, :, None] >= cdf[None]).sum(axis=2).astype(np.int8)


def _uniform_free_start(rng: np.random.Generator, occupied: np.ndarray, width: int) -> np.ndarray:
    """A uniform start per row among windows of ``width`` that touch no occupied position."""
    filled = np.zeros((occupied.shape[0], occupied.shape[1] + 1), dtype=np.int32)
    filled[:, 1:] = occupied.cumsum(axis=1, dtype=np.int32)
    free = (filled[:, width:] - filled[:, :-width]) == 0
    n_free = free.sum(axis=1)
    if np.any(n_free == 0):
        raise InputError(f"no room left for a {width} bp confounder instance; increase the sequence length")
    pick = np.floor(rng.random(occupied.shape[0]) * n_free).astype(np.int64)
    return (free.cumsum(axis=1) > pick[:, None]).argmax(axis=1)


def _place(rng: np.random.Generator, n: int, models: dict[str, MotifModel], config: SimulationConfig,
           sequence_confounding: bool, gap: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Embedding case and instance starts ``(n, 3)`` (-1 = not embedded)."""
    length = config.length
    len_exp, len_out = models["exposure"].length, models["outcome"].length
    case = rng.integers(0, len(CASES), n).astype(np.int8)
    start = np.full((n, len(ROLES)), -1, dtype=np.int64)
    alone = {1: ("exposure", 0), 2: ("outcome", 1)}
    for code, (role, column) in alone.items():
        rows = case == code
        start[rows, column] = rng.integers(0, length - models[role].length + 1, rows.sum())
    rows = case == 3
    gaps = rng.integers(gap[0], gap[1] + 1, rows.sum())
    first = rng.integers(0, length - (len_exp + gaps + len_out) + 1)
    start[rows, 0] = first
    start[rows, 1] = first + len_exp + gaps
    if sequence_confounding:
        rows = np.flatnonzero(rng.random(n) < config.confounder_probability)
        occupied = np.zeros((rows.size, length), dtype=bool)
        positions = np.arange(length)
        for column, role in enumerate(ROLES[:2]):
            s = start[rows, column][:, None]
            occupied |= (s >= 0) & (positions >= s) & (positions < s + models[role].length)
        start[rows, 2] = _uniform_free_start(rng, occupied, models["confounder"].length)
    return case, start


def _embed(rng: np.random.Generator, codes: np.ndarray, start: np.ndarray, models: dict[str, MotifModel]) -> None:
    for column, role in enumerate(ROLES):
        rows = np.flatnonzero(start[:, column] >= 0)
        model = models[role]
        columns = start[rows, column][:, None] + np.arange(model.length)
        codes[rows[:, None], columns] = _sample_instances(rng, model, rows.size)


def _binding(codes: np.ndarray, models: dict[str, MotifModel], sequence_confounding: bool) -> np.ndarray:
    q = np.zeros((codes.shape[0], len(ROLES)))
    roles = ROLES if sequence_confounding else ROLES[:2]
    for column, role in enumerate(roles):
        q[:, column] = binding_probability(codes, models[role].energy)
    return q


def _counts(rng: np.random.Generator, binding: np.ndarray, z: np.ndarray,
            params: CountParameters) -> tuple[np.ndarray, np.ndarray]:
    expected = expected_counts(binding[:, 0], binding[:, 1], binding[:, 2], z, params)
    return expected, rng.poisson(expected)


def _simulate_split(rng: np.random.Generator, n: int, models: dict[str, MotifModel], config: SimulationConfig,
                    scenario: int, gap: tuple[int, int], params: CountParameters) -> dict[str, np.ndarray]:
    sequence_confounding = scenario in (3, 4)
    codes = rng.choice(4, size=(n, config.length), p=np.array(config.background)).astype(np.int8)
    case, start = _place(rng, n, models, config, sequence_confounding, gap)
    _embed(rng, codes, start, models)
    binding = _binding(codes, models, sequence_confounding)
    z = (rng.random(n) < config.z_probability).astype(np.int8) if scenario in (2, 4) else np.zeros(n, dtype=np.int8)
    expected, count = _counts(rng, binding, z, params)
    return {"codes": codes, "case": case, "start": start.astype(np.int16), "binding": binding, "z": z,
            "expected": expected, "count": count, "parent_index": np.full(n, -1)}


def _variant_copies(rng: np.random.Generator, train: dict[str, np.ndarray], n_variants: int,
                    models: dict[str, MotifModel], config: SimulationConfig, scenario: int,
                    params: CountParameters) -> dict[str, np.ndarray]:
    """Copies of training sequences with one substitution inside each of their OWN embedded instances.

    A parent without any embedded instance gets one substitution at a uniform position.
    """
    parents = rng.choice(len(train["case"]), size=n_variants, replace=False)
    codes = train["codes"][parents].copy()
    start = train["start"][parents].astype(np.int64)
    rows = np.arange(n_variants)
    plain = np.all(start < 0, axis=1)
    sites = [(rows[plain], rng.integers(0, config.length, plain.sum()))]
    for column, role in enumerate(ROLES):
        embedded = start[:, column] >= 0
        sites.append((rows[embedded], start[embedded, column] + rng.integers(0, models[role].length, embedded.sum())))
    for row, position in sites:
        codes[row, position] = (codes[row, position] + rng.integers(1, 4, row.size)) % 4
    binding = _binding(codes, models, scenario in (3, 4))
    z = train["z"][parents]
    expected, count = _counts(rng, binding, z, params)
    return {"codes": codes, "case": train["case"][parents], "start": start.astype(np.int16), "binding": binding,
            "z": z, "expected": expected, "count": count, "parent_index": parents}


def _motif_variables(motifs: MotifSet) -> dict[str, tuple]:
    width = max(motifs[role].length for role in ROLES)
    matrices = np.full((len(ROLES), width, 4), np.nan)
    for index, role in enumerate(ROLES):
        matrices[index, : motifs[role].length] = motifs[role].probabilities
    return {
        "motif_probability": (("motif", "motif_position", "allele"), matrices),
        "motif_length": ("motif", np.array([motifs[role].length for role in ROLES])),
    }
