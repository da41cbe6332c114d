"""Model kinds by name.

A kind is a factory ``factory(config: dict) -> TrainModel`` registered under a name::

    @register("my-kind")
    class MyModel(TrainModel): ...          # a TrainModel class is a factory too

``build_model(kind, config)`` takes a registered name, or ``"package.module:factory"``: the module is
imported (so its ``@register`` runs) and the factory it names is used. The model's ``kind`` is the
string it was built from, and checkpoints store it: a kind registered in your own module loads in a
fresh process only by its import path (or after you import that module). The named object must be a
registered factory: a checkpoint header is data, and must not be able to call arbitrary functions.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast, get_args

from trainer.models.base import InputKind, TrainModel
from trainer.models.mlp import MLP
from trainer.models.tiny_gpt import TinyGPT

Factory = Callable[[dict[str, Any]], TrainModel]
F = TypeVar("F", bound=Callable[..., Any])

_FACTORIES: dict[str, Factory] = {}
_INPUT_KINDS = get_args(InputKind)


class UnknownModelKind(ValueError):
    """The kind is neither registered nor an importable registered ``package.module:factory``."""


def register(name: str, *, input_kind: InputKind | None = None) -> Callable[[F], F]:
    """Decorator: register ``factory`` under ``name``. ``input_kind`` is needed only for plain functions
    (a TrainModel subclass already carries it) and lets ``input_kind_of`` answer without building."""
    if not name or ":" in name:
        raise ValueError(f"model kind name must be non-empty and without ':', got {name!r}")
    if input_kind is not None and input_kind not in _INPUT_KINDS:
        raise ValueError(f"input_kind must be one of {_INPUT_KINDS}, got {input_kind!r}")

    def decorate(factory: F) -> F:
        old = _FACTORIES.get(name)
        if old is not None and _qualified(old) != _qualified(factory):  # same name re-run on reload is fine
            raise ValueError(f"model kind {name!r} is already registered to {_qualified(old)}")
        if input_kind is not None:
            factory.input_kind = input_kind  # type: ignore[attr-defined]
        _FACTORIES[name] = factory
        return factory

    return decorate


def known_kinds() -> list[str]:
    return sorted(_FACTORIES)


def resolve_factory(kind: str) -> Factory:
    """The factory for a registered name or a ``package.module:factory`` path."""
    if kind in _FACTORIES:
        return _FACTORIES[kind]
    if ":" not in kind:
        raise UnknownModelKind(
            f"unknown model kind {kind!r}; known kinds: {', '.join(known_kinds())} "
            "(or 'package.module:factory' for a factory registered in your own module)"
        )
    module_name, _, attr = kind.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UnknownModelKind(f"model kind {kind!r}: cannot import module {module_name!r}: {e}") from e
    factory = getattr(module, attr, None)
    if factory is None or not any(factory is f for f in _FACTORIES.values()):
        raise UnknownModelKind(
            f"model kind {kind!r}: {module_name}.{attr} is not a factory registered with "
            "@trainer.models.register(name)"
        )
    return factory


def build_model(kind: str, config: Mapping[str, Any]) -> TrainModel:
    """A fresh model of ``kind`` from ``config`` (missing keys take the kind's defaults)."""
    if not isinstance(config, Mapping):
        raise TypeError(f"model config must be a JSON object, got {type(config).__name__}")
    model = resolve_factory(kind)(dict(config))
    if not isinstance(model, TrainModel):
        raise TypeError(f"model kind {kind!r}: factory returned {type(model).__name__}, not a TrainModel")
    if model.input_kind not in _INPUT_KINDS:
        raise TypeError(f"model kind {kind!r}: input_kind must be one of {_INPUT_KINDS}")
    model.kind = kind  # what rebuilds it: a checkpoint stores this string
    return model


def input_kind_of(kind: str) -> InputKind:
    """Whether ``kind`` takes ``"text"`` or ``"vector"`` inputs, without building a model."""
    value = getattr(resolve_factory(kind), "input_kind", None)
    if value not in _INPUT_KINDS:
        raise ValueError(f"model kind {kind!r} does not declare input_kind (register(..., input_kind=...))")
    return cast(InputKind, value)


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


register("tiny-gpt")(TinyGPT)
register("mlp")(MLP)


@register("hf-causal-lm", input_kind="text")
def hf_causal_lm(config: dict[str, Any]) -> TrainModel:
    """A Hugging Face causal LM (trainer/models/hf_causal_lm.py); transformers is imported here, on first
    use, so the core imports without the ``hf`` extra."""
    from trainer.models.hf_causal_lm import HFCausalLM

    return HFCausalLM(config)


__all__ = [
    "Factory",
    "InputKind",
    "TrainModel",
    "UnknownModelKind",
    "build_model",
    "input_kind_of",
    "known_kinds",
    "register",
    "resolve_factory",
]
