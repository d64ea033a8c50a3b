"""The named choices a user makes, defined once: the CLI, the server and the sessions import them from here.

`SCHEDULERS`: diffusers schedulers by name (class name in `diffusers`, config overrides); the sampler builds them
from the base's scheduler config. `SCHEDULES`: the progressive session's threshold schedules (PIXELS,
amazon-science/PIXELS diffusion_pipe.py), each s -> threshold with s = i / T in [0, 1] a float tensor, T the last
step. Nothing here imports diffusers or torch, so a command line can list the choices cheaply.
"""

from __future__ import annotations

import math

SCHEDULERS: dict[str, tuple[str, dict]] = {
    "pndm": ("PNDMScheduler", {}),
    "ddim": ("DDIMScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
DEFAULT_SCHEDULER = "pndm"  # Paint by Example's own

SCHEDULES = {
    "linear": lambda s, T: s,
    "log": lambda s, T: (s * T).log1p() / math.log1p(T),
    "cubic": lambda s, T: s**3,
    "sigmoid": lambda s, T: (s * 6 - 3).sigmoid(),
}
DEFAULT_SCHEDULE = "linear"
