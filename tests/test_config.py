"""One source of defaults: the schema's defaults (what a Snakemake run gets) must equal the
library's (what scllm.train.pretrain, scllm.evaluate, the command line and the benchmarks get).

Any drift between config/schema.yaml and the config dataclasses or the stage functions' keyword
defaults fails here, naming the setting.
"""

from __future__ import annotations

import inspect
from dataclasses import MISSING, fields
from pathlib import Path

import pytest
import yaml

from scllm.config import DATA_MODEL_KEYS, EmbedConfig, EvaluateConfig, TrainConfig
from scllm.model import ModelConfig
from scllm.prep.binning import normalize_bin
from scllm.prep.hvg import select_hvg
from scllm.prep.qc import filter_qc
from scllm.prep.split import split_cells
from scllm.prep.tokenize import tokenize_shards

SCHEMA = yaml.safe_load((Path(__file__).parents[1] / "config" / "schema.yaml").read_text())


def schema_defaults(section: str) -> dict:
    return {
        key: spec["default"] for key, spec in SCHEMA["properties"][section]["properties"].items()
    }


def dataclass_defaults(cls) -> dict:
    out = {}
    for f in fields(cls):
        if f.default is not MISSING:
            out[f.name] = f.default
        elif f.default_factory is not MISSING:
            out[f.name] = f.default_factory()
    return out


def keyword_defaults(function) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(function).parameters.items()
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }


def assert_same(schema: dict, library: dict, where: str) -> None:
    drift = {
        key: (schema.get(key, "<missing>"), library.get(key, "<missing>"))
        for key in set(schema) | set(library)
        if schema.get(key, "<missing>") != library.get(key, "<missing>")
    }
    assert not drift, f"{where}: schema default vs library default differ: {drift}"


@pytest.mark.parametrize(
    "section, cls, not_in_schema",
    [
        ("train", TrainConfig, TrainConfig.LIBRARY_ONLY),
        ("evaluate", EvaluateConfig, ()),
        ("embed", EmbedConfig, EmbedConfig.LIBRARY_ONLY),
        ("model", ModelConfig, DATA_MODEL_KEYS),
    ],
)
def test_schema_defaults_equal_the_config_dataclasses(section, cls, not_in_schema):
    library = {k: v for k, v in dataclass_defaults(cls).items() if k not in not_in_schema}
    assert_same(schema_defaults(section), library, section)


@pytest.mark.parametrize(
    "section, function",
    [
        ("qc", filter_qc),
        ("hvg", select_hvg),
        ("normalize_bin", normalize_bin),
        ("split", split_cells),
        ("tokenize", tokenize_shards),
    ],
)
def test_schema_defaults_equal_the_stage_functions_defaults(section, function):
    # The rule passes the section as keywords: each must be one, with the same default. Keywords
    # the schema does not offer (hvg's LOESS span) are the library's alone.
    schema, library = schema_defaults(section), keyword_defaults(function)
    library = {k: v for k, v in library.items() if k in schema}
    assert_same(schema, library, f"{section} ({function.__module__}.{function.__name__})")


def test_chunk_size_and_embedding_defaults_agree():
    chunk_size = SCHEMA["properties"]["chunk_size"]["default"]
    for function in (filter_qc, normalize_bin, tokenize_shards):
        if "chunk_size" in keyword_defaults(function):
            assert keyword_defaults(function)["chunk_size"] == chunk_size, function.__name__
    assert EmbedConfig.chunk_size == chunk_size
    # the model's bins come from normalize_bin's, through the shards
    assert dataclass_defaults(ModelConfig)["n_bins"] == schema_defaults("normalize_bin")["n_bins"]


def test_every_schema_section_with_settings_is_checked():
    checked = {
        "train",
        "evaluate",
        "embed",
        "model",
        "qc",
        "hvg",
        "normalize_bin",
        "split",
        "tokenize",
    }
    # census (the ingest) and heldout (paths and column names, no library defaults) are not
    sections = {k for k, v in SCHEMA["properties"].items() if v.get("type") == "object"}
    assert sections - checked == {"census", "heldout"}


def test_the_drift_check_catches_a_changed_default():
    """The check is not vacuous: a library default that moves away from the schema fails it."""
    schema = schema_defaults("train")
    library = {**dataclass_defaults(TrainConfig), "warmup_steps": 100}
    with pytest.raises(AssertionError, match="warmup_steps"):
        assert_same(
            schema,
            {k: v for k, v in library.items() if k not in TrainConfig.LIBRARY_ONLY},
            "train",
        )


def test_train_config_rejects_unknown_and_bad_settings():
    with pytest.raises(ValueError, match=r"unknown train settings \['lrate'\]"):
        TrainConfig.from_dict({"lrate": 1})
    with pytest.raises(ValueError, match="train.mask_ratios"):
        TrainConfig(mask_ratios=[1.5])
    with pytest.raises(ValueError, match=r"unknown evaluate settings \['k'\]"):
        EvaluateConfig.from_dict({"k": 3})


