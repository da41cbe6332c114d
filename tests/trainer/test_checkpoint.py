import json
import pickle
from pathlib import Path

import pytest
import safetensors.torch
import torch

from store.checkpoints import checkpoint_path, sha256_file
from trainer import load_checkpoint
from trainer.checkpoint import CheckpointError, save_checkpoint
from trainer.models import TrainModel, build_model, register
from trainer.models.mlp import MLP

TEXT = [
    {"input": "2+3=", "target": "5"},
    {"input": "hello", "target": "world"},
    {"input": "x" * 100, "target": "long input"},
]
VECTORS = [{"input": [0.5, -1.0, 2.0], "target": 1}, {"input": [0.0, 0.0, 0.0], "target": 0}]


@register("test-checkpoint-kind")
def build_user_kind(config: dict) -> TrainModel:
    return MLP({"n_features": 3, "n_classes": 2, "hidden": [4], **config})


def _save(tmp_path: Path, kind: str = "tiny-gpt", version: int = 3) -> tuple[Path, str, TrainModel]:
    torch.manual_seed(0)
    if kind == "tiny-gpt":
        model = build_model(kind, {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 24})
    else:
        model = build_model(kind, {"n_features": 3, "n_classes": 2, "hidden": [8]})
    path = checkpoint_path(tmp_path, version)
    meta = {
        "step": 120,
        "version": version,
        "settings": {"reweight": "bilevel"},
        "metrics": {"val_loss": 1.5},
    }
    sha, size = save_checkpoint(path, model, meta)
    assert size == path.stat().st_size and sha == sha256_file(path)
    return path, sha, model


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind, samples", [("tiny-gpt", TEXT), ("mlp", VECTORS)])
def test_round_trip_gives_identical_predictions_and_losses(tmp_path: Path, kind: str, samples: list) -> None:
    path, sha, model = _save(tmp_path, kind)
    loaded = load_checkpoint(path, sha256=sha)
    assert (loaded.kind, loaded.step, loaded.version) == (kind, 120, 3)
    assert loaded.config == model.config
    assert loaded.settings == {"reweight": "bilevel"}
    assert json.loads(loaded.metadata["datadiet.metrics"]) == {"val_loss": 1.5}
    inputs = [s["input"] for s in samples]
    assert loaded.predict(inputs) == model.predict(inputs)
    with torch.no_grad():
        expected = model.per_sample_loss(model.collate(samples)).tolist()
    assert loaded.loss(samples) == expected


def test_user_kind_round_trips_by_its_import_path(tmp_path: Path) -> None:
    kind = f"{__name__}:build_user_kind"
    model = build_model(kind, {"hidden": [5]})
    path = tmp_path / "user.safetensors"
    save_checkpoint(path, model, {"step": 1, "version": 1})
    loaded = load_checkpoint(path)
    assert loaded.kind == kind and loaded.config["hidden"] == [5]
    assert loaded.predict([s["input"] for s in VECTORS]) == model.predict([s["input"] for s in VECTORS])


def test_checkpoint_path_layout(tmp_path: Path) -> None:
    assert checkpoint_path(tmp_path, 42) == tmp_path / "checkpoints" / "v00000042.safetensors"


def test_flipped_byte_in_data_section_is_rejected_with_and_without_sha(tmp_path: Path) -> None:
    path, sha, _ = _save(tmp_path)
    _flip_byte(path, path.stat().st_size - 5)  # the last tensor's bytes
    with pytest.raises(CheckpointError, match="tensors_sha256"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="sha256 is"):
        load_checkpoint(path, sha256=sha)


def test_wrong_sha256_is_rejected(tmp_path: Path) -> None:
    path, _, _ = _save(tmp_path)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, sha256="0" * 64)


def test_sha256_may_be_given_as_a_quoted_etag(tmp_path: Path) -> None:
    path, sha, _ = _save(tmp_path)
    assert load_checkpoint(path, sha256=f'"{sha.upper()}"').version == 3


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -7])
def test_truncated_file_is_rejected(tmp_path: Path, keep: int) -> None:
    path, _, _ = _save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)


def test_garbled_header_is_rejected(tmp_path: Path) -> None:
    path, _, _ = _save(tmp_path)
    _flip_byte(path, 8)  # '{' of the JSON header
    with pytest.raises(CheckpointError, match="garbled"):
        load_checkpoint(path)


def test_missing_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_plain_safetensors_without_datadiet_metadata_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="datadiet metadata"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind", ["resnet-9000", "os:system"])
def test_unknown_kind_is_rejected_naming_the_file(tmp_path: Path, kind: str) -> None:
    path, _, _ = _save(tmp_path, "mlp")
    meta = load_checkpoint(path).metadata | {"datadiet.kind": kind}
    safetensors.torch.save_file(safetensors.torch.load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="model kind") as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, sha, _ = _save(tmp_path)
    assert not path.read_bytes().startswith(b"\x80")  # no pickle protocol marker, nor a zip archive
    assert not path.read_bytes().startswith(b"PK")

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("unpickling is forbidden")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    assert load_checkpoint(path, sha256=sha).version == 3


def test_save_leaves_only_the_final_file(tmp_path: Path) -> None:
    path, _, _ = _save(tmp_path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]
