"""The similar-studies query, independent of how it was asked: one :class:`~plugin.search.filters.Filters`
type for DICOM and HTTP alike, the query model (:mod:`~plugin.search.query`) and the in-memory
replica index of the codes (:mod:`~plugin.search.replica`). No pydicom, no HTTP here."""
