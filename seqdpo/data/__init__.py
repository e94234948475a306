"""Preference objectives: the dataset registry and the row contract every builder returns.

A builder turns one dataset (hub id at a pinned revision, or a local copy in the same schema) into
named objectives. Each objective has a `train` and an `eval` split of preference pairs, with columns:

    pair_id   str                   stable id, unique within the objective and split
    prompt    list[{role, content}] the conversation up to the response (ends with a user turn)
    chosen    list[{role, content}] one assistant message
    rejected  list[{role, content}] one assistant message

Builders raise `DataError` naming the file, the row and the column when the input is not what the
schema says.
"""

from seqdpo.data.registry import DATASETS, PAIR_COLUMNS, DatasetSpec, DataError, Objective, build_objectives, register

# The builders register themselves on import.
from seqdpo.data import helpsteer2, hh_rlhf, pku_saferlhf, synthetic, ultrafeedback  # noqa: F401

__all__ = ["DATASETS", "PAIR_COLUMNS", "DatasetSpec", "DataError", "Objective", "build_objectives", "register"]
