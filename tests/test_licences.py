"""Every base dependency (what a limited center installs) carries a non-GPL licence (design.md §1).

Read from the installed metadata, transitively: the declared licence is License-Expression, else the
"License ::" classifiers, else the License field when it is a short name rather than a bundled licence text
(SciPy's field embeds the GCC runtime's text for its bundled libgfortran, which is not SciPy's own licence).
LGPL is allowed; GPL and AGPL are not.
"""

from __future__ import annotations

import re
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

GPL = re.compile(r"(?<![LlA-Za-z])A?GPL|GNU (Affero )?General Public License", re.IGNORECASE)
LGPL = re.compile(r"LGPL|GNU Lesser|GNU Library", re.IGNORECASE)


def declared_licence(meta: metadata.PackageMetadata) -> str:
    expression = meta.get("License-Expression")
    if expression:
        return expression
    classifiers = [c for c in (meta.get_all("Classifier") or []) if c.startswith("License ::")]
    if classifiers:
        return " ; ".join(classifiers)
    text = (meta.get("License") or "").strip()
    return text if len(text) <= 200 else ""


def says_gpl(licence: str) -> bool:
    """True for GPL/AGPL in any form; LGPL alone is fine for a dynamically loaded library."""
    return bool(GPL.search(LGPL.sub("", licence)))


def base_dependencies(root: str = "fedlesion") -> dict[str, metadata.Distribution]:
    """The closure of `root`'s requirements with no extra selected."""
    found: dict[str, metadata.Distribution] = {}
    pending = [root]
    while pending:
        name = pending.pop()
        key = canonicalize_name(name)
        if key in found:
            continue
        dist = metadata.distribution(name)
        found[key] = dist
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return found


@pytest.mark.parametrize(
    ("licence", "gpl"),
    [
        ("GPL-3.0-only", True),
        ("GPL-2.0-or-later WITH Classpath-exception-2.0", True),
        ("AGPL-3.0", True),
        ("License :: OSI Approved :: GNU General Public License v3 (GPLv3)", True),
        ("MIT OR GPL-2.0", True),
        ("LGPL-2.1-or-later", False),
        ("License :: OSI Approved :: GNU Lesser General Public License v3 (LGPLv3)", False),
        ("MIT", False),
        ("Apache-2.0 OR BSD-3-Clause", False),
        ("MPL-2.0 AND MIT", False),
    ],
)
def test_gpl_detection(licence: str, gpl: bool) -> None:
    assert says_gpl(licence) is gpl


def test_no_base_dependency_is_gpl() -> None:
    dependencies = base_dependencies()
    assert {"pydicom", "pynetdicom", "highdicom", "numpy"} <= set(dependencies)
    assert "torch" not in dependencies and "onnxruntime" not in dependencies  # extras, not base
    undeclared = [name for name, dist in dependencies.items() if not declared_licence(dist.metadata)]
    offenders = {
        name: declared_licence(dist.metadata)
        for name, dist in dependencies.items()
        if says_gpl(declared_licence(dist.metadata))
    }
    assert not offenders, f"GPL-licensed base dependencies: {offenders}"
    assert not undeclared, f"base dependencies without a declared licence: {undeclared}"
