"""Routes: what a model serves, declared in its checkpoint (hashing.route)."""

from __future__ import annotations

import pytest

from hashing.route import LEGACY, Route, first_match, taking
from plugin.store.models import StoreError


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


@pytest.mark.parametrize(
    ("fields", "body_part"),
    [
        ({"BodyPartExamined": "CHEST"}, "CHEST"),
        ({"BodyPartExamined": "thorax"}, "CHEST"),
        ({"BodyPartExamined": "CHEST_PA"}, "CHEST"),
        ({"BodyPartExamined": "LUNG", "StudyDescription": "MAMMO"}, "CHEST"),  # the header's own word wins
        ({"BodyPartExamined": "HAND"}, "HAND"),  # a term routing has no synonym for: unchanged
        ({"BodyPartExamined": "L_SPINE"}, "L_SPINE"),  # ...spelled as it came
        ({"BodyPartExamined": "CHEST_ABDOMEN_PELVIS"}, "CHEST_ABDOMEN_PELVIS"),  # more than a chest
        ({"AnatomicRegionSequence": ("SCT", "51185008")}, "CHEST"),
        ({"AnatomicRegionSequence": ("SRT", "T-04000")}, "BREAST"),
        ({"StudyDescription": "XR CHEST PA AND LATERAL"}, "CHEST"),
        ({"SeriesDescription": "Thorax p.a."}, "CHEST"),
        ({"ProtocolName": "MAMMO SCREENING"}, "BREAST"),
        ({"StudyDescription": "CHEST AND BREAST"}, ""),  # two body parts: no guess
        ({"StudyDescription": "XR KNEE"}, ""),
        ({}, ""),
    ],
)
def test_routing_reads_the_body_part_as_a_defined_term_else_from_the_region_code_or_the_descriptions(
    fields, body_part
) -> None:
    """Modalities spell the body part their own way or leave it out; routing compares DICOM's defined
    terms, so a chest film whose header says THORAX, or only "CHEST" in a description, reaches the
    chest model instead of the general one."""
    from pydicom.dataset import Dataset

    from plugin.core.header import instance_meta, recorded_routing, routing_header

    ds = Dataset()
    ds.Modality, ds.PhotometricInterpretation = "DX", "MONOCHROME2"
    for keyword, value in fields.items():
        if keyword == "AnatomicRegionSequence":
            code = Dataset()
            code.CodingSchemeDesignator, code.CodeValue = value
            ds.AnatomicRegionSequence = [code]
        else:
            setattr(ds, keyword, value)
    assert routing_header(ds) == ("DX", body_part, "MONOCHROME2")
    assert recorded_routing(instance_meta(ds)) == ("DX", body_part, "MONOCHROME2")  # as re-index and reroute read it


def test_a_route_reads_its_own_body_parts_as_defined_terms_too() -> None:
    """A route an operator declared in the spelling their modality sends still takes those images
    (and the defined term's); terms routing has no synonym for match as they are."""
    thorax = Route("thorax-xr", modalities="DX", body_parts="THORAX")
    spine = Route("spine-xr", modalities="DX", body_parts="L_SPINE")
    general = Route("general", general=True)
    routes = [general, thorax, spine]
    assert first_match(routes, "DX", "THORAX") is thorax and first_match(routes, "DX", "chest") is thorax
    assert first_match(routes, "DX", "L_SPINE") is spine and first_match(routes, "DX", "SPINE") is general


def test_a_record_from_before_the_routing_body_part_was_kept_is_read_by_its_defined_term() -> None:
    from plugin.core.header import recorded_routing

    assert recorded_routing({"modality": "CR", "body_part": "Thorax", "photometric": ""}) == ("CR", "CHEST", "")
    assert recorded_routing({"modality": "CR", "body_part": "", "photometric": ""}) == ("CR", "", "")
    assert recorded_routing({"modality": "CR", "body_part": "L_SPINE", "photometric": ""})[1] == "L_SPINE"


def test_route_names_are_checked_and_survive_a_checkpoint() -> None:
    with pytest.raises(ValueError):
        Route("Chest X-ray")
    r = Route("mg", modalities=("MG",), body_parts=("BREAST",), photometric=("MONOCHROME2",))
    assert Route.from_dict(r.as_dict()) == r
    assert not r.matches("MG", "BREAST", "MONOCHROME1") and r.matches("MG", "breast", "monochrome2")
    assert LEGACY.general and "general" in LEGACY.describe()


