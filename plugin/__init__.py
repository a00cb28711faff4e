"""Everything of drh-pacs that faces the hospital: the DICOM SCP and its similar-studies query,
C-MOVE forwarding, the Orthanc integration, the Redis store and its replica index, the HTTP API,
the status page and the command line."""
