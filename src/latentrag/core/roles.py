"""The roles a component plays in a pipeline, named once for configs, pipeline and estimators.

A role is the config section that configures it: ``retriever`` (the prior p(h|x)),
``posterior`` (q(h|x,y)), ``reranker``, ``generator`` (p(y|x,h)) and ``estimator``. The same
names are used by `Pipeline.roles()`, `Estimator.trains` / `Estimator.requires` and the
keys of ``train.lrs``. "prior" was the pipeline's name for the retriever role before 0.2;
it is still accepted, with a deprecation warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable

#: role (config section) -> component kind
ROLE_KINDS: dict[str, str] = {
    "retriever": "retriever",
    "posterior": "retriever",
    "reranker": "reranker",
    "generator": "generator",
    "estimator": "estimator",
}
#: roles whose parameters an estimator may train
TRAINABLE_ROLES = ("retriever", "posterior", "reranker", "generator")
ALIASES = {"prior": "retriever"}


def canonical_role(name: str, where: str = "role") -> str:
    """The role's one name; the old alias "prior" maps to "retriever" with a warning."""
    if name in ALIASES:
        warnings.warn(
            f"{where}: {name!r} is deprecated, write {ALIASES[name]!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        return ALIASES[name]
    return name


def canonical_roles(names: Iterable[str], where: str = "role") -> tuple[str, ...]:
    return tuple(dict.fromkeys(canonical_role(n, where) for n in names))
