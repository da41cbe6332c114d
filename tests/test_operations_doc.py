"""docs/operations.md's settings tables are what the pydantic models say (docs/gen_settings.py writes
them): a setting added, renamed or redescribed without running the script fails here."""

from __future__ import annotations

from docs.gen_settings import DOC, all_env_names, current, render
from store.config import Settings
from trainer.settings import TrainerSettings


def test_the_settings_tables_are_current() -> None:
    stale = "docs/operations.md is out of date: run python docs/gen_settings.py"
    assert current(DOC.read_text()) == render(), stale


def test_every_setting_has_a_row() -> None:
    tables = current(DOC.read_text())
    for env in all_env_names(Settings) | all_env_names(TrainerSettings):
        assert f"`{env}`" in tables
