"""The one registry of restorers: export kind -> the RestorerModule class that trains it.

A restorer registers itself where it is defined, under the `kind` written on its class:

    @register_restorer
    class SuperResolutionRestorer(RestorerModule):
        kind = "sr"

and `restorers/__init__.py` imports its module (one line per restorer), so that importing the
package fills the registry. Everything else asks by kind: rebuilding a module from a Lightning
checkpoint (restorers/export.py) and a defense from an export file (defenses/factory.py, lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

if TYPE_CHECKING:  # the base module imports this registry's users; the annotation only needs the name
    from defenses.base import Defense
    from restorers.base import RestorerModule

_RESTORERS: dict[str, type[RestorerModule]] = {}


def register_restorer(cls: type[RestorerModule]) -> type[RestorerModule]:
    """Class decorator: registers `cls` under `cls.kind` after checking it fulfils the contract."""
    cls.check_contract()
    if cls.kind in _RESTORERS and _RESTORERS[cls.kind] is not cls:
        raise ValueError(
            f"restorer kind {cls.kind!r} is taken by {_RESTORERS[cls.kind].__qualname__}; choose another kind"
        )
    _RESTORERS[cls.kind] = cls
    return cls


def restorer_kinds() -> list[str]:
    import restorers  # noqa: F401  (its imports register the project's restorers)

    return sorted(_RESTORERS)


def restorer_class(kind: str, source: str = "") -> type[RestorerModule]:
    """The registered class of `kind`; `source` names the file it came from, for the error."""
    if kind not in restorer_kinds():
        where = f"'{source}' is of" if source else "unknown"
        raise KeyError(f"{where} restorer kind {kind!r}; registered kinds: {restorer_kinds()} (restorers/registry.py)")
    return _RESTORERS[kind]


def defense_from_export(export: dict[str, Any], classifier: nn.Module | None, source: str = "") -> Defense:
    """The defense an export file of a restorer describes, around `classifier` where the defense needs one."""
    return restorer_class(export["kind"], source).defense_from_export(export, classifier)
