"""datadiet trainer. The public API is the checkpoint loader::

from trainer import load_checkpoint
model = load_checkpoint("checkpoints/v00000003.safetensors", sha256=None)
model.predict(["2+3="])
"""

from trainer.checkpoint import load_checkpoint

__all__ = ["load_checkpoint"]
