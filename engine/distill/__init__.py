"""`engine distill`: optimize synthetic images against stored real features.

config.py (options and their validation) · loop.py (setup / step / finish) · backprop.py (the synthetic
side: augmented copies through the backbone, chunked back-propagation) · checkpoint.py · seeds.py ·
signals.py (Ctrl-C / SIGTERM).
"""

from engine.distill.backprop import SyntheticSide, resolve_copies_per_pass
from engine.distill.config import DistillConfig, DistillError, NonFiniteLossError
from engine.distill.loop import DistillResult, distill
from engine.distill.seeds import derived_seed, make_generators
from engine.distill.signals import DistillInterrupted

__all__ = ["DistillConfig", "DistillResult", "DistillError", "NonFiniteLossError", "DistillInterrupted", "distill",
           "SyntheticSide", "resolve_copies_per_pass", "make_generators", "derived_seed"]
