"""Facts in, training text out: the synthetic world, EasyEdit records and corpora."""

from knowedit.data.records import (
    EditRequest,
    Example,
    RecordError,
    load_records,
    read_examples,
    request_from_dict,
    requests_from,
    true_fact_examples,
    write_jsonl,
)
from knowedit.data.world import FactWorld, make_world

__all__ = [
    "EditRequest",
    "Example",
    "FactWorld",
    "RecordError",
    "load_records",
    "read_examples",
    "make_world",
    "request_from_dict",
    "requests_from",
    "true_fact_examples",
    "write_jsonl",
]
