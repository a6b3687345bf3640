"""Readers that turn each technology's files into a :class:`~he2st.data.sample.Sample`.

Each reader is a module holding its options model, registered with ``@register_reader`` (see ``base``);
importing it below files it. ``SampleSource`` is the union of every registered reader's options, told
apart by the ``reader`` key, so ``data.samples`` in a configuration is parsed per reader.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Union

from pydantic import Field, TypeAdapter, ValidationError

from he2st.data.readers import h5ad, hest, st, visium, visium_hd, xenium  # noqa: F401  (fill the registry)
from he2st.data.readers.base import SourceOptions, list_readers, reader_options, register_reader
from he2st.data.sample import Sample
from he2st.errors import one_line

SampleSource = Annotated[
    Union[tuple(reader_options(name) for name in list_readers())],  # noqa: UP007 - built from the registry
    Field(discriminator="reader"),
]


def read_source(source: SourceOptions | Mapping[str, Any]) -> Sample:
    """Read one source: parsed options, or the mapping a configuration lists under ``data.samples``."""
    if not isinstance(source, SourceOptions):
        try:
            source = TypeAdapter(SampleSource).validate_python(source)
        except ValidationError as exc:
            raise one_line(exc, "invalid sample source") from exc
    return source.read()


__all__ = ["SampleSource", "SourceOptions", "list_readers", "read_source", "reader_options", "register_reader"]
