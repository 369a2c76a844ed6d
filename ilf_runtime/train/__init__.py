"""`ilf train`: distil the feedback module of an ILF loop from the frozen backbone.

The backbone is frozen (``requires_grad_(False)``, eval mode) and only the feedback block and the
loop scales go to the optimiser. The teacher is the same transformer with the loop switched off,
which is bit for bit the plain backbone, run by the plain sampler at ``teacher_steps``; the
student is the looped model at ``steps``, whose grid must be a subset of the teacher's (trailing
spacing does that), so that one student step replaces ``k = teacher_steps / steps`` teacher steps.

Targets (``--target``, combinable with ``+``):

- ``trajectory``: the student's one solver step from ``x_{t_i}`` must land where the teacher's k
  steps land. The solver update is affine in the model output, so the squared error of the landing
  point divided by the step's output coefficient is the squared error of the model output against
  the output that would land exactly there (the solved target). With ``--unroll U`` the student
  runs U consecutive steps with gradients flowing through its own states, against the teacher's
  trajectory from the same start; with ``--rollout R`` the state of the trained step is reached by
  R steps of the student itself (no gradient) and the teacher takes over from there (on-policy).
- ``fast``: the paper's fast approximate distillation: the student's output at ``t`` regresses
  onto the frozen model's output on the same clean image and noise at ``t / 2``.
- ``final``: from the teacher's state at the first looped step, the student runs the rest of its
  schedule with gradients through every step (each step's model call recomputed in the backward
  pass, so memory holds one step's activations) and its final image regresses onto the teacher's
  (x space: the error the paired PSNR measures). ``--final-weight`` weighs it when combined; about
  (steps - first looped step) times the cost of a ``trajectory`` step.
- ``--feature-weight``: the loop's output regresses onto the teacher's block-``b`` output at the
  state and timestep the step lands on.

Training states (``--states``): ``data`` noises real images (the bundled Fashion-MNIST model);
``teacher`` keeps a bank of teacher trajectories sampled from noise (data-free; for PixArt only
prompts or prompt embeddings are needed), regenerated every ``--bank-refresh`` steps.

Every random draw of step s on rank r comes from a generator seeded by (seed, rank, s), so a
resumed run repeats an uninterrupted one exactly. Under torchrun the ranks average gradients
(gloo on CPU, nccl on GPU); rank 0 writes checkpoints, logs and the weights file, and validation
sampling is sharded over the ranks.

Modules: `args` (`TrainArgs`, presets, flags), `distill` (teacher, student, states, losses),
`validate` (paired PSNR against the teacher), `checkpoint` (checkpoints, logs, stop flag), `loop`
(`main`).
"""

from ilf_runtime.train.args import PRESETS, TARGETS, TrainArgs, add_arguments, args_from_namespace
from ilf_runtime.train.checkpoint import load_checkpoint
from ilf_runtime.train.distill import Distiller
from ilf_runtime.train.loop import main

__all__ = [
    "PRESETS",
    "TARGETS",
    "Distiller",
    "TrainArgs",
    "add_arguments",
    "args_from_namespace",
    "load_checkpoint",
    "main",
]
