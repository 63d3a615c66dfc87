"""The declarative configs: pipelines and simulation studies, every bad field named by its YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.config import PipelineConfig, StudyConfig
from deepmr_dist.pipeline import config_types
from deepmr_dist.pipeline.config_types import load_config, parse_config, read_yaml_mapping

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- pipelines


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"model": {"sources": ["m.pt"]}}, "pipeline.yaml: sequences: Field required"),
        ({"sequences": {"fasta": "a.fa", "onehot": "b.npy"}, "model": {"sources": ["m.pt"]}}, "sequences: Value error, give exactly one"),
        ({"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}, "mr": {"methods": ["egger", "eggers"]}}, "mr.methods: "),
        ({"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}, "ism": {"chunk_loci": 0}}, "ism.chunk_loci: "),
        ({"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"], "member": 3}}, "model.member: Extra inputs"),
        ({"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}, "tasks": {"names": ["a", "b"], "keep": ["a", "c"]}},
         "tasks.keep names unknown task(s) ['c']"),
        ({"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}, "pairs": [["a"]]}, "pairs"),
        ({"sequences": {"fasta": "a.fa"}, "model": {"train_simulation": True}}, "model.train_simulation needs sequences.simulation"),
    ],
)
def test_pipeline_config__errors_name_the_field(data, expected):
    with pytest.raises(InputError) as err:
        parse_config(data, PipelineConfig, "pipeline.yaml")
    assert expected.replace("Value error, ", "") in str(err.value).replace("Value error, ", ""), str(err.value)


def test_pipeline_config__missing_input_file_names_the_field(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(f"sequences: {{fasta: missing.fa}}\nmodel: {{sources: ['{EXAMPLE_ENSEMBLE}']}}\n")
    with pytest.raises(InputError, match=r"sequences.fasta: file not found: .*missing.fa"):
        load_config(path, PipelineConfig).resolve_paths(tmp_path)
    path.write_text(f"sequences: {{fasta: {EXAMPLE_FASTA}}}\nmodel: {{sources: [m0.pt]}}\n")
    with pytest.raises(InputError, match=r"model.sources\[0\]: file not found: .*m0.pt"):
        load_config(path, PipelineConfig).resolve_paths(tmp_path)


def test_pipeline_config__option_paths_are_taken_from_the_yaml_folder(tmp_path):
    (tmp_path / "ckpt").mkdir()
    for name in ("oct4.m0.torch", "ckpt/sox2.m0.torch"):
        (tmp_path / name).write_bytes(b"")
    options = {"checkpoints": {"Oct4": ["oct4.m0.torch"], "Sox2": ["ckpt/sox2.m0.torch"]}, "tasks": ["Oct4"], "absent": "x.torch",
               "trimming": 0, "url": "s3://bucket/oct4.m0.torch"}
    data = {"sequences": {"fasta": str(EXAMPLE_FASTA)}, "model": {"sources": ["deepmr_dist.models.bpnet:load_bpnet_checkpoints"],
                                                                  "options": options}}
    resolved = parse_config(data, PipelineConfig, "p.yaml").resolve_paths(tmp_path).model.options
    assert resolved == {**options, "checkpoints": {"Oct4": [str(tmp_path / "oct4.m0.torch")], "Sox2": [str(tmp_path / "ckpt/sox2.m0.torch")]}}


def test_pipelines__every_yaml_in_the_repository_is_valid():
    for path in sorted((REPO / "pipelines").glob("*.yaml")):
        text = path.read_text()
        if "\nsequences:" in text:
            load_config(path, PipelineConfig)


# ----------------------------------------------------------------------------- simulation studies


@pytest.mark.parametrize(
    ("change", "path", "expected"),
    [
        ({"training": {"epochs": 0}}, "training", "epochs=0"),
        ({"analysis": {"methods": ["egger_paper", "wald_mean", "egger_robust"]}}, "analysis.methods", "egger_robust"),
        ({"analysis": {"methods": ["ivw"]}}, "analysis.methods", "egger_paper"),
        ({"scenarios": ["unconfounded", "confounded"]}, "scenarios", "confounded"),
        ({"generator": {"n_tests": 10}}, "generator.n_tests", "nexpected keyword"),
        ({"members": 1}, "members", "greater than or equal to 2"),
        ({"analysis": {"instrument_rule": "pooled"}}, "analysis.instrument_rule", "pooled_z"),
        ({"motif": {"exposure": "MA0035.3"}}, "motif", "xtra"),
    ],
)
def test_study_config__bad_field_is_named_by_its_yaml_path(change, path, expected):
    with pytest.raises(InputError) as err:
        parse_config(change, StudyConfig, "test")
    message = str(err.value)
    assert f"test: {path}:" in message, message
    assert expected in message, message


def test_load_config__missing_file_and_bad_yaml_name_the_file(tmp_path):
    with pytest.raises(InputError, match="cannot read config .*nope.yaml"):
        load_config(tmp_path / "nope.yaml", StudyConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(InputError, match="bad.yaml is not valid YAML"):
        load_config(bad, StudyConfig)


def test_study_config__pipelines_in_the_repository_are_valid():
    paper = load_config("pipelines/paper_simulation.yaml", StudyConfig)
    assert (paper.rounds, paper.members, paper.scenarios) == (50, 5, [1, 2, 3, 4])
    assert (paper.generator.n_train, paper.generator.n_test) == (10_000, 1_000)
    assert paper.analysis.meta_method == "dl"
    load_config("pipelines/simulation_reduced.yaml", StudyConfig)


# ----------------------------------------------------------------------------- sequences.iupac


def test_pipeline_config__sequences_iupac_is_n_or_error_as_the_readers_take_it():
    from typing import get_args

    from deepmr_dist.io.sequence import DEFAULT_IUPAC, IUPAC_MODES
    from deepmr_dist.pipeline.config import Sequences

    field = Sequences.model_fields["iupac"]
    assert get_args(field.annotation) == IUPAC_MODES and field.default == DEFAULT_IUPAC
    base = {"sequences": {"fasta": "a.fa"}, "model": {"sources": ["m.pt"]}}
    assert parse_config(base, PipelineConfig, "p.yaml").sequences.iupac == "n"
    assert parse_config({**base, "sequences": {"fasta": "a.fa", "iupac": "error"}}, PipelineConfig, "p.yaml").sequences.iupac == "error"
    with pytest.raises(InputError, match=r"p.yaml: sequences.iupac: Input should be 'n' or 'error' \(got 'N'\)"):
        parse_config({**base, "sequences": {"fasta": "a.fa", "iupac": "N"}}, PipelineConfig, "p.yaml")


def test_load_pipeline__sequences_iupac_reaches_the_fasta_reader(tmp_path):
    from deepmr_dist.pipeline.plan import load_sequences

    (tmp_path / "loci.fa").write_text(">a\nACGTRY\n")
    path = tmp_path / "p.yaml"
    path.write_text(f"sequences: {{fasta: loci.fa, iupac: error}}\nmodel: {{sources: ['{EXAMPLE_ENSEMBLE}']}}\n")
    config = load_config(path, PipelineConfig).resolve_paths(tmp_path)
    with pytest.raises(InputError, match=r"record 'a' .*IUPAC code 'R' at position 5"):
        load_sequences(config)
    loci, _ = load_sequences(config.model_copy(update={"sequences": config.sequences.model_copy(update={"iupac": "n"})}))
    assert loci.sequence.values.tolist() == [[0, 1, 2, 3, 4, 4]]


# ----------------------------------------------------------------------------- YAML that is not text, or expands


def _alias_levels(levels: int) -> str:
    """``model.options`` whose aliases nest ``levels`` deep, 4 references each: 4**levels leaves."""
    lines = ["model:", "  options:", "    a0: &a0 [x, x, x, x]"]
    lines += [f"    a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_read_yaml_mapping__an_alias_bomb_is_refused_before_it_is_built(tmp_path):
    import time

    path = tmp_path / "bomb.yaml"
    # written: the root, model, options and their keys (5), keys a0-a9 (10), a0 and its 4 leaves (5), a1-a9 (9) = 29;
    # expanded: a_i holds 1 + 4 * a_(i-1) nodes from a0's 5, so a9 alone has 4**10 leaves in 1,398,101 nodes,
    # a0-a9 together 1,864,130, and with the 15 others 1,864,145
    path.write_text(_alias_levels(10))
    started = time.perf_counter()
    with pytest.raises(InputError, match=r"bomb.yaml: refused: its aliases expand 29 written nodes to 1,864,145 ") as err:
        read_yaml_mapping(path)
    assert "\n" not in str(err.value)
    assert time.perf_counter() - started < 2.0  # measured 0.006 s; building it took 19 s (issue 14)


def test_check_expansion__counts_every_reference_and_allows_the_budget(tmp_path, monkeypatch):
    # written: the mapping, keys a and b, [1, 2] and its 2 items, b's list = 7 nodes;
    # expanded: 1 + (1 + 3) + (1 + (1 + 3 * 3)) = 16, so the aliases add 9
    path = tmp_path / "a.yaml"
    path.write_text("a: &x [1, 2]\nb: [*x, *x, *x]\n")
    monkeypatch.setattr(config_types, "ALIAS_NODE_BUDGET", 9)
    assert read_yaml_mapping(path) == {"a": [1, 2], "b": [[1, 2]] * 3}
    monkeypatch.setattr(config_types, "ALIAS_NODE_BUDGET", 8)
    with pytest.raises(InputError, match=r"a.yaml: refused: its aliases expand 7 written nodes to 16 \(at most 8 more"):
        read_yaml_mapping(path)


def test_read_yaml_mapping__a_large_file_may_alias_as_many_nodes_as_it_writes(tmp_path):
    path = tmp_path / "large.yaml"
    path.write_text("x: &x [" + ", ".join(map(str, range(12_000))) + "]\ny: *x\n")  # aliases add 12,001 of 12,004
    assert read_yaml_mapping(path)["y"] == list(range(12_000))


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (bytes(range(256)) * 4, r"bad.yaml is not a text file \(byte 0x80 at offset 128 is not UTF-8\); a config is YAML text"),
        (b"a: \x07\n", r"bad.yaml is not valid YAML: unacceptable character #x0007"),
        (b"a: &x [*x]\n", r"bad.yaml: refused: line 1: an alias refers to a node that contains it"),
        (b"a: [1,\n", r"bad.yaml is not valid YAML: line 2, column 1: while parsing a flow node: expected the node content"),
        (b"[" * 5000, r"bad.yaml: YAML nested too deeply to read"),
    ],
    ids=["binary", "control-character", "recursive-alias", "syntax", "deep"],
)
def test_read_yaml_mapping__bad_files_are_one_line_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(InputError, match=match) as err:
        read_yaml_mapping(path)
    assert "\n" not in str(err.value)