def test_embedding_fallback_binning_is_normalize_bins_default():
    """A model that records no binning settings is embedded with normalize_bin's defaults."""
    from scllm.eval.encode import DEFAULT_BINNING

    defaults = schema_defaults("normalize_bin")
    assert DEFAULT_BINNING == {key: defaults[key] for key in DEFAULT_BINNING}


# --- the config as users write it (scllm.workflow_config) ----------------------------------------


def test_command_line_scalars_are_typed_as_yaml_types_them():
    from scllm.workflow_config import typed_overrides, typed_scalar

    assert [typed_scalar(t) for t in ("800", "-3", "1e-3", ".5", "True", "null", "~")] == [
        800, -3, 0.001, 0.5, True, None, None,
    ]  # fmt: skip
    # dates, names and versions stay text (YAML would make 2025-01-30 a date)
    assert [typed_scalar(t) for t in ("2025-01-30", "seurat_v3", "1.2.3")] == [
        "2025-01-30", "seurat_v3", "1.2.3",
    ]  # fmt: skip
    # top-level values are Snakemake's own typing, except where the schema asks for a name
    given = {"run": 2024, "seed": 3, "hvg": {"n_top_genes": "800"}}
    given["census"] = {"h5ad": {"donor_id": "1", "donor_column": "null"}, "max_cells": "1e5"}
    assert typed_overrides(given, SCHEMA) == {
        "run": "2024",  # --config run=2024 (quoted or not, Snakemake reads digits as a number)
        "seed": 3,
        "hvg": {"n_top_genes": 800},
        "census": {"h5ad": {"donor_id": "1", "donor_column": None}, "max_cells": 100000.0},
    }


def test_a_name_on_the_command_line_is_taken_as_written():
    from scllm.workflow_config import typed_overrides

    # Snakemake has already read these as numbers; the arguments as given keep the text
    given = {"run": 7, "seed": 3}
    assert typed_overrides(given, SCHEMA, ["run=007", "seed=3"]) == {"run": "007", "seed": 3}
    assert typed_overrides({"run": 1000.0}, SCHEMA, ["run=1e3"]) == {"run": "1e3"}
    assert typed_overrides({"run": 123}, SCHEMA, ['run="123"']) == {"run": "123"}


def test_a_number_where_a_name_belongs_is_told_to_be_quoted():
    from scllm.workflow_config import config_problems

    problem = config_problems({"run": 2024}, SCHEMA)
    assert (
        'run (in a config file write it in quotes, "2024": YAML reads it as a number): 2024 is '
        "not of type 'string'"
    ) in problem
    assert "quotes" not in config_problems({"hvg": {"n_top_genes": "many"}}, SCHEMA)


@pytest.mark.parametrize(
    "typo, nearest",
    [
        ("learning_rate", "lr"),
        ("n_top_gene", "n_top_genes"),
        ("epoch", "epochs"),
        ("bs", "batch_size"),
    ],
)
def test_nearest_names_find_misspellings_and_abbreviations(typo, nearest):
    from scllm.workflow_config import nearest_names

    known = ["epochs", "batch_size", "lr", "n_top_genes", "log_every_steps", "mask_ratios"]
    assert nearest_names(typo, known)[0] == nearest


def test_did_you_mean_suggests_a_column_spelt_alike_and_nothing_else():
    from scllm.workflow_config import did_you_mean

    columns = ["donor", "cell_type_ontology_term_id", "CellType"]
    assert did_you_mean("cell_type", columns) == " Did you mean 'CellType'?"  # case ignored
    # a longer name starting with it is another column, not a misspelling
    assert did_you_mean("cell_type", ["donor", "cell_type_ontology_term_id"]) == ""
    assert did_you_mean("gene_id", []) == ""


def test_config_problems_name_each_problem_once_in_a_paragraph():
    from scllm.workflow_config import config_problems

    schema = SCHEMA
    assert config_problems({"hvg": {"n_top_genes": 800}}, schema) is None
    message = config_problems(
        {"train": {"learning_rate": 0.1, "lr": -1}, "census": {"h5ad": {"pth": "x.h5ad"}}}, schema
    )
    paragraphs = message.split("\n\n")[1:]
    assert len(paragraphs) == 3, message
    assert paragraphs[0].startswith(
        "unknown setting census.h5ad.pth: did you mean census.h5ad.path?"
    )
    assert paragraphs[1].startswith("unknown setting train.learning_rate: did you mean train.lr?")
    assert paragraphs[2].startswith("train.lr: -1 is less than or equal to the minimum of 0")
    import datetime

    dated = config_problems({"census": {"census_version": datetime.date(2025, 1, 30)}}, schema)
    assert "census.census_version (write the date in quotes" in dated


def test_whole_floats_become_integers_where_the_schema_asks_for_one():
    from scllm.workflow_config import integers_as_int

    config = {"census": {"max_cells": 1e5}, "train": {"epochs": 3.0, "lr": 1.0}, "run": "x"}
    integers_as_int(config, SCHEMA)
    assert config == {
        "census": {"max_cells": 100000},
        "train": {"epochs": 3, "lr": 1.0},
        "run": "x",
    }
    assert type(config["census"]["max_cells"]) is int and type(config["train"]["lr"]) is float
