"""Typed run configuration: defaults in pydantic models, overridden by a YAML file, then by CLI flags.

Precedence (lowest to highest): model defaults < ``--config run.yaml`` < ``--set key.sub=value``.
The resolved configuration is written next to every result so a run can be repeated exactly.
"""

from __future__ import annotations

import collections.abc
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from he2st.data.embeddings import DEFAULT_ENCODER, EmbedConfig
from he2st.data.genes import GeneConfig
from he2st.data.patches import PatchSpec
from he2st.data.readers import SampleSource
from he2st.data.workspace import default_work_dir
from he2st.encoders.adaptation import AdaptConfig, sweep_recipes
from he2st.errors import He2stError, for_validator, one_line
from he2st.io import comma_list, safe_name, table_path
from he2st.methods import method_class


class DataConfig(BaseModel):
    """Which samples ``he2st prepare`` reads: a registered dataset's sections, or samples of your own."""

    model_config = ConfigDict(extra="forbid")

    dataset: str | None = Field("her2st", description="registered dataset name, or null to use `samples`")
    sections: list[str] | None = Field(None, description="subset of the dataset's imaged sections")
    samples: list[SampleSource] = Field(
        default_factory=list, description="your own samples, each read by one reader (Visium, HEST, ST, ...)")
    samplesheet: Path | None = Field(None, description="CSV sample sheet (sample, patient, reader, path, image"
                                                       "[, pixel_size_um, spots_file]): its rows are added to samples")
    from_dir: Path | None = Field(None, description="add every Space Ranger outs/, HEST-1k root, legacy ST triple "
                                                    "and .h5ad found under this folder")

    @model_validator(mode="after")
    def _sheet_replaces_default_dataset(self) -> DataConfig:
        """A sample sheet or searched folder stands for the study: the default dataset is dropped unless set."""
        if (self.samplesheet or self.from_dir) and "dataset" not in self.model_fields_set:
            self.dataset = None
        return self


class FoldConfig(BaseModel):
    """How samples are dealt into test folds."""

    model_config = ConfigDict(extra="forbid")

    scheme: Literal["lopo", "loso"] = Field(
        "lopo", description="lopo: hold out one patient at a time; loso: one section at a time")
    allow_shared_patients: bool = Field(
        False, description="loso: keep the held-out section's sibling sections in training (folds labelled LEAKY)")


class WorkConfig(BaseModel):
    """Settings every pipeline step shares: the work folder and how patches were cut."""

    model_config = ConfigDict(extra="forbid")

    work_dir: Path = Field(
        default_factory=default_work_dir, description="work folder (default $HE2ST_WORK_DIR or ./he2st-work)")
    patch: PatchSpec = Field(default_factory=PatchSpec, description="how patches are cut around each spot")


class PrepareConfig(WorkConfig):
    """``he2st prepare``: which samples, how patches are cut, how folds are made."""

    data: DataConfig = Field(default_factory=DataConfig, description="which samples to read")
    folds: FoldConfig = Field(default_factory=FoldConfig, description="how test folds are made")
    context_field: bool = Field(
        True, description="also cut the context field (3x the spot's side, same centre) of every spot, for "
        "context_field methods")


class EmbedRunConfig(WorkConfig):
    """``he2st embed``: which patches (work folder + patch spec) and how to embed them."""

    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="encoder and how it runs")


class AdaptRunConfig(WorkConfig):
    """``he2st adapt``: which encoder is adapted, on which samples' patches, and how."""

    encoder: str = Field(DEFAULT_ENCODER, description="encoder preset or timm model name to adapt")
    weights: Path | None = Field(None, description="its local weights file or folder (default: the preset's, by name)")
    samples: list[str] | None = Field(
        None, description="samples whose patches are used, images only (default: every sample with a patch cache)")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="how the encoder is adapted")
    sweep: list[dict[str, Any]] = Field(
        default_factory=list, description="recipes adapted in turn, each `adapt` with these options changed, e.g. "
        "[{train_blocks: 2}, {train_blocks: 4}]")

    @field_validator("sweep")
    @classmethod
    def _valid_recipes(cls, value: list[dict[str, Any]], info: ValidationInfo) -> list[dict[str, Any]]:
        """Every entry must make a valid recipe, so a sweep is refused before its first adaptation."""
        if "adapt" in info.data:
            sweep_recipes(info.data["adapt"], value)
        return value

    def recipes(self) -> list[AdaptConfig]:
        """The adaptations to run: ``adapt``, or each entry of ``sweep`` applied to it."""
        return sweep_recipes(self.adapt, self.sweep)


