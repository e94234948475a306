"""`python -m seqdpo [overrides]`: run one job (or a sweep with -m). See seqdpo.app."""

from seqdpo.app import cli

cli()
