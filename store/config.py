"""Settings shared by every datadiet process, read from ``DATADIET_*`` environment variables (and ``.env``).

One ``Settings`` object per process, validated at start-up; every field has a working default. The
trainer extends it with its own knobs (``trainer.settings.TrainerSettings``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from store.keys import Keys

TEXT_MODEL_KINDS = frozenset({"tiny-gpt"})
VECTOR_MODEL_KINDS = frozenset({"mlp"})
CHAT_MODEL_KINDS = frozenset({"hf-causal-lm"})  # text, and conversations rendered by a chat template


def configuration_error(e: BaseException) -> str | None:
    """A setting that cannot be used, said in one line as the variables that hold it:
    ``invalid setting DATADIET_X='v': why; DATADIET_Y=...``. None for any other error (the caller says it
    its own way). For pydantic's ValidationError of a ``*Settings`` class and ``BadRedisURL``."""
    from pydantic import ValidationError

    from store.redis_client import BadRedisURL

    if isinstance(e, BadRedisURL):
        return f"invalid setting {e}"
    if isinstance(e, ValidationError) and e.title.endswith("Settings"):
        problems = []
        for err in e.errors():
            name = str(err["loc"][0]).upper() if err["loc"] else "?"  # a field, or an alias (DATADIET_...)
            name = name if name.startswith("DATADIET_") else f"DATADIET_{name}"
            problems.append(f"{name}={err.get('input')!r}: {err['msg']}")
        return "invalid setting " + "; ".join(problems)
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DATADIET_", env_file=".env", extra="ignore")

    redis_url: str | None = Field(None, description="unset: an embedded Redis server under the data dir")
    database_url: str | None = Field(None, description="unset: sqlite:///<data dir>/meta.db")
    data_dir: Path = Field(
        Path("./datadiet-data"),
        description="checkpoints, the embedded Redis's files and the default SQLite database",
    )
    redis_prefix: str = Field(
        "dd",
        pattern=r"^[A-Za-z0-9_.-]{1,32}$",
        description="every Redis key starts with {prefix}: (store/keys.py); several deployments can share "
        "one Redis under different prefixes",
    )

    model: str = Field("tiny-gpt", description="model kind: tiny-gpt, mlp or hf-causal-lm")
    model_params: dict[str, Any] = Field(
        default_factory=dict,
        validation_alias=AliasChoices("DATADIET_MODEL_CONFIG", "model_params"),
        description='JSON for the model kind, e.g. {"n_features": 64, "n_classes": 10} for mlp',
    )
    input_kind: Literal["text", "vector", "chat", "auto"] = Field(
        "auto",
        description="what `input` a sample must carry (chat: a string or a list of messages); "
        "auto: from the model kind",
    )
    reweight: str = Field(
        "bilevel", description="bilevel, or uniform (every live sample weight 1: the ablation baseline)"
    )

    buffer_max_samples: int = Field(
        1_000_000, ge=1, description="samples the buffer holds; past it the lowest-weighted are evicted"
    )
    buffer_shards: int = Field(
        1,
        ge=1,
        le=16,
        description="hash tags ({prefix:0} ...) one buffer is split over, by a hash of the sample id, so a "
        "Redis Cluster spreads it over several masters; each shard evicts down to ceil(capacity / shards). "
        "1: every key under {prefix} (docs/scaling.md). Changing it needs an empty buffer: the API and the "
        "trainer must agree",
    )
    validation_max_samples: int = Field(100_000, ge=1, description="samples the validation set may hold")

    max_steps: int = Field(
        0,
        ge=0,
        description="after this many steps the trainer writes a final checkpoint and exits 0; 0: run until "
        "stopped",
    )
    checkpoint_every: int = Field(250, ge=1, description="steps between published checkpoints")
    seed: int = Field(0, description="makes a run repeatable")
    api_keys: str | None = Field(
        None,
        description="key:scope1+scope2,... (scopes ingest, read, admin); unset: no auth, and the API binds "
        "to 127.0.0.1 only",
    )

    # how long the API waits on its dependencies and on its clients (seconds)
    redis_timeout: float = Field(
        1.0, gt=0, description="seconds the API waits for one Redis command (or to connect) before a 503"
    )
    database_timeout: float = Field(
        1.0,
        gt=0,
        description="seconds the API waits for the database in a request (pool, connect, query) before a "
        "503; also its server-side statement_timeout on PostgreSQL (the trainer's engine has none)",
    )
    request_body_timeout: float = Field(
        10.0, gt=0, description="seconds the API waits for the next piece of a request body before a 408"
    )

    auto_migrate: bool = Field(
        True,
        description="the API, the trainer and `datadiet up` (once, for its children) upgrade the database "
        "schema at start; false: only `datadiet migrate` does, and a process whose schema is behind refuses "
        "to start (docker-compose.yml runs `migrate` as a one-shot service before the others)",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one readable line per record; json: one JSON object per line (time, level, "
        "logger, message, and request_id on the API's lines), for a log collector",
    )

    @field_validator("model_params", mode="before")
    @classmethod
    def _parse_json(cls, v: Any) -> Any:
        if isinstance(v, str):
            import json

            return json.loads(v) if v.strip() else {}
        return v

    @property
    def keys(self) -> Keys:
        """This deployment's Redis key names (``redis_prefix``, ``buffer_shards``)."""
        return Keys(self.redis_prefix, self.buffer_shards)

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'meta.db').resolve()}"

    @property
    def resolved_input_kind(self) -> Literal["text", "vector", "chat", "any"]:
        if self.input_kind != "auto":
            return self.input_kind
        if self.model in TEXT_MODEL_KINDS:
            return "text"
        if self.model in CHAT_MODEL_KINDS:
            return "chat"
        if self.model in VECTOR_MODEL_KINDS:
            return "vector"
        return "any"

    def ensure_data_dir(self) -> Path:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return self.data_dir
