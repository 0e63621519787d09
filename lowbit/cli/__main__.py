"""``python -m lowbit.cli``."""

from lowbit.cli import main

main()