C = TypeVar("C", bound=BaseModel)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping: PyYAML keeps the last silently, so a
    setting repeated further down a config file would override the one the user reads first."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, collections.abc.Hashable) and key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error as ``<problem> (line N)``: what is wrong and where, on one line."""
    problem = getattr(exc, "problem", None) or exc.__class__.__name__
    mark = getattr(exc, "problem_mark", None)
    return f"{problem} (line {mark.line + 1})" if mark is not None else str(problem)


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    if not all(key.strip() for key in keys):
        raise He2stError(f"cannot set {dotted!r}: a key must be a dotted name such as patch.field_um")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise He2stError(f"cannot set {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def _expand_home(model: BaseModel) -> None:
    """Every path setting starting with ``~`` taken from the home folder, as a shell would: a quoted
    ``work_dir: ~/he2st-work`` in a config file is otherwise a folder named ``~`` in the current one."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, BaseModel):
                _expand_home(item)
        if isinstance(value, Path) and value.parts and value.parts[0].startswith("~"):
            object.__setattr__(model, name, value.expanduser())
        elif isinstance(value, list) and any(isinstance(v, Path) for v in value):
            object.__setattr__(model, name, [v.expanduser() if isinstance(v, Path) else v for v in value])


def _from_command_line(loc: tuple, given: set[str]) -> bool:
    """Whether the setting at ``loc`` (or a section holding it) was given by ``--set`` or a flag."""
    dotted = [str(part) for part in loc]
    return any(dotted[:len(key.split("."))] == key.split(".") for key in given)


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None, **flags: object) -> C:
    """Build a config: defaults, then the YAML file, then ``key.sub=value`` overrides, then flags.

    Flags whose value is ``None`` are ignored (not given on the command line). A bad value given by
    ``--set`` or a flag is reported as such, not as the config file's.
    """
    tree: dict = {}
    if path is not None:
        path = table_path(path, "config file", empty_ok=True)  # a readable text file (YAML is text), else one line saying what it is
        try:
            tree = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader) or {}  # a SafeLoader
        except UnicodeDecodeError as exc:
            raise He2stError("invalid YAML (not UTF-8 text)", path) from exc
        except yaml.YAMLError as exc:
            raise He2stError(f"invalid YAML: {_yaml_problem(exc)}", path) from exc
        if not isinstance(tree, dict):
            raise He2stError("config file must contain a mapping", path)
    given: set[str] = set()
    for item in overrides or []:
        if "=" not in item:
            raise He2stError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise He2stError(f"--set {key}: value {raw!r} is not valid YAML ({_yaml_problem(exc)}); quote it "
                             "or write a list as [a, b]") from exc
        _set_dotted(tree, key, value)
        given.add(key)
    for key, value in flags.items():
        if value is not None:
            _set_dotted(tree, key, value)
            given.add(key)
    try:
        config = cls.model_validate(tree)
    except ValidationError as exc:
        where = None if _from_command_line(exc.errors()[0]["loc"], given) else path
        raise one_line(exc, "invalid setting", where, model=cls) from exc
    _expand_home(config)
    return config


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


class FitConfig(WorkConfig):
    """What fitting shares in ``train`` and ``benchmark``: features, panel, per-method options, validation."""

    embed: EmbedConfig = Field(default_factory=EmbedConfig, description="the features models are fitted on")
    genes: GeneConfig = Field(default_factory=GeneConfig, description="how the gene panel is chosen")
    method_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="options per method, name -> {option: value}, e.g. --set "
        "method_options.bleep.top_k=20")
    validation_fraction: float = Field(
        0.15, gt=0, lt=1, description="share of training spots/samples held out for early stopping")
    n_top: int = Field(50, gt=0, description="size of the HEG/HVG sets")
    seed: int = Field(0, description="seed of every method (unless its method_options set one) and of the validation split")
    reliability: bool | None = Field(
        None, description="estimate per-gene predictability, intervals, OOD flags on inner folds (None: >= 3 patients/samples)")
    unlabelled: list[str] = Field(
        default_factory=list, description="prepared samples whose images only join histology-only learning (carhe); "
        "'test': the held-out slides")
    engine: Literal["serial", "local", "ray"] = Field(
        "serial", description="run independent fits (benchmark tasks; a train's inner folds) one by one, in a "
        "process pool, or on Ray")
    workers: int = Field(2, ge=1, description="tasks run at once with engine local or ray")
    address: str | None = Field(None, description="Ray cluster address with engine ray (default: a local Ray instance)")
    task_threads: int | None = Field(
        None, ge=1, description="CPU threads per task (None: serial uses all, a pool shares the cores among its workers)")

    @field_validator("unlabelled", mode="before")
    @classmethod
    def _sample_list(cls, value: Any) -> Any:
        """A comma-separated string (``--set unlabelled=test``) is a list of one or more ids."""
        return (comma_list(value) or []) if isinstance(value, str) else value

    def wants_reliability(self, patients: dict[str, str]) -> bool:
        """Whether fits estimate their reliability: as set, else with at least 3 patients or samples."""
        if self.reliability is not None:
            return self.reliability
        return len(set(patients.values())) >= 3 or len(patients) >= 3

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
        """Method ``name``'s options in this run: the seed, those set, and for a method that chooses among views
        (the ensemble's ``view_variants: embedded``) the views this run embeds (``embed.views``)."""
        options = {"seed": self.seed} | self.method_options.get(name, {})
        if method_class(name).chooses_views and options.get("view_variants", "embedded") == "embedded":
            options["view_variants"] = list(self.embed.views)
        return options

    def needs_patches(self) -> bool:
        """Whether a method trains its image encoder end to end (then raw patches are loaded)."""
        return any(method_class(m)(**self.options_for(m)).uses_patches for m in self.fitted_methods())

    def needs_tokens(self) -> bool:
        """Whether token grids are loaded: they are cached (``embed.token_grid``) and a method uses them."""
        return bool(self.embed.token_grid) and any(method_class(m).uses_tokens for m in self.fitted_methods())

    def needs_views(self) -> list[str]:
        """The spot views (:mod:`he2st.data.views`) a method of this run may read, loaded beside the spots."""
        return list(dict.fromkeys(v for m in self.fitted_methods()
                                  for v in method_class(m)(**self.options_for(m)).reads_views))


class BenchmarkConfig(FitConfig):
    """``he2st benchmark``: methods x patient-level folds on a prepared, embedded work folder.

    TLS scoring (``tls``) compares each held-out sample's TLS score from predicted expression with the one
    from its measured counts (Pearson r, AUROC for its top-decile spots), beside a ridge probe from image
    features to the score, for methods that return the model's genes; it is skipped, with its reason in
    the results, when ``tls_model`` cannot be read. The default is her2st's 172-gene signature: the full
    published model (``'her2st'``, 11,315 genes) divides each gene by its spread across the section, which
    inflates the many weakly weighted genes of a smooth predicted map, and on her2st leave-one-patient-out
    it scores predictions below zero. A gene list file holds gene,weight rows (an 'intercept' row is the
    intercept).

    Cancer localisation (``localisation``) scores, on held-out samples with pathologist region labels, how
    well a biomarker score from predicted expression separates cancer from other tissue, beside the same
    from measured expression and an image-only probe (:mod:`he2st.evaluate.localisation`)."""

    name: str = Field("benchmark", description="results folder name under <work_dir>/runs/")
    folds: FoldConfig = Field(default_factory=FoldConfig, description="the fold scheme (prepared by `he2st prepare`)")
    methods: list[str] = Field(
        default_factory=lambda: ["ensemble", "bleep_faithful", "bleep", "ridge", "ridge_cv", "mlp", "knn"],
        description="methods to run over the folds (`he2st methods` lists them)")
    markers: list[str] | None = Field(
        None, description="marker genes scored as their own set (null: the dataset's default list, if any; []: none)")
    reference_sections: list[str] = Field(
        default_factory=list,
        description="expression-only her2st sections added to retrieval banks (only when their patient is not tested)",
    )
    ablation: bool = Field(
        False, description="also run each listed method with one of its components switched off at a time")
    ablation_only: list[str] | None = Field(
        None, description="with ablation: only these rows, as method names or row labels "
        "(carhe-no_celltype_transfer)")
    transcriptome_threshold: float | None = Field(
        0.1, ge=0, description="score retrieval methods beyond the panel on genes at least this expressed in "
        "training (None: skip)")
    tls: bool = Field(
        True, description="score TLS detection from predicted vs measured expression, beside an image ridge probe")
    tls_model: str = Field(
        "her2st-signature", description="TLS model: 'her2st-signature' (172 genes), 'her2st' (the full published "
        "model) or a gene,weight file")
    localisation: bool = Field(
        True, description="score cancer localisation on held-out samples with region labels (AUROC, AP; see docs)")
    localisation_signature: str | None = Field(
        None, description="biomarker signature for localisation: a name, a gene,weight file, or null for the dataset's")
    seeds: int = Field(1, gt=0, description="train each method with this many seeds and average the fold scores")
    learning_curve: list[float] = Field(
        default_factory=list, description="also refit on nested subsets of each fold's training data: whole numbers = "
        "patients, fractions = spot shares")
    inner_of: str | None = Field(
        None, description="run the folds over this fold's training samples only (nested cross-validation), e.g. "
        "patient_A")
    resume: bool = Field(
        True, description="reuse the tasks stored in the run folder whose settings, data and he2st code are unchanged")

    def fitted_methods(self) -> list[str]:
        return list(self.methods)

    @field_validator("learning_curve")
    @classmethod
    def _amounts(cls, value: list[float]) -> list[float]:
        """Whole numbers of patients (>= 1) or shares of spots (between 0 and 1), nothing else."""
        for amount in value:
            if not (0 < amount < 1 or (amount >= 1 and float(amount).is_integer())):
                raise ValueError(f"learning_curve amounts are whole numbers of patients or shares in (0, 1), got {amount}")
        return value

    @field_validator("localisation_signature")
    @classmethod
    def _readable_signature(cls, value: str | None) -> str | None:
        """A localisation signature that cannot be read is refused before any data is read."""
        if value is not None:
            from he2st.evaluate.localisation import read_signature  # sklearn: only when a signature is set

            for_validator(read_signature, value)
        return value

    @field_validator("name")
    @classmethod
    def _safe_run_name(cls, value: str) -> str:
        """The run folder's name: refused before anything runs if it could leave ``<work>/runs``."""
        return for_validator(safe_name, value, "run name")


class TrainRunConfig(FitConfig):
    """``he2st train``: one method on chosen training samples -> one checkpoint."""

    method: str = Field("ensemble", description="the method to train (`he2st methods` lists them)")
    train_samples: list[str] = Field(default_factory=list, description="training samples (default: every prepared "
                                     "sample)")
    out: Path | None = Field(None, description="checkpoint path (default <work_dir>/models/<method>.pt)")
    tissue: str | None = Field(None, description="tissue, disease and platform the model is for (model card; "
                               "default: from the dataset)")
    devices: int = Field(1, ge=1, description="training processes sharing each batch: CPU processes (gloo) or one "
                         "per GPU (NCCL)")
    transcriptome_threshold: float | None = Field(
        None, ge=0, description="retrieval methods: also keep every gene at least this expressed in training, for "
        "predict --genes")

    def fitted_methods(self) -> list[str]:
        return [self.method]
