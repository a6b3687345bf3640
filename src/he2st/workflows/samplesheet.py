"""The sections a prepare run takes from a sample sheet (``data.samplesheet``) or a searched folder
(``data.from_dir``), checked as sample sources, and the sheet written into the work folder so the run can
be repeated from it (``he2st prepare --samplesheet <work>/samplesheet.csv``)."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from he2st.data.readers import SampleSource, SourceOptions, reader_options
from he2st.data.samplesheet import discover_sources, read_samplesheet, with_default_patients, write_samplesheet
from he2st.errors import He2stError, one_line

SHEET_NAME = "samplesheet.csv"


def sheet_sources(samplesheet: Path | None, from_dir: Path | None,
                  work_dir: Path | None = None) -> list[SourceOptions]:
    """Sources of the sheet and of the searched folder (patients defaulting to the sample, with a warning);
    a column a row leaves empty is not given to its reader. The search leaves out ``work_dir``, the work
    folder being prepared, which may lie inside ``from_dir``."""
    sources: list[SourceOptions] = []
    adapter = TypeAdapter(SampleSource)
    search = partial(discover_sources, work_dir=work_dir)
    for where, found in ((samplesheet, read_samplesheet), (from_dir, search)):
        if where is None:
            continue
        for raw in with_default_patients(found(where), where):
            try:
                reader_options(str(raw.get("reader", "")))
            except He2stError as exc:
                raise He2stError(f"sample {raw.get('sample_id')!r}: {exc.problem}", where) from exc
            try:
                sources.append(adapter.validate_python({k: v for k, v in raw.items() if v not in (None, "")}))
            except ValidationError as exc:
                raise one_line(exc, f"sample {raw.get('sample_id')!r}", where) from exc
    return sources


def save_sheet(work_dir: Path, sources: list[SourceOptions]) -> Path:
    """The sheet these sources make, as ``<work_dir>/samplesheet.csv``."""
    return write_samplesheet(Path(work_dir) / SHEET_NAME,
                             [{"reader": s.reader} | s.model_dump(mode="json", exclude_defaults=True) for s in sources])
