"""Typed run configuration: defaults in pydantic models, overridden by a YAML file, then by CLI flags.

Precedence (lowest to highest): model defaults < ``--config run.yaml`` < ``--set key.sub=value``.
The resolved configuration is written next to every result so a run can be repeated exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from he2st.data.embeddings import EmbedConfig
from he2st.data.genes import GeneConfig
from he2st.data.patches import PatchSpec
from he2st.data.readers import SampleSource
from he2st.errors import He2stError
from he2st.io import safe_name, table_path
from he2st.methods import method_class

WORK_DIR_ENV = "HE2ST_WORK_DIR"


def default_work_dir() -> Path:
    """Where prepared samples, patches, embeddings and runs go: ``$HE2ST_WORK_DIR`` or ``./he2st-work``."""
    return Path(os.environ.get(WORK_DIR_ENV, "he2st-work"))


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field("her2st", description="registered dataset name, or null to use `samples`")
    sections: list[str] | None = Field(None, description="subset of the dataset's imaged sections")
    samples: list[SampleSource] = Field(default_factory=list)


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
    """``he2st prepare``: which samples, how patches are cut, how folds are made."""

    data: DataConfig = Field(default_factory=DataConfig)
    folds: FoldConfig = Field(default_factory=FoldConfig)
    context_field: bool = Field(
        True, description="also cut the context field (3x the spot's side, same centre) for every spot; "
        "`he2st embed` then embeds it, and methods whose context_field option is on read it")


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
        path = table_path(path, "config file", empty_ok=True)  # a readable text file (YAML is text), else one line saying what it is
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
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
        where = ".".join(str(p) for p in first["loc"]) or "configuration"
        message = " ".join(str(first["msg"]).split())  # one line, whatever the validator wrote
        raise He2stError(f"invalid setting {where}: {message}", path) from exc


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class FitConfig(WorkConfig):
    """What fitting shares in ``train`` and ``benchmark``: features, panel, per-method options, validation."""

    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    genes: GeneConfig = Field(default_factory=GeneConfig)
    method_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="per-method option overrides, method name -> {option: value} "
        "(--set method_options.bleep.top_k=20); see `he2st methods NAME`",
    )
    validation_fraction: float = Field(0.15, gt=0, lt=1, description="of training spots/samples, for early stopping")
    n_top: int = Field(50, gt=0, description="size of the HEG/HVG sets")
    seed: int = 0

    @model_validator(mode="after")
    def _options_are_valid(self) -> FitConfig:
        """Unknown methods or options fail here, in one line, before any data is read."""
        for name, options in self.method_options.items():
            method_class(name)(**options)
        for name in self.fitted_methods():
            method_class(name)
        return self

    def fitted_methods(self) -> list[str]:
        """The methods this run fits (overridden by each run kind)."""
        return []

    def options_for(self, name: str) -> dict[str, Any]:
        return {"seed": self.seed} | self.method_options.get(name, {})

    def needs_patches(self) -> bool:
        """Whether a method trains its image encoder end to end (then raw patches are loaded)."""
        return any(method_class(m)(**self.options_for(m)).uses_patches for m in self.fitted_methods())

    def needs_tokens(self) -> bool:
        """Whether token grids are loaded: they are cached (``embed.token_grid``) and a method uses them."""
        return bool(self.embed.token_grid) and any(method_class(m).uses_tokens for m in self.fitted_methods())


class BenchmarkConfig(FitConfig):
    """``he2st benchmark``: methods x patient-level folds on a prepared, embedded work folder."""

    name: str = "benchmark"
    folds: FoldConfig = Field(default_factory=FoldConfig)
    methods: list[str] = Field(
        default_factory=lambda: ["ensemble", "bleep_faithful", "bleep", "ridge", "ridge_cv", "mlp", "knn"])
    markers: list[str] | None = Field(None, description="marker genes scored as their own set")
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
    tls: bool = Field(
        True, description="score TLS detection: for retrieval methods, each held-out sample's TLS score from "
        "predicted vs measured expression (Pearson r, AUROC for its top-decile spots), beside a ridge probe from "
        "image features to the score; skipped, with its reason in the results, when tls_model cannot be read")
    tls_model: str = Field(
        "her2st-signature", description="'her2st-signature' (the 172-gene TLS signature in the her2st dataset "
        "folder), 'her2st' (the published full model: 11,315 genes, each divided by its spread across the "
        "section, which inflates the many weakly weighted genes of a smooth predicted map -- on her2st LOPO it "
        "scores predictions below zero) or a weighted gene list file (gene, weight; an 'intercept' row is the "
        "intercept)")
    seeds: int = Field(1, gt=0, description="train each method with this many seeds and average the fold scores")
    inner_of: str | None = Field(
        None, description="run the folds of folds.scheme over the training samples of this fold only (e.g. "
        "patient_A): the inner loop of nested cross-validation, to choose options without its test patients",
    )

    def fitted_methods(self) -> list[str]:
        return list(self.methods)

    @field_validator("name")
    @classmethod
    def _safe_run_name(cls, value: str) -> str:
        """The run folder's name: refused before anything runs if it could leave ``<work>/runs``."""
        try:
            return safe_name(value, "run name")
        except He2stError as exc:
            raise ValueError(str(exc)) from exc


class TrainRunConfig(FitConfig):
    """``he2st train``: one method on chosen training samples -> one checkpoint."""

    method: str = "ensemble"
    train_samples: list[str] = Field(default_factory=list, description="default: every prepared sample")
    out: Path | None = Field(None, description="checkpoint path (default <work_dir>/models/<method>.pt)")
    tissue: str | None = Field(None, description="tissue, disease and platform the model is for (model card; default: "
                                                 "from the training samples' registered dataset)")
    devices: int = Field(1, ge=1, description="training processes, each stepping on its share of every batch: CPU "
                         "processes (gloo) or one per GPU (NCCL); under torchrun the launcher's count applies")

    def fitted_methods(self) -> list[str]:
        return [self.method]
