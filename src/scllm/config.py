"""Settings with their defaults, one source for the library, the command line and the benchmarks.
Frozen: a setting is read, never changed, once a stage has it.

Each dataclass holds one section of ``config/schema.yaml``. tests/test_config.py fails when a
schema default and a dataclass default differ, so a library call and a Snakemake run with the
same settings train and score the same way.

No torch here: the command line imports this module without paying for torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import TypeVar

GEPC_TARGETS = ("masked", "masked+unexpressed", "all")
CONTRASTIVE_VIEWS = ("genes", "thinned")
# Cells per streamed row chunk in the data stages and in embedding (the schema's top-level
# chunk_size): bounds their memory, never their results.
CHUNK_SIZE = 20_000
# Where the cell embeddings go in an h5ad: obsm["X_scllm"].
EMBEDDING_KEY = "X_scllm"


def _from_dict(cls, settings: dict | None, section: str):
    """``cls(**settings)``, naming unknown keys (a misspelt key must not be ignored silently)."""
    known = {f.name for f in fields(cls)}
    unknown = set(settings or {}) - known
    if unknown:
        raise ValueError(f"unknown {section} settings {sorted(unknown)}; known: {sorted(known)}")
    return cls(**(settings or {}))


_Settings = TypeVar("_Settings", bound="_Section")


class _Section:
    """What the settings dataclasses of one config section share: ``from_dict``."""

    SECTION = ""  # the section's name in the config, for messages

    @classmethod
    def from_dict(cls: type[_Settings], settings: dict | None) -> _Settings:
        """The settings of the config section ``SECTION``, from its mapping.

        Parameters
        ----------
        settings : dict or None
            The section's keys and values; None or missing keys: the defaults.

        Returns
        -------
        instance of the class
            The settings, e.g. a ``TrainConfig`` from ``TrainConfig.from_dict``.

        Raises
        ------
        ValueError
            An unknown key (named, with the known ones), or a value the class refuses
            (``TrainConfig`` checks ranges and choices).
        """
        return _from_dict(cls, settings, cls.SECTION)


def settings_of(cls, cfg, keywords: dict, section: str):
    """A function's settings: ``cfg`` (a ``cls``) or its keyword arguments, not both.

    Parameters
    ----------
    cls : type
        The settings dataclass, e.g. ``SamplingConfig``.
    cfg : cls or None
        The settings as one object; None: build them from ``keywords``.
    keywords : dict
        The settings as the function's keyword arguments (field names of ``cls``).
    section : str
        The config section they belong to, for messages (e.g. ``"census"``).

    Returns
    -------
    cls
        ``cfg`` when given, else ``cls(**keywords)`` (the defaults where ``keywords`` is empty).

    Raises
    ------
    TypeError
        Both ``cfg`` and keywords are given.
    ValueError
        A keyword that is no field of ``cls`` (a misspelt setting is named, never ignored), or
        a value that ``cls`` refuses.
    """
    if cfg is not None and keywords:
        raise TypeError(f"give the {section} settings as {cls.__name__} or as keywords, not both")
    return cfg if cfg is not None else _from_dict(cls, keywords, section)


def split_settings(settings: dict, *classes) -> list[dict]:
    """``settings`` shared out over the fields of ``classes`` (in that order: a key goes to the
    first class that has it); keys no class has go last, for the caller to refuse.

    Parameters
    ----------
    settings : dict
        Settings of several dataclasses in one mapping (e.g. a function's keyword arguments).
    *classes : type
        The settings dataclasses, in the order they claim keys.

    Returns
    -------
    list of dict
        One dict per class, in the order of ``classes``, then one of the keys no class has
        (empty when every key was claimed).
    """
    parts, rest = [], dict(settings)
    for cls in classes:
        names = {f.name for f in fields(cls)}
        parts.append({k: v for k, v in rest.items() if k in names})
        rest = {k: v for k, v in rest.items() if k not in names}
    return [*parts, rest]


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The ``train`` section: optimisation, objectives and how the run is operated.

    warmup_steps and checkpoint_every_steps are sized for the reference run (300k cells, batch 32:
    about 9,000 steps per epoch, 54,000 in all): 1,000 warmup steps are under 2% of the run, and a
    checkpoint every 1,000 steps loses at most minutes of GPU time while keeping checkpoint writes
    (weights, optimizer state, best model) rare. Small runs (the demo, the tests) set their own.
    """

    epochs: int = 6
    batch_size: int = 32  # per process (GPU)
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 1000
    grad_clip: float = 1.0
    mask_ratios: list = field(default_factory=lambda: [0.25, 0.5, 0.75])
    # Objectives beyond the masked expression MSE (always on): weights 0 switch them off.
    gepc_weight: float = 1.0  # masked MSE of the GEPC head (predicts from the cell embedding)
    # Which genes GEPC predicts from the cell embedding: "masked" (scGPT: the masked tokens);
    # "masked+unexpressed" adds 0 for every vocabulary gene the cell does not express (they are
    # not tokens, so the embedding must record which genes are absent as well as present);
    # "all" predicts the whole vocabulary profile, visible tokens included.
    gepc_targets: str = "masked"
    ecs_weight: float = 0.0  # scGPT's elastic cell similarity (scGPT uses 10 with threshold 0.8)
    ecs_threshold: float = 0.8
    # InfoNCE between two masked views of each cell (doubles the rows of a batch). How a view is
    # cut from the cell: "genes" keeps a uniform random contrastive_view_genes of its gene tokens
    # (at 0.5 the batch keeps its tokens); "thinned" keeps a gene at quantile q of the cell's bins
    # with probability contrastive_view_genes ** (1 - q) and bins the kept genes anew, like a
    # shallower sequencing of the cell (low-expressed genes vanish first; 72% kept at 0.5).
    contrastive_weight: float = 0.0
    contrastive_temperature: float = 0.1
    contrastive_view: str = "genes"
    contrastive_view_genes: float = 0.5  # genes: the share kept; thinned: the lowest gene's chance
    vc_weight: float = 0.0  # VICReg's variance-covariance term on the cell embedding (0 = off)
    # Initial gene embeddings: "random" (normal, std 0.02) or "pca": the genes' loadings on the
    # principal axes of the training cells' bins (co-expressed genes start close together).
    gene_emb_init: str = "random"
    # A trained model folder whose weights this run starts from (its vocabulary must be the
    # shards'); this run's optimizer and schedule then train them. None: a new model.
    init_from: str | None = None
    seed: int = 0
    checkpoint_every_steps: int = 1000
    max_steps: int | None = None  # stop (with a checkpoint) after this many global steps
    bucket_size_batches: int = 100
    log_every_steps: int = 10
    compile: bool = False
    amp: str = "auto"  # auto: bf16 autocast on CUDA, fp32 elsewhere; or "bf16" / "fp32"
    num_threads: int | None = None
    device: str = "auto"  # auto: cuda if available; or "cpu" / "cuda"

    # Library-only: not in the schema (a Snakemake rule sets num_threads from its threads).
    LIBRARY_ONLY = ("max_steps", "num_threads")
    # How a run is operated, not its result: these may differ on resume.
    OPERATIONAL = (
        "max_steps",
        "checkpoint_every_steps",
        "log_every_steps",
        "compile",
        "num_threads",
    )

    SECTION = "train"

    def __post_init__(self):
        if self.gene_emb_init not in ("random", "pca"):
            raise ValueError(
                f"train.gene_emb_init must be 'random' or 'pca', not {self.gene_emb_init!r}"
            )
        for key in ("gepc_weight", "ecs_weight", "contrastive_weight", "vc_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(
                    f"train.{key} must be >= 0 (0 switches the term off), "
                    f"not {getattr(self, key)!r}"
                )
        if not self.contrastive_temperature > 0:
            raise ValueError(
                f"train.contrastive_temperature must be > 0, not {self.contrastive_temperature!r}"
            )
        if not 0 < self.contrastive_view_genes <= 1:
            raise ValueError(
                "train.contrastive_view_genes must be in (0, 1], "
                f"not {self.contrastive_view_genes!r}"
            )
        if self.contrastive_view not in CONTRASTIVE_VIEWS:
            raise ValueError(
                f"train.contrastive_view must be one of {CONTRASTIVE_VIEWS}, "
                f"not {self.contrastive_view!r}"
            )
        if self.gepc_targets not in GEPC_TARGETS:
            raise ValueError(
                f"train.gepc_targets must be one of {GEPC_TARGETS}, not {self.gepc_targets!r}"
            )
        if self.amp not in ("auto", "bf16", "fp32"):
            raise ValueError(f"train.amp must be auto, bf16 or fp32, not {self.amp!r}")
        if not self.mask_ratios or not all(0 < r < 1 for r in self.mask_ratios):
            raise ValueError(
                "train.mask_ratios must be a non-empty list of values in (0, 1), "
                f"not {self.mask_ratios}"
            )
        object.__setattr__(self, "mask_ratios", [float(r) for r in self.mask_ratios])

    def to_dict(self) -> dict:
        """The settings as a plain dict, e.g. to record in a checkpoint.

        Returns
        -------
        dict
            Field name -> value; ``from_dict`` reads it back.
        """
        return asdict(self)


@dataclass(frozen=True)
class SamplingConfig(_Section):
    """The ``census`` section's sampling: which cells (tissue_general, primary data, disease: None
    keeps every disease) and how many (whole samples at random while they fit under
    max_cells). The schema's default run sets disease: normal."""

    organism: str = "homo_sapiens"
    tissue_general: str = "blood"
    primary_only: bool = True
    disease: str | None = None
    max_cells: int = 300_000
    seed: int = 0
    chunk_size: int = CHUNK_SIZE  # cells read from the Census at a time

    SECTION = "census"


@dataclass(frozen=True)
class H5adConfig(_Section):
    """How your h5ad's cells become Census cells (``census.h5ad``, ``scllm build-census``): where
    each cell's dataset, donor and label come from, which genes and counts are read, and the
    Census values a store records where the file has no such obs column."""

    dataset_id: str | None = None  # one dataset for every cell (default: obs or the file name)
    dataset_title: str = ""
    donor_id: str | None = None  # one donor for every cell (default: obs.donor_id or donor_0)
    donor_column: str | None = None  # obs column holding each cell's donor
    cell_type_column: str | None = None  # obs column of cell-type labels (default: detected)
    gene_id_column: str | None = None  # var column of Ensembl ids (default: detected)
    counts_layer: str | None = None  # layer holding the raw counts (default: X)
    tissue_general: str = "blood"
    is_primary_data: bool = True
    disease: str = "normal"
    citation: str = ""
    organism: str = "homo_sapiens"

    # What census.h5ad (and sample_h5ad) sets: the rest comes from the sampling settings.
    COLUMNS = (
        "dataset_id",
        "donor_id",
        "donor_column",
        "cell_type_column",
        "gene_id_column",
        "counts_layer",
    )

    SECTION = "census.h5ad"


@dataclass(frozen=True)
class EvaluateConfig(_Section):
    """The ``evaluate`` section: how the cell embeddings are scored against the PCA baseline."""

    label_key: str = "cell_type"
    batch_key: str = "sample"
    max_cells: int = 50_000
    n_neighbors: int = 15
    n_folds: int = 5
    leiden_resolutions: list = field(default_factory=lambda: [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0])
    n_pcs: int = 50
    seed: int = 0

    SECTION = "evaluate"

    def to_dict(self) -> dict:
        """The settings as a plain dict.

        Returns
        -------
        dict
            Field name -> value; ``from_dict`` reads it back.
        """
        return asdict(self)


@dataclass(frozen=True)
class EmbedConfig:
    """The ``embed`` section plus what ``scllm embed`` adds for an arbitrary h5ad."""

    cells: str = "validation"  # which tokenized cells rule embed embeds: "validation" or "all"
    batch_size: int = 64  # cells per forward pass
    device: str = "auto"
    # scllm embed only (not in the schema):
    chunk_size: int = CHUNK_SIZE  # cells read at a time
    min_coverage: float = 0.5  # minimum fraction of vocabulary genes found in the input
    gene_id_column: str | None = None  # var column naming the genes (default: the best match)
    counts_layer: str | None = None  # layer holding the counts (default: X)

    LIBRARY_ONLY = ("chunk_size", "min_coverage", "gene_id_column", "counts_layer")


VALUE_ENCODERS = ("bins", "continuous")
CELL_EMB_STYLES = ("cls", "mean", "cls+mean", "sum")
# Derived from the data, not settable in the model section.
DATA_MODEL_KEYS = ("vocab_size", "n_bins", "pad_id", "mask_value", "pad_value")


@dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section, plus what the shards set (DATA_MODEL_KEYS)."""

    vocab_size: int  # genes + <cls> + <pad>
    n_bins: int = 51  # bins 0..n_bins-1 (0 = not expressed, also the <cls> value)
    n_layers: int = 12
    n_heads: int = 8
    d_model: int = 512
    d_ff: int = 512
    dropout: float = 0.2
    pad_id: int | None = None  # defaults to the last vocabulary entry (<pad>)
    mask_value: int = -1
    pad_value: int = -2
    norm_first: bool = True  # pre-norm (nanoGPT, more stable); False = post-norm as in scGPT
    # Dropout on attention weights; None = ``dropout`` (as scGPT). On CPU any value > 0 makes
    # SDPA fall back to its unfused kernel (about 8x slower at 800 tokens): use 0 for CPU demos.
    attn_dropout: float | None = None
    # How a value enters: "bins" = an embedding row per bin (categorical); "continuous" = scGPT's
    # ContinuousValueEncoder (the bin as a number through a small MLP).
    value_encoder: str = "bins"
    # How the cell embedding is read out: "cls", "mean" (of gene-token outputs), "cls+mean" or
    # "sum".
    cell_emb_style: str = "cls"
    # A SimCLR projection head for the contrastive term: the loss compares head(cell embedding),
    # so the embedding itself need not discard what the views disagree on. 0 = no head.
    contrastive_head_dim: int = 0

    @classmethod
    def from_dict(cls, settings: dict | None, manifest: dict) -> ModelConfig:
        """The ``model`` section for the shards of ``manifest``, which set the vocabulary and the
        token values (DATA_MODEL_KEYS); unknown settings are named.

        Parameters
        ----------
        settings : dict or None
            The ``model`` section's keys and values; None or missing keys: the defaults. A key
            of DATA_MODEL_KEYS may be given only with the value the shards set.
        manifest : dict
            The shards' manifest: ``vocab_size``, ``n_bins`` and ``pad_id`` (``mask_value`` and
            ``pad_value`` default to -1 and -2).

        Returns
        -------
        ModelConfig

        Raises
        ------
        ValueError
            An unknown key (named, with the known ones), a key of DATA_MODEL_KEYS that
            disagrees with the shards, or a value the model cannot take (e.g. ``d_model`` not
            divisible by ``n_heads``).
        """
        model_cfg = dict(settings or {})
        known = {f.name for f in fields(cls)} - set(DATA_MODEL_KEYS)
        unknown = set(model_cfg) - known - set(DATA_MODEL_KEYS)
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        data = {
            "vocab_size": manifest["vocab_size"],
            "n_bins": manifest["n_bins"],
            "pad_id": manifest["pad_id"],
            "mask_value": manifest.get("mask_value", -1),
            "pad_value": manifest.get("pad_value", -2),
        }
        for key in DATA_MODEL_KEYS:
            if key in model_cfg and model_cfg.pop(key) != data[key]:
                raise ValueError(
                    f"model.{key} is set by the shards ({data[key]}); "
                    "remove it from the model settings"
                )
        return cls(**data, **model_cfg)

    def __post_init__(self):
        # frozen: the defaults that depend on other fields are filled in once, here
        if self.pad_id is None:
            object.__setattr__(self, "pad_id", self.vocab_size - 1)
        if self.attn_dropout is None:
            object.__setattr__(self, "attn_dropout", self.dropout)
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.value_encoder not in VALUE_ENCODERS:
            raise ValueError(
                f"value_encoder must be one of {VALUE_ENCODERS}, not {self.value_encoder!r}"
            )
        if self.cell_emb_style not in CELL_EMB_STYLES:
            raise ValueError(
                f"cell_emb_style must be one of {CELL_EMB_STYLES}, not {self.cell_emb_style!r}"
            )
        if self.contrastive_head_dim < 0:
            raise ValueError(f"contrastive_head_dim must be >= 0, not {self.contrastive_head_dim}")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(
                f"pad_id={self.pad_id} is outside the vocabulary (size {self.vocab_size})"
            )
