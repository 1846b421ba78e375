"""The operators: each asks the dispatcher for a native kernel (csrc/, cuda/) on its inputs'
device and runs a PyTorch composite with the same semantics where there is none.

``sink_attention`` (ops/sink_attention.py), ``remask_step`` (ops/remask_step.py, its noise in
ops/remask_noise.py) and ``attention_mass`` (ops/attention_mass.py); their plain-PyTorch
references in ops/reference.py, argument checks in ops/checks.py, shared rules in
ops/common.py.
"""

from .attention_mass import attention_mass
from .reference import (
    attention_mass_reference,
    remask_step_reference,
    sink_attention_mask,
    sink_attention_reference,
)
from .remask_step import remask_step, remask_step_noise, remask_step_seed
from .sink_attention import sink_attention

__all__ = [
    "attention_mass",
    "attention_mass_reference",
    "remask_step",
    "remask_step_noise",
    "remask_step_reference",
    "remask_step_seed",
    "sink_attention",
    "sink_attention_mask",
    "sink_attention_reference",
]
