"""`python -m pipelines.world ...`: see pipelines/world/cli.py."""

from pipelines.world.cli import main

main()
