"""Ready-made models: named entries saying what each model was trained on and where it must not be used,
and how to get it -- hosted weights (``files``: URL and sha256 of each file) or a ``recipe`` that
``he2st train`` follows reproducibly (a registered dataset or listed samples, a method, settings, a seed).

Entries are filed with :func:`register_model`, as readers are with ``@register_reader``. This module holds
plain data only, so ``he2st models list`` answers without importing torch; fetching, building and caching
an entry is :mod:`he2st.workflows.model_cache`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from he2st.errors import He2stError, for_validator
from he2st.io import safe_name
from he2st.version import __version__

if TYPE_CHECKING:
    from he2st.workflows.config import PrepareConfig, TrainRunConfig

CHECKPOINT = "model.pt"
# fields of `he2st train` a recipe sets itself (method, seed) or that name this machine's paths
RECIPE_OWNS = ("method", "seed", "work_dir", "out", "train_samples")


class HostedFile(BaseModel):
    """One downloadable file of a hosted model: the checkpoint, or a bank saved beside it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = Field(description="where the file is downloaded from (https://, or file:// for a local mirror)")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="the file's sha256: a download that differs is refused")
    name: str = Field(CHECKPOINT, description="its name in the model's cache folder: model.pt or a bank beside it")

    @field_validator("name")
    @classmethod
    def _safe(cls, value: str) -> str:
        """The name becomes a file in the cache folder: nothing that could leave it."""
        return for_validator(safe_name, value, "hosted file name")


class Recipe(BaseModel):
    """How ``he2st models build`` makes a model: prepare these samples, then ``he2st train`` with these settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str | None = Field("her2st", description="registered dataset (he2st data list), or None to use samples")
    sections: tuple[str, ...] | None = Field(None, description="the dataset's sections (default: every imaged one)")
    samples: tuple[dict[str, Any], ...] = Field(
        (), description="own sample sources, each as one entry of `he2st prepare`'s data.samples")
    method: str = Field("ensemble", description="the method `he2st train` fits (`he2st methods` lists them)")
    settings: dict[str, Any] = Field(
        default_factory=dict, description="further `he2st train` settings (TrainRunConfig fields, nested)")
    seed: int = Field(0, description="seed of the method and of the validation split")

    @model_validator(mode="after")
    def _settings_leave_the_recipe_its_own(self) -> Recipe:
        """Method and seed are the recipe's fields; paths are the cache's: settings may set neither."""
        taken = sorted(set(self.settings) & set(RECIPE_OWNS))
        if taken:
            raise ValueError(f"settings may not set {', '.join(taken)} (the recipe's own fields or the cache's paths)")
        if not self.dataset and not self.samples:
            raise ValueError("a recipe needs a dataset or samples")
        return self

    def digest(self) -> str:
        """sha256 of the recipe as canonical JSON: recorded with every model built from it."""
        text = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def prepare_config(self, work_dir: Path) -> PrepareConfig:
        """``he2st prepare``'s settings: the recipe's samples, patches cut as training reads them."""
        from he2st.workflows.config import PrepareConfig

        train = self.train_config(work_dir, work_dir / CHECKPOINT)
        return PrepareConfig(work_dir=work_dir, patch=train.patch, data={
            "dataset": self.dataset, "sections": list(self.sections) if self.sections else None,
            "samples": list(self.samples)})

    def train_config(self, work_dir: Path, out: Path, samples: list[str] | None = None) -> TrainRunConfig:
        """``he2st train``'s settings: the recipe's method, seed and settings on ``samples`` (default: every
        sample prepared in ``work_dir``; a resumed build names those this recipe prepared)."""
        from pydantic import ValidationError

        from he2st.errors import one_line
        from he2st.workflows.config import TrainRunConfig

        try:
            return TrainRunConfig.model_validate({**self.settings, "method": self.method, "seed": self.seed,
                                                  "work_dir": work_dir, "out": out,
                                                  "train_samples": samples or []})
        except ValidationError as exc:
            raise one_line(exc, "invalid recipe setting") from exc

    def summary(self) -> str:
        """One line: what is trained on what."""
        if self.dataset:
            data = f"{self.dataset} sections {', '.join(self.sections)}" if self.sections else \
                f"every imaged {self.dataset} section"
        else:
            data = f"{len(self.samples)} listed samples"
        settings = json.dumps(self.settings, sort_keys=True) if self.settings else f"the defaults of he2st {__version__}"
        return f"he2st train {self.method} on {data}, seed {self.seed}, settings: {settings}"


class ModelEntry(BaseModel):
    """A ready-made model: what it is, what it was trained on, where not to use it, and how to get it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(description="the model's name (he2st predict --model NAME)")
    description: str = Field(description="one line: what the model predicts from what")
    trained_on: str = Field(description="one line: the data it was trained on (tissue, patients, platform, lab)")
    not_for: str = Field(description="one line: where it should not be used")
    recipe: Recipe | None = Field(None, description="how `he2st models build` makes it (None: hosted weights only)")
    files: tuple[HostedFile, ...] = Field((), description="hosted weights: the checkpoint and any banks beside it")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        """The name is the model's cache folder."""
        return for_validator(safe_name, value, "model name")

    @model_validator(mode="after")
    def _one_source(self) -> ModelEntry:
        """Either hosted files (one of them the checkpoint, names unique) or a recipe, never both or neither."""
        if (self.recipe is None) == (not self.files):
            raise ValueError("a model entry has either a recipe or hosted files")
        names = [f.name for f in self.files]
        if self.files and (CHECKPOINT not in names or len(set(names)) != len(names)):
            raise ValueError(f"hosted files need one {CHECKPOINT} and unique names")
        return self

    @property
    def source(self) -> str:
        return "recipe" if self.recipe is not None else "hosted"

    def fingerprint(self) -> dict[str, str]:
        """What a cached copy must match to stand for this entry: the hosted files' checksums, or the recipe's
        digest and the he2st version that builds it."""
        if self.recipe is None:
            return {"files": ",".join(f"{f.name}:{f.sha256}" for f in sorted(self.files, key=lambda f: f.name))}
        return {"recipe": self.recipe.digest(), "he2st": __version__}


MODELS: dict[str, ModelEntry] = {}


def register_model(entry: ModelEntry) -> ModelEntry:
    """File ``entry`` under its name (once)."""
    if entry.name in MODELS:
        raise ValueError(f"model {entry.name!r} is registered twice")
    MODELS[entry.name] = entry
    return entry


def list_models() -> list[str]:
    return sorted(MODELS)


def get_model(name: str) -> ModelEntry:
    """The entry called ``name``, else one line naming the registered ones (and the closest)."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise He2stError(f"no ready-made model {name!r} (registered: {', '.join(list_models())}; `he2st models "
                         f"list`){hint}")
    return MODELS[name]


register_model(ModelEntry(
    name="her2st-breast",
    description="the default ensemble on the default encoder: H&E -> the 250 most expressed genes at 100 µm spots",
    trained_on="her2st (Andersson et al. 2021): the 7 imaged sections (A1, B4, C2-C6) of 3 HER2+ breast cancer "
               "patients, legacy ST, one lab's staining and scanner",
    not_for="other tissues or cancer types, HER2-negative breast cancer, other stains or scanners unchecked, "
            "finer than 100 µm spots, or any clinical decision",
    recipe=Recipe(dataset="her2st", method="ensemble", seed=0),
))
