"""The base of the typed records one pipeline stage hands the next (pydantic models).

Its own module, not ``model_code.common``: the pretraining and the training loop also run in an
image without pydantic (the GPU machines'), and must import without it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pydantic

from model_code.common import atomic_write_json


class Record(pydantic.BaseModel):
    """Base of the typed records one stage hands the next (pydantic models: each field is checked
    against its type when a record is made, read or assigned): ``to_dict`` / ``from_dict``
    (unknown keys ignored, so a newer writer does not break an older reader), ``write`` / ``read``
    as JSON."""

    model_config = pydantic.ConfigDict(extra="ignore", validate_assignment=True, protected_namespaces=())

    def to_dict(self) -> dict:
        return self.model_dump()

    @classmethod
    def from_dict(cls, data: dict):
        return cls.model_validate(data)

    def write(self, path: str | os.PathLike) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def read(cls, path: str | os.PathLike):
        return cls.from_dict(json.loads(Path(path).read_text()))
