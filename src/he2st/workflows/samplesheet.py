"""The sections a prepare run takes from a sample sheet (``data.samplesheet``) or a searched folder
(``data.from_dir``), checked as sample sources, and the sheet written into the work folder so the run can
be repeated from it (``he2st prepare --samplesheet <work>/samplesheet.csv``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from he2st.data.readers import SampleSource
from he2st.data.samplesheet import discover_sources, read_samplesheet, with_default_patients, write_samplesheet
from he2st.errors import He2stError

SHEET_NAME = "samplesheet.csv"


def sheet_sources(samplesheet: Path | None, from_dir: Path | None) -> list[SampleSource]:
    """Sources of the sheet and of the searched folder (patients defaulting to the sample, with a warning)."""
    sources: list[SampleSource] = []
    for where, found in ((samplesheet, read_samplesheet), (from_dir, discover_sources)):
        if where is None:
            continue
        for raw in with_default_patients(found(where), where):
            try:
                sources.append(SampleSource(**raw))
            except ValidationError as exc:
                first = exc.errors()[0]
                field = ".".join(str(p) for p in first["loc"]) or "row"
                raise He2stError(f"sample {raw.get('sample_id')!r}: {field}: {' '.join(str(first['msg']).split())}",
                                 where) from exc
    return sources


def save_sheet(work_dir: Path, sources: list[SampleSource]) -> Path:
    """The sheet these sources make, as ``<work_dir>/samplesheet.csv``."""
    return write_samplesheet(Path(work_dir) / SHEET_NAME,
                             [s.model_dump(mode="json", exclude_defaults=True) for s in sources])
