"""The declarative configs: pipelines and simulation studies, every bad field named by its YAML path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import EXAMPLE_ENSEMBLE, EXAMPLE_FASTA
from deepmr_dist.errors import InputError
from deepmr_dist.pipeline.config import PipelineConfig, StudyConfig
from deepmr_dist.pipeline.config_types import load_config, parse_config

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
