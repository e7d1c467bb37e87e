"""The command layer: jobs behind `sslfw eval|pseudolabel|predict|pipeline`, built on the library modules above."""
