"""Routes: what a model serves, declared in its checkpoint (hashing.route)."""

from __future__ import annotations

import pytest

from hashing.route import LEGACY, Route, first_match


def test_an_image_goes_to_the_first_specific_route_that_takes_it_else_to_the_general_one() -> None:
    chest = Route("chest-xr", modalities=("DX", "cr"), body_parts=("CHEST",))
    breast_us = Route("breast-us", modalities="US", body_parts="BREAST")
    general = Route("general", general=True)
    routes = [general, chest, breast_us]  # order of declaration among specific routes decides ties
    assert first_match(routes, "CR", "chest") is chest
    assert first_match(routes, "US", "BREAST") is breast_us
    assert first_match(routes, "US", "ABDOMEN") is general
    assert first_match(routes, "DX", "") is general  # no body part: it cannot be shown to be a chest
    assert first_match([chest], "MR", "HEAD") is None  # no general model: "no model"


def test_route_names_are_checked_and_survive_a_checkpoint() -> None:
    with pytest.raises(ValueError):
        Route("Chest X-ray")
    r = Route("mg", modalities=("MG",), body_parts=("BREAST",), photometric=("MONOCHROME2",))
    assert Route.from_dict(r.as_dict()) == r
    assert not r.matches("MG", "BREAST", "MONOCHROME1") and r.matches("MG", "breast", "monochrome2")
    assert LEGACY.general and "general" in LEGACY.describe()
