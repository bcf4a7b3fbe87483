"""`engine distill`: optimize synthetic images against stored real features.

config.py (options and their validation) · loop.py (setup / step / steps / finish) · prepare.py
(the checks and loads before the first step, building the `Run` of run.py) · members.py (one per
backbone) · outdir.py (--out: file names and rules) · memory.py · backprop.py (the synthetic
side: augmented copies through the backbone, chunked back-propagation) · checkpoint.py · seeds.py ·
signals.py (Ctrl-C / SIGTERM).

Several processes (torchrun): launched with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT set and
WORLD_SIZE > 1, `distill` joins the process group (NCCL on cuda:LOCAL_RANK, gloo on the CPU). Every rank
holds the same full synthetic parameters, the same generators and seeds, and so draws the same random
head, the augmentation parameters of all M copies (it uses its own share; drawing all keeps the random
streams those of one process) and the same real batch; every rank loads the store's features itself
(the store must be readable from every node; nothing big is broadcast). Loss and image gradients are
those of one process up to floating-point summation order, so a checkpoint resumes under any world size
(bit for bit under the same one). Rank 0 alone writes config.json, metrics.jsonl, checkpoints and
outputs and shows the progress bar; with --resume every rank reads the checkpoint (--out must be on a
filesystem all ranks see). Setup errors are agreed on before anything is written: every rank stops, the
failing one with its message. Ctrl-C / SIGTERM (torchrun forwards them to every rank) only set a flag;
the flags are combined at the step's gradient reduction, so all ranks stop at the same step, rank 0
saves the checkpoint and every rank raises `DistillInterrupted`. A non-finite loss is likewise decided
collectively. A rank that dies (killed, crashed) fails the others' next collective: each stops with one
line (`featurestore.distributed.PeerLostError`) naming it and how to resume, and writes nothing more, so
the last checkpoint stands. With --real-source images every rank computes the whole real batch's features.
"""

from engine.distill.backprop import SyntheticSide, resolve_copies_per_pass
from engine.distill.config import DistillConfig, DistillError, NonFiniteLossError
from engine.distill.loop import DistillResult, distill
from engine.distill.seeds import derived_seed, make_generators
from engine.distill.signals import DistillInterrupted

__all__ = ["DistillConfig", "DistillResult", "DistillError", "NonFiniteLossError", "DistillInterrupted", "distill",
           "SyntheticSide", "resolve_copies_per_pass", "make_generators", "derived_seed"]
