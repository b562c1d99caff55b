"""The experiment series as commands: ``moe experiments {leakage,snr-oracle,dual-tower,ceiling,all}``.

Each writes a report folder: ``report.md`` with computed verdicts, CSV tables, the named PNG
figures, and the config and data fingerprint.
"""

EXPERIMENTS = ("leakage", "snr-oracle", "dual-tower", "ceiling")
