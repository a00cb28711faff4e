"""The science of drh-pacs: deep hashing models, losses, training, evaluation, DICOM pixel
preprocessing, bit packing and Hamming search.

A plain library: it imports nothing of networking, Redis or Celery, so it can be tested and reused
alone (``tests/test_hashing_isolation.py`` checks this).
"""
