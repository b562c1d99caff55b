"""Which labels each expert family is fitted for (``FitConfig.family_labels``).

By default every family is fitted for every label of ``FitConfig.labels``. A run that asks a family only
some questions -- the dual tower's 36 ``cells`` answer log g questions only -- can name the labels of that
family: the one statistics pass is the same (it sums ``Xᵀy`` of every label beside the one Gram), the family
just solves fewer right-hand sides and is validated for fewer labels.

The setting is kept canonical, so equal meanings give one cache key: ``((family, (label, ...)), ...)`` in
the fit's family order, each family's labels in the fit's label order, and only families restricted to
fewer than all labels (an empty tuple: the default, every family every label). Two families must hold every
label: ``global`` (it stands in for short groups and gives each label's training mean and std) and ``phys``
wherever ``cells`` needs it (the cells are shrunk toward their physical expert, label by label).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

FamilyLabels = tuple[tuple[str, tuple[str, ...]], ...]


def check_family_labels(given, families: tuple[str, ...], labels: tuple[str, ...]) -> FamilyLabels:
    """``given`` (a mapping or pairs family -> label or labels) as the canonical setting, checked against the
    fit's ``families`` and ``labels`` (ValueError naming the family and label that do not fit)."""
    pairs: Iterable = given.items() if isinstance(given, Mapping) else given
    chosen: dict[str, tuple[str, ...]] = {}
    for family, names in pairs:
        names = (names,) if isinstance(names, str) else tuple(str(n) for n in names)
        if family not in families:
            raise ValueError(f"family_labels names family {family!r}, which is not fitted (families {families})")
        if family in chosen:
            raise ValueError(f"family_labels names family {family!r} twice")
        unknown = [n for n in names if n not in labels]
        if unknown:
            raise ValueError(
                f"family_labels gives {family} the label(s) {unknown}, not among the fit's labels {labels}"
            )
        if not names:
            raise ValueError(f"family_labels gives {family} no label: leave the family out of the fit instead")
        chosen[family] = tuple(n for n in labels if n in names)
    if chosen.get("global", labels) != labels:
        raise ValueError(
            f"the global family is fitted for every label ({', '.join(labels)}): it stands in for short groups "
            "and gives each label's training statistics"
        )
    cells = chosen.get("cells", labels) if "cells" in families else ()
    missing = [n for n in cells if n not in chosen.get("phys", labels)]
    if missing:
        raise ValueError(
            f"cells for {', '.join(missing)} need the phys family for {', '.join(missing)} too (their shrinkage target)"
        )
    return tuple((f, chosen[f]) for f in families if f in chosen and chosen[f] != labels)


def labels_of(family_labels: FamilyLabels, family: str, labels: tuple[str, ...]) -> tuple[str, ...]:
    """The labels ``family`` is fitted for: its entry of ``family_labels``, else every label of the fit."""
    return dict(family_labels).get(family, labels)


def label_index(family_labels: FamilyLabels, family: str, labels: tuple[str, ...]) -> list[int]:
    """Positions in ``labels`` (the statistics' label axis) of the labels ``family`` is fitted for."""
    return [labels.index(n) for n in labels_of(family_labels, family, labels)]
