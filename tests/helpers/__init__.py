"""What the tests share besides fixtures (those are in ``tests/conftest.py``): waiting on conditions,
processes, generated DICOM studies, real DICOM peers and Celery workers."""