# -- routes in the store and the worker's routing ---------------------------------------------------
CHEST = Route("chest-xr", modalities=("CR", "DX"), body_parts=("CHEST",))
BREAST_US = Route("us-breast", modalities=("US",), body_parts=("BREAST",))
GENERAL = Route("general", general=True)


def test_each_route_has_its_own_answering_version_and_the_most_specific_route_matches_first(store) -> None:
    store.models.register("general-v1", 64, route=GENERAL)
    store.models.register("chest-v1", 64, route=CHEST)
    store.models.register("us-v1", 64, route=BREAST_US)
    for version in ("general-v1", "chest-v1", "us-v1"):
        assert store.models.ensure_active(version)
    assert store.models.active_routes() == {"general": "general-v1", "chest-xr": "chest-v1", "us-breast": "us-v1"}
    assert [r.name for r, _ in store.models.table()] == ["chest-xr", "us-breast", "general"]
    assert store.models.route_for("DX", "CHEST") == (CHEST, "chest-v1")
    assert store.models.route_for("US", "BREAST", "RGB") == (BREAST_US, "us-v1")
    assert store.models.route_for("CT", "HEAD") == (GENERAL, "general-v1")
    # a new version of one route replaces that route's only; the others keep answering
    store.models.register("chest-v2", 64, route=CHEST)
    assert not store.models.ensure_active("chest-v2")  # the route already answers: no silent switch
    store.models.activate("chest-v2")
    assert store.models.active("chest-xr") == "chest-v2" and store.models.active("us-breast") == "us-v1"
    assert store.models.active() == "general-v1"  # "the active model" of a routed installation: the general one
    assert store.models.is_active("us-v1") and not store.models.is_active("chest-v1")
    with pytest.raises(StoreError, match="active version of route us-breast"):
        store.models.drop("us-v1")
    store.models.drop("chest-v1")  # no longer answers: may go


def test_an_installation_from_before_routes_keeps_its_version_under_the_route_its_checkpoint_declares(store) -> None:
    store.models.register("old-v3", 64)  # no route recorded, answering through the old single key
    store.client.set(store.keys.active(), "old-v3")
    assert store.models.active_routes() == {"general": "old-v3"}  # moved once: it served everything
    assert not store.client.exists(store.keys.active())
    # the worker learns from the checkpoint what it serves, and the general route is free again
    store.models.register("old-v3", 64, route=CHEST)
    assert store.models.tidy_routes() == ["general"]
    assert store.models.active_routes() == {"chest-xr": "old-v3"}


def test_the_worker_router_sends_an_image_to_its_route_and_to_a_reindex_that_will_take_it() -> None:
    from workers.model import Router

    table = [(CHEST, "chest-v1"), (GENERAL, "general-v1")]
    router = Router(table, None, None, lambda v: f"enc:{v}")
    assert router(("DX", "CHEST", "MONOCHROME2")) == [("chest-xr", "chest-v1", "enc:chest-v1")]
    assert router(("MG", "BREAST", "MONOCHROME2")) == [("general", "general-v1", "enc:general-v1")]
    assert Router([(CHEST, "chest-v1")], None, None, str)(("MG", "BREAST", "")) == []  # no model
    # while a new MG route is being built, a new mammogram is written for it too; a chest film is not
    mg = Route("mg-breast", modalities=("MG",), body_parts=("BREAST",))
    router = Router(table, "mg-v1", mg, lambda v: f"enc:{v}")
    assert router(("MG", "BREAST", "")) == [
        ("general", "general-v1", "enc:general-v1"),
        ("mg-breast", "mg-v1", "enc:mg-v1"),
    ]
    assert router(("DX", "CHEST", "")) == [("chest-xr", "chest-v1", "enc:chest-v1")]
    # unrouted=none: no general route takes an image, for the answering versions as for a re-index
    # (the same reading as the re-index's members, hashing.route.taking)
    none = Router(table, "general-v2", GENERAL, lambda v: f"enc:{v}", unrouted="none")
    assert none(("MG", "BREAST", "")) == [] and none(("DX", "CHEST", ""))[0][1] == "chest-v1"
    assert taking([CHEST, GENERAL], "none") == [CHEST] and taking([GENERAL, CHEST]) == [CHEST, GENERAL]


