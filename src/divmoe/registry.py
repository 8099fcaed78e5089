"""What can be chosen by name — routers, balancers, expert layouts, diversity regularisers and
dispatch kinds — each with a one-line description and the ``MoEConfig`` settings it declares
(for ``divmoe list``, and the "read by" column of ``divmoe config``).

Settings come from the components' own declarations: ``Router.settings``,
``BALANCERS[name].settings``, ``EXPERT_LAYOUTS[name].settings``, the diversity regularisers'
weight map and ``DISPATCHERS``. Descriptions are the first sentence of a docstring (the
component's module when that module holds only it, else the class or function).
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import NamedTuple

from .balance import BALANCERS
from .dispatch import DISPATCHERS
from .diversity import regularizers
from .experts import EXPERT_LAYOUTS
from .moe_config import LAYER_SETTINGS, MoEConfig
from .parallel.expert_parallel import under_expert_parallelism
from .routing import ROUTERS

_FIELD_ORDER = {f.name: i for i, f in enumerate(dataclasses.fields(MoEConfig))}


class Component(NamedTuple):
    kind: str          # router | balancer | expert_layout | diversity | dispatch
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


def _ordered(settings) -> list[str]:
    return sorted(set(settings), key=_FIELD_ORDER.__getitem__)


_DIVERSITY_DOCS = {"exclusivity": regularizers.exclusivity,
                   "divergence": regularizers.output_divergence}


def components() -> list[Component]:
    """Every registered router, balancer, expert layout, diversity regulariser and dispatch kind."""
    rows = []
    for name, cls in ROUTERS.items():
        rows.append(Component("router", name, first_sentence(_module_doc(cls)),
                              _ordered(cls.settings)))
    for name, term in BALANCERS.items():
        doc = term.doc.__doc__ if term.doc is not None else _module_doc(term.impl)
        rows.append(Component("balancer", name, first_sentence(doc), _ordered(term.settings)))
    for name, spec in EXPERT_LAYOUTS.items():
        desc = " / ".join(f"{c.__name__}: {first_sentence(c.__doc__)}" for c in spec.classes)
        rows.append(Component("expert_layout", name, desc, _ordered(spec.settings)))
    for name, weight in regularizers.DIVERSITY_REGULARIZERS.items():
        rows.append(Component("diversity", name, first_sentence(_DIVERSITY_DOCS[name].__doc__),
                              _ordered([weight, "diversity_probe_tokens"])))
    for name, (desc, settings) in DISPATCHERS.items():
        rows.append(Component("dispatch", name, desc, _ordered(settings)))
    return rows


def readers(field: str, rows: list[Component] | None = None) -> list[str]:
    """Which components read a ``MoEConfig`` field ("layer" for the layer's own settings)."""
    rows = components() if rows is None else rows
    out = ["layer"] if field in LAYER_SETTINGS else []
    return out + [f"{r.kind} {r.name}" for r in rows if field in r.settings]


_TITLES = {"router": "routers (moe.router)", "balancer": "balancers (moe.balance, a list)",
           "expert_layout": "expert layouts (moe.expert_layout)",
           "diversity": "diversity regularisers (moe.diversity, a list)",
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
            lines.append(f"  {'':{width}s}experts sharded over ranks: "
                         f"{under_expert_parallelism(r.kind, r.name)}")
        lines.append("")
    lines.append("Every layer also reads " + ", ".join(f"moe.{s}" for s in LAYER_SETTINGS)
                 + "; `divmoe config` lists every setting with its default and its readers.")
    return "\n".join(lines)
