"""What every drh-pacs process shares and nothing else: settings, logging, the embedded Redis server,
UIDs and the header fields we keep. It imports no other part of ``plugin`` and nothing of ``workers``."""
