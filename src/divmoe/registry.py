"""What can be chosen by name: routers, balancers, expert layouts and dispatch kinds, each with
a one-line description and the ``MoEConfig`` settings it reads (for ``divmoe list``).

Descriptions are the first sentence of a docstring (the component's module when that module
holds only it, else the class or function). Settings come from two sources:
the ``MoEConfig`` fields whose name starts with the component's name or whose help text names
it (``"dynamic_topp: add experts until ..."``), plus the small explicit table ``USES`` for
settings whose help text is generic (``top_k``, ``score_func``, ...).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import NamedTuple

from .balance import BALANCE_CONTROLLERS, BALANCE_LOSSES, BALANCERS, PLAN_TRANSFORMS
from .dispatch import DISPATCHERS
from .experts import EXPERT_LAYOUTS, HeteroSwiGLU, LoRASwiGLU, StackedSwiGLU
from .layer import MoEConfig
from .routing import ROUTERS

# Settings a component reads that its help texts do not name.
USES = {
    "topk": ["top_k", "score_func", "renormalize", "n_groups", "topk_groups", "routed_scaling",
             "jitter"],
    "expert_choice": ["top_k", "capacity_factor", "routed_scaling", "jitter"],
    "dynamic_topp": ["top_k", "routed_scaling", "jitter"],
    "null_experts": ["top_k", "renormalize", "routed_scaling", "jitter"],
    "grouped": ["top_k", "renormalize", "routed_scaling", "jitter"],
    "sinkhorn": ["top_k", "renormalize", "routed_scaling", "jitter"],
    "hash": ["top_k"],
    "hypersphere": ["top_k", "renormalize", "routed_scaling", "jitter"],
    "dselect_k": ["top_k", "routed_scaling", "jitter"],
    "soft_merge": ["jitter"],
    "small_expert_bias": ["expert_widths"],
    "dirichlet_prior": [],
    "swiglu": ["expert_hidden", "expert_widths"],
    "lora": ["expert_hidden"],
}
# Fields that name many components in their help (choices lists) and say nothing specific.
_GENERIC = {"router", "dispatch", "balance", "diversity"}

# Which docstring describes a component when the module docstring is not the right one.
_DOC_OBJECT = {"aux_loss": BALANCE_LOSSES["aux_loss"], "z_loss": BALANCE_LOSSES["z_loss"],
               "null_usage": BALANCE_LOSSES["null_usage"]}
_LAYOUT_CLASSES = {"swiglu": [StackedSwiGLU, HeteroSwiGLU], "lora": [LoRASwiGLU]}


class Component(NamedTuple):
    kind: str          # router | balancer | expert_layout | dispatch
    name: str
    description: str
    settings: list     # MoEConfig field names, in field order


def first_sentence(doc: str | None, limit: int = 140) -> str:
    """The first sentence of a docstring's first paragraph, on one line."""
    para = re.split(r"\n\s*\n", (doc or "").strip())[0]
    text = " ".join(para.split()).replace("``", "")
    m = re.search(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)\.(\s|$)", text)
    if m:
        text = text[:m.start() + 1]
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _module_doc(obj) -> str | None:
    return sys.modules[obj.__module__].__doc__


def settings_for(name: str, extra: list[str] = ()) -> list[str]:
    """MoEConfig fields a component reads: by name prefix, by help text, and ``extra``."""
    word = re.compile(rf"(?<![\w]){re.escape(name)}(?![\w])")
    out = []
    for f in dataclasses.fields(MoEConfig):
        if f.name in _GENERIC:
            continue
        help_ = f.metadata.get("help", "")
        if f.name in extra or f.name == name or f.name.startswith(name + "_") or word.search(help_):
            out.append(f.name)
    return out


def components() -> list[Component]:
    """Every registered router, balancer, expert layout and dispatch kind."""
    rows = []
    for name, cls in ROUTERS.items():
        rows.append(Component("router", name, first_sentence(_module_doc(cls)),
                              settings_for(name, USES.get(name, []))))
    for name in BALANCERS:
        fn = {**BALANCE_LOSSES, **BALANCE_CONTROLLERS, **PLAN_TRANSFORMS}[name]
        doc = _DOC_OBJECT[name].__doc__ if name in _DOC_OBJECT else _module_doc(fn)
        rows.append(Component("balancer", name, first_sentence(doc),
                              settings_for(name, USES.get(name, []))))
    for name in EXPERT_LAYOUTS:
        classes = _LAYOUT_CLASSES.get(name, [])
        desc = " / ".join(f"{c.__name__}: {first_sentence(c.__doc__)}" for c in classes) or name
        rows.append(Component("expert_layout", name, desc, settings_for(name, USES.get(name, []))))
    for name, fn in DISPATCHERS.items():
        rows.append(Component("dispatch", name, first_sentence(_module_doc(fn)), ["dispatch"]))
    return rows


_TITLES = {"router": "routers (moe.router)", "balancer": "balancers (moe.balance, a list)",
           "expert_layout": "expert layouts (moe.expert_layout)",
           "dispatch": "dispatch kinds (moe.dispatch)"}


def format_listing(rows: list[Component] | None = None) -> str:
    rows = components() if rows is None else rows
    width = max(len(r.name) for r in rows) + 2
    lines = []
    for kind, title in _TITLES.items():
        lines.append(title + ":")
        for r in rows:
            if r.kind != kind:
                continue
            lines.append(f"  {r.name:{width}s}{r.description}")
            uses = ", ".join(f"moe.{s}" for s in r.settings) or "(no settings)"
            lines.append(f"  {'':{width}s}settings: {uses}")
        lines.append("")
    lines.append("Every layer also reads moe.num_experts, moe.expert_hidden, "
                 "moe.num_shared_experts (shared experts, any router), moe.balance and "
                 "moe.dispatch; `divmoe config` lists every setting with its default.")
    return "\n".join(lines)
