"""The base class of every recipe section (kept apart so method modules can define their own
sections without importing the whole recipe schema)."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """Unknown keys are errors; values are validated on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
