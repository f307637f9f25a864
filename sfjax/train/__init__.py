"""Training: KTO on LoRA adapters (:mod:`sfjax.train.kto`; its config :mod:`.kto_config`, its
TensorBoard events and progress bar :mod:`.kto_logging`), its jitted step (:mod:`.step`), its
forward passes (:mod:`.forward`: shared prompt prefix, remat, chunked LM head) and its data
pipeline (:mod:`.data`)."""

from sfjax.train.data import KTOExample
from sfjax.train.kto import KTOConfig, KTOTrainer

__all__ = ["KTOConfig", "KTOExample", "KTOTrainer"]
