"""What a model serves: its route, declared in its checkpoint.

A hospital PACS forwards everything (chest radiographs, mammograms, ultrasound, CT and MR series), and
a model trained on one anatomy gives meaningless codes for another. Each model therefore says which
images it is for: modalities, body parts and optionally photometric interpretations (an empty list
means any). An instance is hashed by the model of the first route that matches its header, and a
similar query searches only within its reference's route, so answers never mix anatomies. A
*general* model (trained without labels on every kind of image) takes what no other route matches.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


# Body parts as DICOM's defined terms (PS3.16 Annex L, "Body Part Examined") for the spellings
# modalities send instead: a chest film whose BodyPartExamined said THORAX went to the general model,
# answered among MR and CT studies. Both sides are read so (the image's value and a route's terms),
# so a route that declares THORAX takes CHEST films too.
BODY_PART_SYNONYMS = {
    "CHEST": ("THORAX", "TORAX", "THORACIC", "LUNG", "LUNGS", "CXR"),
    "BREAST": ("MAMMA", "MAMMO", "MAMMOGRAPHY", "BREASTS"),
    "ABDOMEN": ("ABD", "ABDOMINAL"),
}
_SYNONYM = {alias: term for term, aliases in BODY_PART_SYNONYMS.items() for alias in (term, *aliases)}
# Words after a body part that say how it was imaged, not what: "CHEST PA", "BREAST_LEFT".
_VIEW_WORDS = {"PA", "AP", "LAT", "LATERAL", "LEFT", "RIGHT", "L", "R", "BILATERAL", "PORTABLE", "ERECT", "SUPINE"}


def body_part_term(value: str) -> str:
    """``value`` (a BodyPartExamined) as the term routing compares: upper case, a synonym of
    :data:`BODY_PART_SYNONYMS` as its defined term (``THORAX`` as ``CHEST``), with view words after it
    too (``CHEST_PA``); anything else as it was (``L_SPINE``, ``CHEST_ABDOMEN_PELVIS``)."""
    text = str(value or "").strip().upper()
    words = [w for w in re.split(r"[\s_\-]+", text) if w]
    if not words:
        return ""
    if " ".join(words) in _SYNONYM:
        return _SYNONYM[" ".join(words)]
    if words[0] in _SYNONYM and all(w in _VIEW_WORDS for w in words[1:]):
        return _SYNONYM[words[0]]
    return text


def _terms(values: Any) -> tuple[str, ...]:
    if isinstance(values, str):
        values = values.replace("\\", ",").split(",")
    return tuple(sorted({str(v).strip().upper() for v in values or () if str(v).strip()}))


@dataclass(frozen=True)
class Route:
    name: str
    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    photometric: tuple[str, ...] = ()
    general: bool = False

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"route name {self.name!r}: lower-case letters, digits and '-', at most 32")
        for field in ("modalities", "body_parts", "photometric"):
            object.__setattr__(self, field, _terms(getattr(self, field)))

    def matches(self, modality: str, body_part: str, photometric: str = "") -> bool:
        """Whether an image with this header belongs to the route (a general route takes anything)."""
        if self.general:
            return True
        if self.body_parts and body_part_term(body_part) not in {body_part_term(t) for t in self.body_parts}:
            return False
        checks = ((self.modalities, modality), (self.photometric, photometric))
        return all(not wanted or (value or "").strip().upper() in wanted for wanted, value in checks)

    def specificity(self) -> int:
        """How many header fields the route constrains: a more specific route is tried first."""
        return sum(bool(x) for x in (self.modalities, self.body_parts, self.photometric))

    def describe(self) -> str:
        if self.general:
            return f"{self.name} (general: every image no other route takes)"
        parts = [
            "/".join(self.modalities) or "any modality",
            "/".join(self.body_parts) or "any body part",
        ]
        if self.photometric:
            parts.append("/".join(self.photometric))
        return f"{self.name} ({', '.join(parts)})"

    def as_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Route:
        return cls(
            name=str(data["name"]),
            modalities=tuple(data.get("modalities") or ()),
            body_parts=tuple(data.get("body_parts") or ()),
            photometric=tuple(data.get("photometric") or ()),
            general=bool(data.get("general", False)),
        )


# A checkpoint written before routes existed served every image: it is read as a general route.
LEGACY = Route("general", general=True)


def in_matching_order(routes: list[Route]) -> list[Route]:
    """The order routes are tried in: the most specific first (more header fields constrained),
    ties by name, general routes last; so the answer never depends on registration order."""
    return sorted(routes, key=lambda r: (r.general, -r.specificity(), r.name))


def taking(routes: list[Route], unrouted: str = "general", replacing: Route | None = None) -> list[Route]:
    """The routes that take images, in matching order: ``routes`` (with ``replacing`` in place of
    the route of its name: what a re-index will answer with), general routes left out when
    ``unrouted`` is ``none`` (images no specific route takes are then stored without a model)."""
    if replacing is not None:
        routes = [r for r in routes if r.name != replacing.name] + [replacing]
    if unrouted == "none":
        routes = [r for r in routes if not r.general]
    return in_matching_order(routes)


def first_match(routes: list[Route], modality: str, body_part: str, photometric: str = "") -> Route | None:
    """The first specific route that takes the image, else a general route, else None."""
    for route in routes:
        if not route.general and route.matches(modality, body_part, photometric):
            return route
    return next((r for r in routes if r.general), None)


def fell_back(routes: list[Route], modality: str, body_part: str, photometric: str = "") -> bool:
    """Whether the image goes to a general route although a specific route takes its modality: its
    body part (or photometric interpretation) is not one that route declares. Worth showing: a chest
    film whose header names no body part is answered among every other kind of image."""
    route = first_match(routes, modality, body_part, photometric)
    wanted = (modality or "").strip().upper()
    return (
        route is not None and route.general and any(not r.general and wanted and wanted in r.modalities for r in routes)
    )
