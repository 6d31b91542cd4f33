"""Reading preference data: sources, formats and the report of what was dropped or altered."""

from preftune.data.formats import BadRecord, PreferencePair, normalize_record, split_transcripts
from preftune.data.report import DataError, DataReport
from preftune.data.sources import load_pairs, read_records

__all__ = [
    "BadRecord",
    "DataError",
    "DataReport",
    "PreferencePair",
    "load_pairs",
    "normalize_record",
    "read_records",
    "split_transcripts",
]