def test_seeding_fills_an_empty_installation_once_and_the_first_model_of_a_route_wins(store) -> None:
    from types import SimpleNamespace

    def enc(version: str, route: Route) -> SimpleNamespace:
        return SimpleNamespace(version=version, nbits=64, rerank_dim=64, emb_dim=8, route=route, supersedes=())

    models = {
        "chest.pt": enc("chest-v1", CHEST),
        "us.pt": enc("us-v1", BREAST_US),
        "site-general.pt": enc("site-general-v1", GENERAL),
        "general.pt": enc("general-v1", GENERAL),
    }
    paths = ["chest.pt", "us.pt", "site-general.pt", "general.pt"]
    assert store.models.seed(paths, models.__getitem__) == ["chest-v1", "us-v1", "site-general-v1"]
    assert "general-v1" not in store.models.versions()  # its route was taken: not even registered
    # a later start (or other settings) does not change the routes of a running installation
    assert store.models.seed(["general.pt"], models.__getitem__) == []
    assert store.models.active("general") == "site-general-v1"


def test_an_upload_goes_where_a_stored_image_of_its_kind_would(store) -> None:
    from types import SimpleNamespace

    from pydicom import Dataset

    from plugin.http.search import _upload_route
    from plugin.search.errors import QueryError
    from plugin.search.filters import Filters

    for version, route in (("chest-v1", CHEST), ("general-v1", GENERAL)):
        store.models.register(version, 64, route=route)
        store.models.activate(version)
    head = Dataset()
    head.Modality, head.BodyPartExamined = "OT", "HEAD"
    routed = SimpleNamespace(for_route=lambda name: SimpleNamespace(ready=True, route=name))  # a replica per route

    def ctx(unrouted: str) -> SimpleNamespace:
        return SimpleNamespace(store=store, settings=SimpleNamespace(unrouted=unrouted))

    assert _upload_route(ctx("general"), head, routed, Filters())[0] == "general"
    with pytest.raises(QueryError) as refused:  # unrouted=none: a stored OT image would wait without a model
        _upload_route(ctx("none"), head, routed, Filters())
    assert refused.value.reason == "no-model"
    chest = Dataset()
    chest.Modality, chest.BodyPartExamined = "DX", "CHEST"
    assert _upload_route(ctx("none"), chest, routed, Filters())[0] == "chest-xr"
    # A picture has no header: the general model, unless the filters or the caller say its kind.
    assert _upload_route(ctx("general"), None, routed, Filters())[0] == "general"
    assert _upload_route(ctx("general"), None, routed, Filters(modalities=("DX",), body_part="thorax"))[0] == "chest-xr"
    assert _upload_route(ctx("general"), None, routed, Filters(), "chest-xr")[0] == "chest-xr"
    assert _upload_route(ctx("general"), head, routed, Filters(), "chest-xr")[0] == "chest-xr"  # the caller knows
    with pytest.raises(QueryError) as refused:
        _upload_route(ctx("none"), None, routed, Filters(), "general")  # not answering with unrouted=none
    assert refused.value.reason == "malformed" and "answering: chest-xr" in refused.value.comment


def test_an_installation_two_releases_old_learns_its_route_from_the_default_that_replaced_its_model(store) -> None:
    """A hospital that ran the default model of a release from before routes, and upgrades past the
    release that shipped its successor: its version is no longer shipped, so only the new default's
    checkpoint (``supersedes``) can say what it served."""
    from hashing.encoder import Encoder
    from plugin.core.settings import configured_models, load_settings

    default = Encoder.load(None, device="cpu")
    old = default.supersedes[-1]  # v1: shipped by no release since
    store.models.register(old, 64, rerank_dim=64)  # as the old release registered v2: no route
    store.client.set(store.keys.active(), old)
    store.models.seed(configured_models(load_settings({})), lambda path: Encoder.load(path or None, device="cpu"))
    routes = store.models.active_routes()
    # It keeps answering for the chest films it indexed, until `reindex --shipped` builds the new default;
    # the general and ultrasound routes it used to hold for everything else are seeded.
    assert routes["chest-xr"] == old and store.models.route_of(old) == default.route
    assert routes["general"] != old and "us-breast" in routes
    assert not store.models.is_active(default.version)
