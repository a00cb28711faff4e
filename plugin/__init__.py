"""Everything of drh-pacs that faces the hospital: the DICOM SCP and its similar-studies query,
C-MOVE forwarding, the Orthanc integration, the Redis store and its replica index, the HTTP API,
the status page and the command line."""

import os

# numpy's BLAS on one thread, unless the environment says otherwise. Every product a query makes is
# small (27 x 128 by 128 x 1,000 for a re-ranking by the reference's variants): OpenBLAS's threads
# only add hand-offs, and on a machine whose cores the workers keep busy they stall. Measured on the
# 2-core development machine beside a 2-thread evaluation: that product 3.4-16 ms on its default
# threads, 0.18 ms on one. Set before numpy is first imported (this package is imported first by
# ``drh-pacs``); torch keeps its own threads (``threads`` settings).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
