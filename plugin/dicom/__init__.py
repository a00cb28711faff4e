"""The DICOM node: the SCP's wiring and handlers, the similar and plain C-FIND, C-MOVE, the durable
spool and its reconciler, status codes and the private block. Speaks DICOM; searches through
:mod:`plugin.search`, stores through :mod:`plugin.store`, queues through :mod:`workers.client`."""
